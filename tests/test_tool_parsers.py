"""Tool-call parsers on recorded output shapes of each model family, fed whole and char by char."""

import json

import pytest
from llguidance import LLMatcher

from mlxserve.core.tools import (
    ToolCallParser,
    ToolFormat,
    detect_format,
    forcing_grammar,
)
from mlxserve.core.types import TextDelta, ToolCallDelta, ToolCallEnd, ToolCallStart

KNOWN = {"get_weather", "add"}


def parse(fmt, text, *, chunked):
    p = ToolCallParser(fmt, KNOWN)
    events = []
    for piece in list(text) if chunked else [text]:
        events += p.feed(piece)
    events += p.finish()
    content = "".join(e.text for e in events if isinstance(e, TextDelta))
    calls = {}
    for e in events:
        if isinstance(e, ToolCallStart):
            assert e.id.startswith("call_") and e.name
            calls[e.index] = {"name": e.name, "arguments": "", "ended": False}
        elif isinstance(e, ToolCallDelta):
            calls[e.index]["arguments"] += e.arguments
        elif isinstance(e, ToolCallEnd):
            calls[e.index]["ended"] = True
    assert all(c["ended"] for c in calls.values())
    return content, [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]


CASES = [
    # Qwen2.5 / Hermes
    (
        ToolFormat.HERMES,
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>',
        "",
        [("get_weather", {"city": "Paris", "unit": "c"})],
    ),
    (
        ToolFormat.HERMES,
        'Let me check.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": [2, {"c": "}"}]}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>',
        "Let me check.\n\n",
        [("add", {"a": 1, "b": [2, {"c": "}"}]}), ("get_weather", {})],
    ),
    (
        ToolFormat.HERMES,
        "No tools needed: 2 < 3 and <tool is not a tag.",
        "No tools needed: 2 < 3 and <tool is not a tag.",
        [],
    ),
    # unknown tool name and broken JSON: given back as text
    (
        ToolFormat.HERMES,
        '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',
        [],
    ),
    (
        ToolFormat.HERMES,
        '<tool_call>\n{"name": get_weather}\n</tool_call>',
        '<tool_call>\n{"name": get_weather}\n</tool_call>',
        [],
    ),
    (
        ToolFormat.HERMES,
        '<tool_call>\n{"name": "add", "argu',
        '<tool_call>\n{"name": "add", "argu',
        [],
    ),
    # Llama 3.1 / 3.2
    (
        ToolFormat.LLAMA3,
        '{"name": "get_weather", "parameters": {"city": "Oslo"}}',
        "",
        [("get_weather", {"city": "Oslo"})],
    ),
    (
        ToolFormat.LLAMA3,
        '<|python_tag|>{"name": "add", "parameters": {"a": 2, "b": 3}}',
        "",
        [("add", {"a": 2, "b": 3})],
    ),
    (ToolFormat.LLAMA3, "The answer is {not a call}.", "The answer is {not a call}.", []),
    # Mistral v0.3
    (
        ToolFormat.MISTRAL,
        '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "get_weather", "arguments": {"city": "Rome"}}]',
        "",
        [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Rome"})],
    ),
    # LM Studio's default format for models without tool training
    (
        ToolFormat.LMSTUDIO,
        'Sure. [TOOL_REQUEST]{"name": "get_weather", "arguments": {"city": "Lima"}}[END_TOOL_REQUEST]',
        "Sure. ",
        [("get_weather", {"city": "Lima"})],
    ),
]


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize(("fmt", "text", "content", "calls"), CASES)
def test_parsers(fmt, text, content, calls, chunked):
    assert parse(fmt, text, chunked=chunked) == (content, calls)


def test_hermes_arguments_stream_in_fragments():
    p = ToolCallParser(ToolFormat.HERMES, KNOWN)
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    deltas = [e for ch in text for e in p.feed(ch) if isinstance(e, ToolCallDelta)]
    assert len(deltas) > 5
    assert "".join(d.arguments for d in deltas) == '{"city": "Paris"}'


@pytest.mark.parametrize(
    ("template", "fmt"),
    [
        ("{% if tools %}<tool_call>{% endif %}", ToolFormat.HERMES),
        ("{% for t in tools %}[TOOL_CALLS]{% endfor %}", ToolFormat.MISTRAL),
        ("{% if tools %}<|python_tag|>{% endif %}", ToolFormat.LLAMA3),
        ("{{ messages }}", ToolFormat.LMSTUDIO),
        (None, ToolFormat.LMSTUDIO),
    ],
)
def test_detect_format(template, fmt):
    assert detect_format(template) is fmt


FUNCS = [
    {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
    {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}},
]


@pytest.mark.parametrize("fmt", list(ToolFormat))
@pytest.mark.parametrize("parallel", [False, True])
def test_forcing_grammars_compile(fmt, parallel):
    grammar = LLMatcher.grammar_from_lark(forcing_grammar(fmt, FUNCS, parallel))
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    assert not is_error, messages
