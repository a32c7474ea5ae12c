"""Mistral (v11 and the JSON array), Magistral reasoning, Gemma 4 and plain Gemma, Kimi K2, MiniMax
M2 and LFM2: parsers on recorded reply shapes (whole, one character and one token at a time,
malformed, truncated; the shapes are llama.cpp's tests/test-chat.cpp cases), forcing grammars
that parse back, reasoning switches, and detection from the real templates."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from mlxserve.core.families import detect_family
from mlxserve.core.families.base import plain_lit
from mlxserve.core.families.gemma import Gemma4, GemmaPlain
from mlxserve.core.families.mistral import Mistral, MistralV11
from mlxserve.core.families.others import LFM2, KimiK2, MiniMaxM2
from mlxserve.errors import InvalidRequest
from tests.families_harness import (
    FUNCS,
    MODES,
    assert_forced_call_parses_back,
    grammar_accepts,
    run,
)

PARIS = ("get_weather", {"city": "Paris"})
Q = '<|"|>'
KIMI = "<|tool_call_begin|>functions.{name}:{i}<|tool_call_argument_begin|>{args}<|tool_call_end|>"

# (family, reply, content, calls, invalid calls, reasoning)
CASES = [
    (MistralV11(), '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', "", [PARIS], 0, ""),
    (
        MistralV11(),
        'Hello, world!\nWhat\'s up?[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'
        '[TOOL_CALLS]add[ARGS]{"a": 1, "b": [2]}',
        "Hello, world!\nWhat's up?",
        [PARIS, ("add", {"a": 1, "b": [2]})],
        0,
        "",
    ),
    (
        MistralV11(),
        '[TOOL_CALLS]get_weather[CALL_ID]123456789[ARGS]{"city": "Paris"}',
        "",
        [PARIS],
        0,
        "",
    ),
    (  # the older JSON array, read by the same parser
        MistralV11(),
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "123456789"}]',
        "",
        [PARIS],
        0,
        "",
    ),
    (
        Mistral(),
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]',
        "",
        [PARIS],
        0,
        "",
    ),
    (
        MistralV11(),
        '[THINK]I\'m\nthinking[/THINK][TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}',
        "",
        [PARIS],
        0,
        "I'm\nthinking",
    ),
    (  # a call marker inside the reasoning is reasoning
        MistralV11(),
        '[THINK]Let me think about [TOOL_CALLS]add[ARGS]{"a":1} and more[/THINK]'
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}',
        "",
        [PARIS],
        0,
        'Let me think about add{"a":1} and more',
    ),
    (MistralV11(), "[THINK]I'm\nthinking[/THINK]Hello!", "Hello!", [], 0, "I'm\nthinking"),
    (
        MistralV11(),
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Par',
        'get_weather{"city": "Par',
        [],
        1,
        "",
    ),
    (MistralV11(), "[TOOL_CALLS]get_weather{city}", "get_weather{city}", [], 1, ""),
    (MistralV11(), "[TOOL_CALLS]rm_rf[ARGS]{}", "rm_rf{}", [], 1, ""),
    # Gemma 4
    (Gemma4(), f"<|tool_call>call:get_weather{{city:{Q}Paris{Q}}}<tool_call|>", "", [PARIS], 0, ""),
    (
        Gemma4(),
        f"Hello, world!<|tool_call>call:get_weather{{city:{Q}San Francisco, CA{Q},days:3}}"
        "<tool_call|><|tool_call>call:add{a:42,b:[1,2]}<tool_call|>",
        "Hello, world!",
        [
            ("get_weather", {"city": "San Francisco, CA", "days": 3}),
            ("add", {"a": 42, "b": [1, 2]}),
        ],
        0,
        "",
    ),
    (
        Gemma4(),
        f"<|channel>thought\nI'm\nthinking<channel|><|tool_call>call:get_weather{{city:{Q}Paris"
        f"{Q}}}<tool_call|>",
        "",
        [PARIS],
        0,
        "I'm\nthinking",
    ),
    (Gemma4(), "<|channel>thought<channel|>Hello, world!", "Hello, world!", [], 0, ""),
    (
        Gemma4(),
        f"<|tool_call>call:get_weather{{city:{Q}Par",
        "call:get_weather{city:Par",
        [],
        1,
        "",
    ),
    (Gemma4(), "<|tool_call>get_weather(city=1)<tool_call|>", "get_weather(city=1)", [], 1, ""),
    # Kimi K2
    (
        KimiK2(),
        "<|tool_calls_section_begin|>"
        + KIMI.format(name="get_weather", i=0, args='{"city": "Paris"}')
        + "<|tool_calls_section_end|>",
        "",
        [PARIS],
        0,
        "",
    ),
    (
        KimiK2(),
        "Sure.<|tool_calls_section_begin|>"
        + KIMI.format(name="get_weather", i=0, args='{"city": "Paris"}')
        + KIMI.format(name="add", i=1, args='{"a": 2}')
        + "<|tool_calls_section_end|>",
        "Sure.",
        [PARIS, ("add", {"a": 2})],
        0,
        "",
    ),
    (
        KimiK2(),
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0",
        "functions.get_weather:0",
        [],
        1,
        "",
    ),
    # a parallel section cut off by max_tokens: the calls completed in it are calls
    (
        KimiK2(),
        "Sure.<|tool_calls_section_begin|>"
        + KIMI.format(name="get_weather", i=0, args='{"city": "Paris"}')
        + KIMI.format(name="add", i=1, args='{"a": 2}')
        + '<|tool_call_begin|>functions.add:2<|tool_call_argument_begin|>{"a"',
        'Sure.functions.add:2{"a"',
        [PARIS, ("add", {"a": 2})],
        1,
        "",
    ),
    (
        KimiK2(),
        "<|tool_calls_section_begin|>"
        + KIMI.format(name="get_weather", i=0, args='{"city": "Paris"}'),
        "",
        [PARIS],
        0,
        "",
    ),
    (
        KimiK2(),
        "<|tool_calls_section_begin|>"
        + KIMI.format(name="rm_rf", i=0, args="{}")
        + "<|tool_call_begin|>functions.add:1",
        "functions.rm_rf:0{}functions.add:1",
        [],
        1,
        "",
    ),
    # MiniMax M2 (its template opens <think>: see the prompt in test_parsers)
    (
        MiniMaxM2(),
        'I\'m\nthinking\n</think>\n\n<minimax:tool_call>\n<invoke name="get_weather">\n'
        '<parameter name="city">Paris</parameter>\n<parameter name="days">3</parameter>\n'
        "</invoke>\n</minimax:tool_call>",
        "",
        [("get_weather", {"city": "Paris", "days": 3})],
        0,
        "I'm\nthinking\n",
    ),
    (MiniMaxM2(), "\n</think>\n\nHello, world!", "Hello, world!", [], 0, "\n"),
    (
        MiniMaxM2(),
        '</think><minimax:tool_call>\n<invoke name="get_weather">\n<parameter name=',
        '\n<invoke name="get_weather">\n<parameter name=',
        [],
        1,
        "",
    ),
    (
        MiniMaxM2(),
        '</think><minimax:tool_call>\n<invoke name="get_weather">\n'
        '<parameter name="city">Paris</parameter>\n</invoke>\n<invoke name="add">\n'
        '<parameter name="a">2</parameter>\n</invoke>\n<invoke name="add">\n<parameter',
        '\n<invoke name="add">\n<parameter',
        [PARIS, ("add", {"a": 2})],
        1,
        "",
    ),
    (
        MiniMaxM2(),
        '</think><minimax:tool_call>\n<invoke name="get_weather">\n'
        '<parameter name="city">Paris</parameter>\n</invoke>\n',
        "",
        [PARIS],
        0,
        "",
    ),
    # LFM2
    (LFM2(), '<|tool_call_start|>[get_weather(city="Paris")]<|tool_call_end|>', "", [PARIS], 0, ""),
    (
        LFM2(),
        'Ok.<|tool_call_start|>[get_weather(city="Paris"), add(a=1, b=[True, None])]'
        "<|tool_call_end|>",
        "Ok.",
        [PARIS, ("add", {"a": 1, "b": [True, None]})],
        0,
        "",
    ),
    (
        LFM2(),
        "<|tool_call_start|>[get_weather(city=]<|tool_call_end|>",
        "[get_weather(city=]",
        [],
        1,
        "",
    ),
]
PROMPTS = {"minimax_m2": "]~b]ai\n<think>\n"}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("family", "text", "content", "calls", "invalid", "reasoning"),
    CASES,
    ids=[f"{c[0].name}-{i}" for i, c in enumerate(CASES)],
)
def test_parsers(family, text, content, calls, invalid, reasoning, mode):
    reply = run(family, text, FUNCS, mode, prompt=PROMPTS.get(family.name, ""))
    assert reply.calls == calls
    assert len(reply.invalid) == invalid
    assert reply.content == content
    assert reply.reasoning == reasoning
    for marker in family.markers:
        assert marker not in reply.content


CALLS = {
    "mistral_v11": '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}',
    "gemma4": f"<|tool_call>call:get_weather{{city:{Q}Oslo{Q}}}<tool_call|>",
    "kimi_k2": "<|tool_calls_section_begin|>"
    + KIMI.format(name="get_weather", i=0, args='{"city": "Oslo"}')
    + "<|tool_calls_section_end|>",
    "minimax_m2": '</think><minimax:tool_call>\n<invoke name="get_weather">\n'
    '<parameter name="city">Oslo</parameter>\n</invoke>\n</minimax:tool_call>',
    "lfm2": '<|tool_call_start|>[get_weather(city="Oslo")]<|tool_call_end|>',
}
TWO_CALLS = {
    "mistral_v11": CALLS["mistral_v11"] + CALLS["mistral_v11"].replace("Oslo", "Rome"),
    "gemma4": CALLS["gemma4"] + CALLS["gemma4"].replace("Oslo", "Rome"),
    "kimi_k2": "<|tool_calls_section_begin|>"
    + KIMI.format(name="get_weather", i=0, args='{"city": "Oslo"}')
    + KIMI.format(name="get_weather", i=1, args='{"city": "Rome"}')
    + "<|tool_calls_section_end|>",
    "minimax_m2": '</think><minimax:tool_call>\n<invoke name="get_weather">\n'
    '<parameter name="city">Oslo</parameter>\n</invoke>\n<invoke name="get_weather">\n'
    '<parameter name="city">Rome</parameter>\n</invoke>\n</minimax:tool_call>',
    "lfm2": '<|tool_call_start|>[get_weather(city="Oslo"), get_weather(city="Rome")]'
    "<|tool_call_end|>",
}
FORCED = [MistralV11(), Gemma4(), KimiK2(), MiniMaxM2(), LFM2()]


@pytest.mark.parametrize("family", FORCED, ids=lambda f: f.name)
def test_forced_call_grammar_parses_back(family):
    assert_forced_call_parses_back(family, FUNCS, CALLS[family.name], TWO_CALLS[family.name])


def test_old_mistral_grammar_writes_the_array():
    text = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}]'
    assert grammar_accepts(Mistral(), FUNCS, False, text)
    assert not grammar_accepts(Mistral(), FUNCS, False, CALLS["mistral_v11"])


def test_gemma4_grammar_types_values_and_refuses_what_it_cannot_force():
    family = Gemma4()
    typed = [
        {
            "name": "f",
            "parameters": {
                "type": "object",
                "properties": {
                    "n": {"type": "number"},
                    "flag": {"type": "boolean"},
                    "unit": {"type": "string", "enum": ["c", "f"]},
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "where": {
                        "type": "object",
                        "properties": {"x": {"type": "integer"}},
                        "required": ["x"],
                    },
                },
                "required": ["flag"],
            },
        }
    ]
    good = f"<|tool_call>call:f{{n:1.5,flag:true,unit:{Q}c{Q},tags:[{Q}a{Q}],where:{{x:2}}}}"
    assert grammar_accepts(family, typed, False, good + "<tool_call|>")
    assert grammar_accepts(family, typed, False, "<|tool_call>call:f{flag:false}<tool_call|>")
    assert not grammar_accepts(family, typed, False, "<|tool_call>call:f{}<tool_call|>")
    assert not grammar_accepts(
        family, typed, False, f"<|tool_call>call:f{{flag:true,unit:{Q}k{Q}}}<tool_call|>"
    )
    assert run(family, good + "<tool_call|>", typed).calls == [
        ("f", {"n": 1.5, "flag": True, "unit": "c", "tags": ["a"], "where": {"x": 2}})
    ]
    # An untyped enum (the lmstudio SDK's Literal) takes its values' type.
    untyped = [
        {
            "name": "f",
            "parameters": {
                "type": "object",
                "properties": {"unit": {"enum": ["c", "f"]}, "n": {"const": 3}},
                "required": ["unit", "n"],
            },
        }
    ]
    assert grammar_accepts(
        family, untyped, False, f"<|tool_call>call:f{{unit:{Q}f{Q},n:3}}<tool_call|>"
    )
    assert not grammar_accepts(family, untyped, False, "<|tool_call>call:f{unit:f,n:3}<tool_call|>")
    for keyword, schema in (
        ("pattern", {"type": "string", "pattern": "^a"}),
        ("anyOf", {"anyOf": [{"type": "string"}]}),
        ("additionalProperties", {"type": "object", "additionalProperties": {"type": "string"}}),
    ):
        bad = [{"name": "g", "parameters": {"type": "object", "properties": {"v": schema}}}]
        with pytest.raises(InvalidRequest, match=keyword):
            family.call_grammar(bad, False, plain_lit)


def test_magistral_reasoning_switch_is_the_system_prompt(make_models: ModuleType):
    template = make_models.find_template(
        "mistralai-Ministral-3-14B-Reasoning-2512.jinja"
    ).read_text()
    family = detect_family(template)
    assert isinstance(family, MistralV11)
    options = family.reasoning_options(template)
    assert options is not None and options.allowed == ("off", "on") and options.default == "on"
    user = [{"role": "user", "content": "hi"}]
    assert family.reasoning_messages(user, None, template) == user
    assert family.reasoning_messages(user, "on", template) == user  # the default prompt thinks
    off = family.reasoning_messages(user, "off", template)
    assert off[0] == {"role": "system", "content": ""}
    own = [{"role": "system", "content": "Be brief."}, *user]
    on = family.reasoning_messages(own, "on", template)
    assert on[0]["content"].startswith("# HOW YOU SHOULD THINK") and "[THINK]" in on[0]["content"]
    assert on[0]["content"].endswith("Be brief.")
    assert family.reasoning_messages(own, "off", template) == own
    with pytest.raises(InvalidRequest):
        family.reasoning_kwargs("maximum", template, constrained=False)
    small = make_models.find_template("Mistral-Small-3.2-24B-Instruct-2506.jinja").read_text()
    assert detect_family(small).reasoning_options(small) is None


def test_plain_gemma_folds_the_system_prompt_into_the_first_turn():
    messages = [
        {"role": "system", "content": "Tools: x"},
        {"role": "user", "content": "hi"},
    ]
    assert GemmaPlain().prepare_messages(messages) == [
        {"role": "user", "content": "Tools: x\n\nhi"}
    ]


EXPECTED = {
    "mistral-small-3.2": "mistral_v11",
    "ministral-reasoning": "mistral_v11",
    "devstral": "mistral_v11",
    "gemma4": "gemma4",
    "gemma2": "gemma",
    "llama3.1": "llama3",
    "llama3.2": "llama3",
    "llama3.3": "llama3",
    "kimi-k2": "kimi_k2",
    "minimax-m2": "minimax_m2",
    "granite-4.0": "hermes",
    "smollm3": "lmstudio",
    "lfm2": "lfm2",
    "phi-3.5": "lmstudio",
}


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_detect_from_real_templates(key: str, make_models: ModuleType) -> None:
    family = make_models._families().FAMILIES[key]
    template = Path(make_models.find_template(family.template)).read_text()
    assert detect_family(template).name == EXPECTED[key]
