"""The core event stream cut into content blocks, for the dialects whose replies are a list of
typed blocks that open, grow and close: Anthropic content blocks and Responses output items.

One segmentation, two renderings: both routes feed the same events through :class:`Blocks` and
only translate its changes into their own wire events, streamed or gathered.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from mlxserve.core.types import (
    Done,
    Event,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
)

Kind = Literal["reasoning", "text", "tool"]


@dataclass
class Block:
    """One block: its position, kind and text so far (a tool call's text is its arguments)."""

    index: int
    kind: Kind
    text: str = ""
    call_id: str = ""
    name: str = ""
    # A tool call's arguments as the core parsed them (None: not a JSON object).
    parsed: dict[str, Any] | None = None


@dataclass(frozen=True)
class Opened:
    block: Block


@dataclass(frozen=True)
class Appended:
    block: Block
    text: str


@dataclass(frozen=True)
class Closed:
    block: Block


Change = Opened | Appended | Closed


class Blocks:
    """Reasoning, text and tool calls become consecutive blocks; a change of kind closes the
    open block. Whitespace-only text is held back until real text follows, so the newlines a
    model writes around its tool calls do not become empty-looking text blocks; a reply with
    no tool calls keeps it."""

    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self._open: Block | None = None
        self._held = ""

    @property
    def has_tool_calls(self) -> bool:
        return any(b.kind == "tool" for b in self.blocks)

    def feed(self, event: Event) -> list[Change]:
        out: list[Change] = []
        if isinstance(event, ReasoningDelta):
            self._append(out, "reasoning", event.text)
        elif isinstance(event, TextDelta):
            if self._open is not None and self._open.kind == "text":
                self._append(out, "text", event.text)
            elif not event.text.strip():
                self._held += event.text
            else:
                text, self._held = self._held + event.text, ""
                self._append(out, "text", text)
        elif isinstance(event, ToolCallStart):
            self._close(out)
            self._held = ""
            self._start(out, Block(len(self.blocks), "tool", call_id=event.id, name=event.name))
        elif isinstance(event, ToolCallDelta):
            if self._open is not None and self._open.kind == "tool" and event.arguments:
                self._open.text += event.arguments
                out.append(Appended(self._open, event.arguments))
        elif isinstance(event, ToolCallEnd):
            if self._open is not None and self._open.kind == "tool":
                self._open.parsed = event.parsed
            self._close(out)
        return out

    def finish(self) -> list[Change]:
        """Close what is open. Whitespace still held becomes text unless tools were called;
        a reply with no blocks at all gets one empty text block, as clients expect content."""
        out: list[Change] = []
        if (self._held and not self.has_tool_calls) or not self.blocks:
            text, self._held = self._held, ""
            self._append(out, "text", text)
        self._close(out)
        return out

    def _start(self, out: list[Change], block: Block) -> None:
        self.blocks.append(block)
        self._open = block
        out.append(Opened(block))

    def _append(self, out: list[Change], kind: Literal["reasoning", "text"], text: str) -> None:
        if self._open is None or self._open.kind != kind:
            self._close(out)
            self._start(out, Block(len(self.blocks), kind))
        assert self._open is not None
        if text:
            self._open.text += text
            out.append(Appended(self._open, text))

    def _close(self, out: list[Change]) -> None:
        if self._open is not None:
            out.append(Closed(self._open))
            self._open = None


class Renderer(Protocol):
    def feed(self, event: Any) -> Any: ...

    def finish(self, done: Done) -> Any: ...


class Source(Protocol):
    """A generation, or the MCP tool loop around several."""

    def events(self) -> AsyncIterator[Any]: ...

    def cancel(self) -> None: ...


async def gather(gen: Source, renderer: Renderer) -> bool:
    """Run ``gen`` to its end through ``renderer`` (a reply that is not streamed); False if it
    ended without a result."""
    try:
        async for event in gen.events():
            if isinstance(event, Done):
                renderer.finish(event)
                return True
            renderer.feed(event)
    finally:
        gen.cancel()
    return False
