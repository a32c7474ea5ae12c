"""Model families: detection, output parsers on recorded reply shapes (whole, one character and
one token at a time, malformed, truncated) and forcing grammars that parse back."""

import json

import pytest

from mlxserve.core.families import detect_family
from mlxserve.core.families.deepseek import DeepSeek, DeepSeekV32
from mlxserve.core.families.glm import GLM, GLM47
from mlxserve.core.families.harmony import Harmony
from mlxserve.core.families.hermes import Hermes
from mlxserve.core.families.history import check_tool_results
from mlxserve.core.families.llama3 import Llama3
from mlxserve.core.families.lmstudio import LMStudio
from mlxserve.core.families.mistral import Mistral
from mlxserve.core.families.qwen3_coder import Qwen3Coder
from mlxserve.errors import InvalidRequest
from tests.families_harness import (
    FUNCS,
    MODES,
    assert_forced_call_parses_back,
    grammar_accepts,
    run,
)

CASES = [
    # Qwen2.5 / Qwen3 / Hermes
    (
        Hermes(),
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>',
        "",
        [("get_weather", {"city": "Paris", "unit": "c"})],
        0,
    ),
    (
        Hermes(),
        'Let me check.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": [2, {"c": "}"}]}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>',
        "Let me check.\n\n",
        [("add", {"a": 1, "b": [2, {"c": "}"}]}), ("get_weather", {})],
        0,
    ),
    (
        Hermes(),
        "No tools needed: 2 < 3 and <tool is not a tag.",
        "No tools needed: 2 < 3 and <tool is not a tag.",
        [],
        0,
    ),
    # unknown tool, broken JSON, cut off: reported as invalid calls, markers stripped
    (
        Hermes(),
        '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',
        '\n{"name": "rm_rf", "arguments": {}}\n',
        [],
        1,
    ),
    (
        Hermes(),
        '<tool_call>\n{"name": get_weather}\n</tool_call>',
        '\n{"name": get_weather}\n',
        [],
        1,
    ),
    (Hermes(), '<tool_call>\n{"name": "add", "argu', '\n{"name": "add", "argu', [], 1),
    # Llama 3.1 / 3.2
    (
        Llama3(),
        '{"name": "get_weather", "parameters": {"city": "Oslo"}}',
        "",
        [("get_weather", {"city": "Oslo"})],
        0,
    ),
    (
        Llama3(),
        '<|python_tag|>{"name": "add", "parameters": {"a": 2, "b": 3}}',
        "",
        [("add", {"a": 2, "b": 3})],
        0,
    ),
    (Llama3(), "The answer is {not a call}.", "The answer is {not a call}.", [], 0),
    (
        Llama3(),
        '{"name": "add", "parameters": {"a": 1}}; {"name": "add", "parameters": {"a": 2}}',
        "",
        [("add", {"a": 1}), ("add", {"a": 2})],
        0,
    ),
    # Mistral v0.3
    (
        Mistral(),
        '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}, '
        '{"name": "get_weather", "arguments": {"city": "Rome"}}]',
        "",
        [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Rome"})],
        0,
    ),
    # LM Studio's format for models without tool training
    (
        LMStudio(),
        'Sure. [TOOL_REQUEST]{"name": "get_weather", "arguments": {"city": "Lima"}}[END_TOOL_REQUEST]',
        "Sure. ",
        [("get_weather", {"city": "Lima"})],
        0,
    ),
    # Qwen3-Coder / Qwen3.5: XML, values typed by the schema
    (
        Qwen3Coder(),
        "I'll check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>",
        "I'll check.\n",
        [("get_weather", {"city": "New York", "days": 3})],
        0,
    ),
    (
        Qwen3Coder(),
        "<tool_call>\n<function=add>\n<parameter=a>\n1\n</parameter>\n<parameter=b>\n[1, 2]\n"
        "</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=get_weather>\n"
        "<parameter=city>\n<b>x</b>\n</parameter>\n</function>\n</tool_call>",
        "\n",
        [("add", {"a": 1, "b": [1, 2]}), ("get_weather", {"city": "<b>x</b>"})],
        0,
    ),
    (
        Qwen3Coder(),
        "<tool_call>\n<function=add>\n<parameter=a>\none\n</parameter>\n</function>\n</tool_call>",
        "\n<function=add>\n<parameter=a>\none\n</parameter>\n</function>\n",
        [],
        1,
    ),
    (
        Qwen3Coder(),
        "<tool_call>\n<function=get_weather>\n<parameter=ci",
        "\n<function=get_weather>\n<parameter=ci",
        [],
        1,
    ),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("family", "text", "content", "calls", "invalid"), CASES)
def test_parsers(family, text, content, calls, invalid, mode):
    reply = run(family, text, FUNCS, mode)
    assert (reply.content, reply.calls, len(reply.invalid)) == (content, calls, invalid)


def test_hermes_arguments_stream_in_fragments():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    reply = run(Hermes(), text, FUNCS, "chars")
    assert reply.fragments > 5 and reply.calls == [("get_weather", {"city": "Paris"})]


@pytest.mark.parametrize("mode", MODES)
def test_thinking_then_call(mode):
    text = "Need weather.\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call>"
    reply = run(Qwen3Coder(), text, FUNCS, mode, prompt="<|im_start|>assistant\n<think>\n")
    assert reply.reasoning == "Need weather.\n"
    assert reply.calls == [("get_weather", {"city": "Oslo"})] and reply.content == ""


def test_markers_never_reach_content():
    reply = run(Hermes(), "Hi<|im_end|> there<|im_", [], "chars")
    assert reply.content == "Hi there<|im_"  # a marker's beginning at the very end is text


@pytest.mark.parametrize(
    ("template", "family"),
    [
        ("{% if tools %}<tool_call>{% endif %}", "hermes"),
        ("{% for t in tools %}[TOOL_CALLS]{% endfor %}", "mistral"),
        ("{% if tools %}<|python_tag|>{% endif %}", "llama3"),
        ("{% if tools %}<tool_call>\n<function=x>\n<parameter=y>{% endif %}", "qwen3_coder"),
        ("{% for t in tools %}{{ t }}{% endfor %}", "hermes"),
        ("{{ messages }}", "lmstudio"),
        (None, "lmstudio"),
    ],
)
def test_detect(template, family):
    assert detect_family(template).name == family


CALLS = {
    "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
    "llama3": '{"name": "get_weather", "parameters": {"city": "Oslo"}}',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}]',
    "lmstudio": '[TOOL_REQUEST]{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    "[END_TOOL_REQUEST]",
    "qwen3_coder": "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n"
    "</function>\n</tool_call>",
}
TWO_CALLS = {
    "hermes": CALLS["hermes"] + "\n" + CALLS["hermes"].replace("Oslo", "Rome"),
    "llama3": CALLS["llama3"] + "; " + CALLS["llama3"].replace("Oslo", "Rome"),
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}, '
    '{"name": "get_weather", "arguments": {"city": "Rome"}}]',
    "lmstudio": CALLS["lmstudio"] + "\n" + CALLS["lmstudio"].replace("Oslo", "Rome"),
    "qwen3_coder": CALLS["qwen3_coder"] + "\n" + CALLS["qwen3_coder"].replace("Oslo", "Rome"),
}
FAMILIES = [Hermes(), Llama3(), Mistral(), LMStudio(), Qwen3Coder()]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_forced_call_grammar_parses_back(family):
    assert_forced_call_parses_back(family, FUNCS, CALLS[family.name], TWO_CALLS[family.name])


def test_xml_grammar_types_values_and_refuses_what_it_cannot_force():
    family = Qwen3Coder()
    wrong = CALLS["qwen3_coder"].replace(
        "</parameter>\n</function>",
        "</parameter>\n<parameter=days>\nthree\n</parameter>\n</function>",
    )
    assert not grammar_accepts(family, FUNCS, False, wrong)
    assert grammar_accepts(family, FUNCS, False, wrong.replace("three", "3"))
    pattern = [
        {
            "name": "f",
            "parameters": {
                "type": "object",
                "properties": {"code": {"type": "string", "pattern": "^[A-Z]+$"}},
            },
        }
    ]
    with pytest.raises(InvalidRequest, match="'pattern'"):
        family.call_grammar(pattern, False, json.dumps)


def test_tool_result_must_answer_a_call():
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": {}}}
    check_tool_results(
        [
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "3"},
        ]
    )
    with pytest.raises(InvalidRequest, match="call_2"):
        check_tool_results(
            [
                {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_2", "content": "3"},
            ]
        )


# gpt-oss (harmony). <|call|> and <|return|> end generation, so recorded replies stop before them.
HARMONY = [
    (
        "<|channel|>analysis<|message|>User wants weather.<|end|><|start|>assistant<|channel|>"
        'commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Oslo"}',
        "",
        "User wants weather.",
        [("get_weather", {"city": "Oslo"})],
        0,
    ),
    (
        "<|channel|>analysis<|message|>Simple.<|end|><|start|>assistant<|channel|>final<|message|>"
        "Hello there!",
        "Hello there!",
        "Simple.",
        [],
        0,
    ),
    (
        "<|channel|>final<|message|>No thinking at low effort.",
        "No thinking at low effort.",
        "",
        [],
        0,
    ),
    # the recipient before the channel, as the template writes history
    (
        '<|start|>assistant to=functions.add<|channel|>commentary json<|message|>{"a": 1}',
        "",
        "",
        [("add", {"a": 1})],
        0,
    ),
    # a preamble to the user on commentary, then a call
    (
        "<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant<|channel|>commentary "
        "to=functions.add <|constrain|>json<|message|>{}",
        "Checking.",
        "",
        [("add", {})],
        0,
    ),
    # unknown tool, broken JSON, cut off mid-call: invalid calls without markers
    (
        '<|channel|>commentary to=browser.search <|constrain|>json<|message|>{"q": "x"}',
        '{"q": "x"}',
        "",
        [],
        1,
    ),
    (
        '<|channel|>commentary to=functions.add <|constrain|>json<|message|>{"a": ',
        '{"a": ',
        "",
        [],
        1,
    ),
    # a model that ignores the framing: plain content
    ("Just text, no channels.", "Just text, no channels.", "", [], 0),
    ("<|channel|>analysis<|message|>thinking, cut off", "", "thinking, cut off", [], 0),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("text", "content", "reasoning", "calls", "invalid"), HARMONY)
def test_harmony(text, content, reasoning, calls, invalid, mode):
    reply = run(Harmony(), text, FUNCS, mode, prompt="<|start|>assistant")
    assert (reply.content, reply.reasoning, reply.calls, len(reply.invalid)) == (
        content,
        reasoning,
        calls,
        invalid,
    )


def test_harmony_grammar_and_settings():
    family = Harmony()
    call = (
        "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
        '{"city": "Oslo"}<|call|>'
    )
    assert grammar_accepts(family, FUNCS, True, call)
    assert run(family, call.removesuffix("<|call|>"), FUNCS).calls == [
        ("get_weather", {"city": "Oslo"})
    ]
    assert family.reasoning_kwargs("high", "", constrained=False) == {"reasoning_effort": "high"}
    assert family.reasoning_kwargs("on", "", constrained=False) == {}
    with pytest.raises(InvalidRequest, match="'off'"):
        family.reasoning_kwargs("off", "", constrained=False)
    assert family.reasoning_options("").allowed == ("low", "medium", "high")


def test_harmony_history_splits_calls_and_keeps_reasoning():
    calls = [
        {"id": f"c{i}", "type": "function", "function": {"name": "add", "arguments": {"a": i}}}
        for i in (1, 2)
    ]
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "reasoning_content": "two adds", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c2", "content": "2"},
        {"role": "tool", "tool_call_id": "c1", "content": "1"},
    ]
    out = Harmony().prepare_messages(messages)
    assert [(m["role"], m.get("tool_call_id")) for m in out] == [
        ("user", None),
        ("assistant", None),
        ("tool", "c1"),
        ("assistant", None),
        ("tool", "c2"),
    ]
    assert out[1]["thinking"] == "two adds" and "thinking" not in out[3]


GLM_CASES = [
    (
        GLM47(),
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo</arg_value>"
        "<arg_key>days</arg_key><arg_value>2</arg_value></tool_call>",
        "",
        [("get_weather", {"city": "Oslo", "days": 2})],
        0,
    ),
    (
        GLM(),
        "Sure.\n<tool_call>add\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n"
        "<arg_key>b</arg_key>\n<arg_value>[1, 2]</arg_value>\n</tool_call>",
        "Sure.\n",
        [("add", {"a": 1, "b": [1, 2]})],
        0,
    ),
    (
        GLM47(),
        "<tool_call>launch<arg_key>x</arg_key><arg_value>1</arg_value></tool_call>",
        "launchx1",
        [],
        1,
    ),
    (GLM47(), "<tool_call>get_weather<arg_key>ci", "get_weatherci", [], 1),
    (
        DeepSeek(),
        "Let me look.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
        '{"city": "Oslo"}<｜tool▁call▁end｜><｜tool▁call▁begin｜>add<｜tool▁sep｜>{"a": 1}'
        "<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        "Let me look.",
        [("get_weather", {"city": "Oslo"}), ("add", {"a": 1})],
        0,
    ),
    # R1 distills
    (
        DeepSeek(),
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>add\n```json\n"
        '{"a": 2}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
        "",
        [("add", {"a": 2})],
        0,
    ),
    (
        DeepSeek(),
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>add<｜tool▁sep｜>{a: 2}"
        "<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        "add{a: 2}",
        [],
        1,
    ),
    (
        DeepSeek(),
        '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>add<｜tool▁sep｜>{"a"',
        'add{"a"',
        [],
        1,
    ),
    (
        DeepSeekV32(),
        '<｜DSML｜function_calls>\n<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="city" string="true">Oslo</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
        "</｜DSML｜function_calls>",
        "",
        [("get_weather", {"city": "Oslo", "days": 3})],
        0,
    ),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("family", "text", "content", "calls", "invalid"), GLM_CASES)
def test_glm_deepseek(family, text, content, calls, invalid, mode):
    reply = run(family, text, FUNCS, mode)
    assert (reply.content.strip(), reply.calls, len(reply.invalid)) == (
        content.strip(),
        calls,
        invalid,
    )


MORE_CALLS = {
    "glm": "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Oslo</arg_value>\n</tool_call>",
    "glm47": "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo</arg_value></tool_call>",
    "deepseek": "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
    '{"city": "Oslo"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
    "deepseek_v32": '<｜DSML｜function_calls>\n<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="city" string="true">Oslo</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
    "</｜DSML｜function_calls>",
}


@pytest.mark.parametrize(
    "family", [GLM(), GLM47(), DeepSeek(), DeepSeekV32()], ids=lambda f: f.name
)
def test_more_forced_grammars_parse_back(family):
    text = MORE_CALLS[family.name]
    assert grammar_accepts(family, FUNCS, False, text)
    assert not grammar_accepts(family, FUNCS, False, text.replace("Oslo", "Oslo", 1)[:-3])
    assert run(family, text, FUNCS).calls == [("get_weather", {"city": "Oslo"})]


def test_deepseek_reasoning_switch():
    v31 = "{% if not thinking is defined %}{% set thinking = false %}{% endif %}<think>"
    family = DeepSeek()
    assert family.reasoning_options(v31).allowed == ("off", "on")
    assert family.reasoning_options(v31).default == "off"
    assert family.reasoning_kwargs("on", v31, constrained=False)["thinking"] is True
    assert family.reasoning_kwargs("on", v31, constrained=True)["thinking"] is False
    assert family.reasoning_options("<｜Assistant｜><think>\\n").allowed == ("on",)
    with pytest.raises(InvalidRequest):
        family.reasoning_kwargs("off", "<｜Assistant｜><think>\\n", constrained=False)


def _template(family_models, key):
    folder = family_models(key)["mlx"]
    return json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]


def test_gpt_oss_template_gets_the_level_and_replays_calls(family_models):
    from mlxserve.core.templates import ChatTemplate

    source = _template(family_models, "gpt-oss")
    template, family = ChatTemplate(source), detect_family(source)
    ask = [{"role": "user", "content": "hi"}]
    for level in ("low", "high"):
        kwargs = family.reasoning_kwargs(level, source, constrained=False)
        assert f"Reasoning: {level}" in template.render(ask, **kwargs)
    calls = [
        {"id": f"c{i}", "type": "function", "function": {"name": "add", "arguments": {"a": i}}}
        for i in (1, 2)
    ]
    history = [
        *ask,
        {"role": "assistant", "content": "", "reasoning_content": "two adds", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c1", "content": "1"},
        {"role": "tool", "tool_call_id": "c2", "content": "2"},
        {"role": "assistant", "content": "3", "reasoning_content": "sum"},
        {"role": "user", "content": "again"},
    ]
    prompt = template.render(family.prepare_messages(history))
    assert prompt.count("to=functions.add") == 2 and prompt.count("functions.add to=assistant") == 2
    assert '{"a": 2}' in prompt
    # Earlier turns' analysis is dropped by the template's rules once a final answer follows.
    assert "two adds" not in prompt and "sum" not in prompt


def test_v1_reports_an_unreadable_call_as_invalid_tool_call():
    from mlxserve.core.types import InvalidToolCall, TextDelta
    from mlxserve.routes.lmstudio_v1 import _Turn

    turn = _Turn(instance_id="m")
    turn.first_at = 0.0
    events = turn.feed(TextDelta("Let me see. "))
    events += turn.feed(InvalidToolCall('{"name": "rm"}', reason="no such tool", unknown_name="rm"))
    assert (
        "tool_call.failure",
        {
            "reason": "Invalid tool call: no such tool",
            "metadata": {"type": "invalid_name", "tool_name": "rm"},
        },
    ) in events
    assert [i["type"] for i in turn.items] == ["message", "invalid_tool_call"]
    assert turn.items[0]["content"] == "Let me see. "


def test_end_of_turn_tokens_and_markers_by_id():
    from mlxserve.core.families import load_family

    vocab = {"<|channel|>": 10, "<|message|>": 11, "<|end|>": 12, "<|call|>": 13, "<|return|>": 14}

    def tokenize(text):
        return [vocab[text]] if text in vocab else [ord(c) for c in text]

    loaded = load_family("<|channel|>x<|message|>", {}, tokenize)
    assert loaded.family.name == "harmony"
    # The tokenizer lists <|end|> as end of sequence; harmony's turn goes on after it.
    assert loaded.stop_ids(frozenset({12, 99})) == {13, 14, 99}
    assert loaded.lit("<|channel|>") == "<[10]>" and loaded.lit("<|start|>") == '"<|start|>"'
    shown = loaded.token_bytes(lambda token: b"")  # engines decode control tokens to nothing
    assert shown(11) == b"<|message|>" and shown(42) == b""


def test_tools_reach_templates_with_a_description(family_models):
    from mlxserve.core.generate import template_tool
    from mlxserve.core.templates import ChatTemplate

    # gpt-oss's template (like Hermes's) reads tool.description, which OpenAI makes optional.
    tool = template_tool({"name": "get_weather", "parameters": FUNCS[0]["parameters"]})
    assert tool["function"]["description"] == ""
    prompt = ChatTemplate(_template(family_models, "gpt-oss")).render(
        [{"role": "user", "content": "hi"}], tools=[tool]
    )
    assert "type get_weather = (_: {" in prompt
