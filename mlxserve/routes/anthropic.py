"""Anthropic Messages API: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

An adapter over the one generation path: the core's events are cut into content blocks by
:class:`~mlxserve.routes.blocks.Blocks` and rendered as Anthropic's named SSE events or one
message. ``x-api-key`` and ``anthropic-version`` headers are accepted and ignored; errors use
Anthropic's envelope (``error_body_for`` renders every ``/v1/messages*`` path that way).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlxserve.core import generate
from mlxserve.core.generate import Generation
from mlxserve.core.sealed import ReasoningSeal
from mlxserve.core.types import CoreRequest, Done, Event, Idle
from mlxserve.errors import InvalidRequest, MlxServeError
from mlxserve.http.errors import anthropic_error_body, as_mlxserve_error
from mlxserve.http.sse import EventStreamResponse, sse
from mlxserve.protocols.anthropic import CountTokensRequest, MessagesRequest
from mlxserve.routes.blocks import Appended, Block, Blocks, Change, Opened, gather
from mlxserve.routes.common import parse, read_json, unless_disconnected
from mlxserve.state import AppState

NamedEvent = tuple[str, dict[str, Any]]

# The core names request fields as chat completions does; say them as this API does.
_FIELDS = {"response_format": "output_config.format", "reasoning": "thinking"}

_DELTA = {"text": ("text_delta", "text"), "reasoning": ("thinking_delta", "thinking")}


def stop_reason(done: Done) -> str:
    if done.finish_reason == "tool_calls":
        return "tool_use"
    if done.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if done.stop_sequence is not None else "end_turn"


def _tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def _content_block(
    block: Block, *, whole: bool, seal: ReasoningSeal, show_thinking: bool = True
) -> dict[str, Any]:
    if block.kind == "text":
        return {"type": "text", "text": block.text if whole else ""}
    if block.kind == "reasoning":
        # The signature seals the thinking, so that it comes back whole next turn even when
        # the client was shown none of it.
        return {
            "type": "thinking",
            "thinking": block.text if whole and show_thinking else "",
            "signature": seal.seal(block.text) if whole else "",
        }
    return {
        "type": "tool_use",
        "id": _tool_use_id(block.call_id),
        "name": block.name,
        # A call cut off by max_tokens has no complete JSON object: ``{}``.
        "input": (block.parsed or {}) if whole else {},
    }


class MessageRenderer:
    """One reply, as Anthropic stream events or as one message object; both go through the
    same blocks, so they agree."""

    def __init__(
        self, model: str, prompt_tokens: int, seal: ReasoningSeal, *, show_thinking: bool = True
    ) -> None:
        self.id = f"msg_{uuid.uuid4().hex}"
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.seal = seal
        # Thinking display "omitted": thinking blocks carry only their signature.
        self.show_thinking = show_thinking
        self.blocks = Blocks()
        self.done: Done | None = None
        self._pinged = False

    def _input_usage(self) -> dict[str, int]:
        """Anthropic splits the prompt in three that add up to it: read from the prompt cache,
        computed and written to it (kept for a later request), and the rest."""
        usage = self.done.usage if self.done else None
        cached = usage.cached_tokens if usage else 0
        written = usage.cache_written if usage else 0
        return {
            "input_tokens": self.prompt_tokens - cached - written,
            "cache_creation_input_tokens": written,
            "cache_read_input_tokens": cached,
        }

    def _usage(self) -> dict[str, Any]:
        return {
            **self._input_usage(),
            "output_tokens": self.done.usage.completion_tokens if self.done else 0,
        }

    def _block(self, block: Block, *, whole: bool) -> dict[str, Any]:
        return _content_block(block, whole=whole, seal=self.seal, show_thinking=self.show_thinking)

    def message(self) -> dict[str, Any]:
        done = self.done
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [self._block(b, whole=True) for b in self.blocks.blocks] if done else [],
            "stop_reason": stop_reason(done) if done else None,
            "stop_sequence": done.stop_sequence if done else None,
            "usage": self._usage(),
        }

    def start(self) -> NamedEvent:
        return "message_start", {"type": "message_start", "message": self.message()}

    def feed(self, event: Event) -> list[NamedEvent]:
        return self._render(self.blocks.feed(event))

    def finish(self, done: Done) -> list[NamedEvent]:
        """Close the open block, then ``message_delta`` (cumulative usage) and ``message_stop``."""
        self.done = done
        out = self._render(self.blocks.finish())
        delta = {"stop_reason": stop_reason(done), "stop_sequence": done.stop_sequence}
        usage = {**self._input_usage(), "output_tokens": done.usage.completion_tokens}
        out.append(("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}))
        out.append(("message_stop", {"type": "message_stop"}))
        return out

    def _render(self, changes: list[Change]) -> list[NamedEvent]:
        out: list[NamedEvent] = []
        for change in changes:
            block = change.block
            if isinstance(change, Opened):
                start = {
                    "type": "content_block_start",
                    "index": block.index,
                    "content_block": self._block(block, whole=False),
                }
                out.append(("content_block_start", start))
                if not self._pinged:
                    self._pinged = True
                    out.append(("ping", {"type": "ping"}))
                continue
            if isinstance(change, Appended):
                if block.kind == "reasoning" and not self.show_thinking:
                    continue
                if block.kind == "tool":
                    delta = {"type": "input_json_delta", "partial_json": change.text}
                else:
                    kind, key = _DELTA[block.kind]
                    delta = {"type": kind, key: change.text}
                event = {"type": "content_block_delta", "index": block.index, "delta": delta}
                out.append(("content_block_delta", event))
                continue
            if block.kind == "reasoning":
                signature = {"type": "signature_delta", "signature": self.seal.seal(block.text)}
                event = {"type": "content_block_delta", "index": block.index, "delta": signature}
                out.append(("content_block_delta", event))
            stop = {"type": "content_block_stop", "index": block.index}
            out.append(("content_block_stop", stop))
        return out


def _in_our_terms(exc: InvalidRequest, model: str) -> InvalidRequest:
    """``exc`` naming this API's field (Anthropic's envelope has no ``param``: the message
    names it)."""
    field = _FIELDS.get(exc.param or "", exc.param)
    if exc.param == "reasoning":
        exc.message = f"Model '{model}' does not think; leave 'thinking' out or disable it."
    if field:
        exc.param = field
        exc.message = f"Invalid value for '{field}': {exc.message}"
    return exc


async def _start(state: AppState, core: CoreRequest) -> Generation:
    try:
        return await generate.start(state.manager, core)
    except InvalidRequest as exc:
        raise _in_our_terms(exc, core.model) from None


async def _stream(
    gen: Generation, renderer: MessageRenderer, ping_seconds: float
) -> AsyncIterator[str]:
    """Anthropic SSE: ``message_start`` ... ``message_stop``; a failure after the start is an
    ``error`` event and the stream ends there."""
    try:
        yield sse(renderer.start()[1], "message_start")
        async for event in gen.events(ping_seconds):
            if isinstance(event, Idle):
                yield sse({"type": "ping"}, "ping")
                continue
            named = renderer.finish(event) if isinstance(event, Done) else renderer.feed(event)
            for name, data in named:
                yield sse(data, name)
            if isinstance(event, Done):
                return
    except Exception as exc:  # whatever fails, the client gets the dialect's error event
        yield sse(anthropic_error_body(as_mlxserve_error(exc)), "error")
    finally:
        gen.cancel()


async def messages(request: Request) -> Response:
    state: AppState = request.app.state.mlxserve
    body = parse(MessagesRequest, await read_json(request))
    gen = await _start(state, body.to_core(state.settings.default_temperature, state.seal))
    show = not (body.thinking and body.thinking.display == "omitted")
    renderer = MessageRenderer(gen.instance.id, gen.prompt_tokens, state.seal, show_thinking=show)
    if body.stream:
        return EventStreamResponse(
            _stream(gen, renderer, state.settings.sse_ping_seconds), on_close=gen.cancel
        )

    finished = await unless_disconnected(request, gather(gen, renderer))
    if finished is None:
        return Response(status_code=204)
    if not finished:
        raise MlxServeError("generation ended without a result")
    return JSONResponse(renderer.message())


async def count_tokens(request: Request) -> Response:
    state: AppState = request.app.state.mlxserve
    body = parse(CountTokensRequest, await read_json(request))
    core = body.to_core(state.settings.default_temperature, state.seal)
    try:
        count = await generate.count_prompt_tokens(state.manager, core)
    except InvalidRequest as exc:
        raise _in_our_terms(exc, core.model) from None
    return JSONResponse({"input_tokens": count})


routes = [
    Route("/v1/messages", messages, methods=["POST"]),
    Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
]
