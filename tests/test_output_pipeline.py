"""The core's output pipeline parses each tool call's arguments once, onto its end event, so
that no dialect parses JSON of its own; a generation the server stops is an error, never a
"length" finish."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from backends.base import Finished, Token, TokenStream
from mlxserve.core.families.hermes import Hermes
from mlxserve.core.generate import Generation, OutputPipeline
from mlxserve.core.textstream import TextAssembler
from mlxserve.core.types import Done, TextDelta, ToolCallDelta, ToolCallEnd, ToolCallStart
from mlxserve.errors import GenerationCancelled

TEXT = '<tool_call>{"name": "f", "arguments": {"city": "Oslo", "n": [1, 2]}}</tool_call>'


def pipeline(text: str) -> OutputPipeline:
    pieces = {i: ch.encode() for i, ch in enumerate(sorted(set(text)))}
    codes = {ch.decode(): i for i, ch in pieces.items()}
    functions = [{"name": "f", "parameters": {"type": "object"}}]
    out = OutputPipeline(
        TextAssembler(pieces.__getitem__), Hermes().parser(functions, prompt="", reasoning=False)
    )
    out.codes = codes  # type: ignore[attr-defined]
    return out


def run(text: str, upto: int | None = None) -> list:
    out = pipeline(TEXT)
    events = []
    for ch in text[:upto]:
        events += out.token(out.codes[ch])  # type: ignore[attr-defined]
    return events + out.finish()


def test_a_call_ends_with_its_arguments_parsed():
    events = run(TEXT)
    start = next(e for e in events if isinstance(e, ToolCallStart))
    text = "".join(e.arguments for e in events if isinstance(e, ToolCallDelta))
    (end,) = [e for e in events if isinstance(e, ToolCallEnd)]
    assert start.name == "f" and end.index == start.index
    assert end.parsed == {"city": "Oslo", "n": [1, 2]}
    assert text.replace(" ", "") == '{"city":"Oslo","n":[1,2]}'


def test_a_call_cut_off_has_no_parsed_arguments():
    events = run(TEXT, upto=TEXT.index('"n"'))
    ends = [e for e in events if isinstance(e, ToolCallEnd)]
    assert ends and ends[-1].parsed is None


def test_a_generation_the_server_cancels_is_an_error_not_length():
    async def run() -> list:
        stream = TokenStream(asyncio.get_running_loop())
        output = OutputPipeline(TextAssembler({0: b"a"}.__getitem__), None)
        gen = Generation(SimpleNamespace(meter=None), 3, stream, output)  # type: ignore[arg-type]
        stream.put(Token(0))
        stream.put(Finished("cancelled", 1))
        seen = []
        with pytest.raises(GenerationCancelled):
            async for event in gen.events():
                seen.append(event)
        return seen

    seen = asyncio.run(run())
    assert seen == [TextDelta("a")]
    assert not any(isinstance(e, Done) for e in seen)
