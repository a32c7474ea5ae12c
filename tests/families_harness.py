"""Helpers for family parser tests: feed a recorded reply whole, one character at a time and one
pseudo-token at a time, and check that a forcing grammar accepts a call and it parses back."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import llguidance
from llguidance import LLMatcher

from mlxserve.core.families import Family
from mlxserve.core.families.base import plain_lit
from mlxserve.core.types import (
    InvalidToolCall,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
)

MODES = ("whole", "chars", "tokens")
# The tools the family unit tests call: get_weather(city, days) and add(a, b).
FUNCS = [
    {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
    {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "array"}},
        },
    },
]


@dataclass
class Reply:
    content: str = ""
    reasoning: str = ""
    calls: list[tuple[str, dict]] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    fragments: int = 0


def pieces(text: str, mode: str, markers: tuple[str, ...]) -> list[str]:
    """``text`` cut as a stream would deliver it: whole, by character, or by pseudo-token
    (each marker one token, other text in words and punctuation)."""
    if mode == "whole":
        return [text]
    if mode == "chars":
        return list(text)
    alternation = "|".join(re.escape(m) for m in sorted(markers, key=len, reverse=True) if m)
    pattern = (f"{alternation}|" if alternation else "") + r"\s+|\w+|[^\w\s]"
    out = re.findall(pattern, text, flags=re.DOTALL)
    assert "".join(out) == text
    return out


def run(
    family: Family,
    text: str,
    functions: list[dict],
    mode: str = "whole",
    *,
    prompt: str = "",
    reasoning: bool = True,
) -> Reply:
    """The events of ``family``'s parser for ``text``, gathered into a :class:`Reply`."""
    parser = family.parser(functions, prompt=prompt, reasoning=reasoning)
    events = []
    for piece in pieces(text, mode, family.markers):
        events += parser.feed(piece)
    events += parser.finish()
    reply, open_calls = Reply(), {}
    for event in events:
        if isinstance(event, InvalidToolCall):
            reply.invalid.append(event.reason)
            reply.content += event.text
        elif isinstance(event, TextDelta):
            reply.content += event.text
        elif isinstance(event, ReasoningDelta):
            reply.reasoning += event.text
        elif isinstance(event, ToolCallStart):
            assert event.id.startswith("call_") and event.name
            open_calls[event.index] = (event.name, "")
        elif isinstance(event, ToolCallDelta):
            name, args = open_calls[event.index]
            open_calls[event.index] = (name, args + event.arguments)
            reply.fragments += 1
        elif isinstance(event, ToolCallEnd):
            name, args = open_calls.pop(event.index)
            reply.calls.append((name, json.loads(args)))
    assert not open_calls, "a call was started and never ended"
    assert parser.calls == len(reply.calls)
    return reply


def grammar_accepts(family: Family, functions: list[dict], parallel: bool, text: str) -> bool:
    """Whether ``family``'s forcing grammar for ``functions`` accepts exactly ``text``."""
    lark = family.call_grammar(functions, parallel, plain_lit)
    matcher = LLMatcher(llguidance.LLTokenizer("byte"), LLMatcher.grammar_from_lark(lark))
    assert not matcher.is_error(), matcher.get_error()
    return bool(matcher.consume_tokens(list(text.encode()))) and matcher.is_accepting()


def assert_forced_call_parses_back(
    family: Family, functions: list[dict], one: str, two: str
) -> None:
    """The forced-call grammar accepts ``one`` (a get_weather call for Oslo) and ``two`` (Oslo
    then Rome, only when parallel), refuses a misspelled name, and the family reads both back."""
    assert grammar_accepts(family, functions, False, one)
    assert not grammar_accepts(family, functions, False, one.replace("get_weather", "get_wether"))
    assert run(family, one, functions).calls == [("get_weather", {"city": "Oslo"})]
    assert grammar_accepts(family, functions, True, two)
    assert not grammar_accepts(family, functions, False, two)
    assert [c[1]["city"] for c in run(family, two, functions).calls] == ["Oslo", "Rome"]
