"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

import codecs
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlxserve import __version__
from mlxserve.core import generate
from mlxserve.core.generate import Generation
from mlxserve.core.instance import Loaded
from mlxserve.core.registry import ModelInfo
from mlxserve.core.types import (
    Candidate,
    Done,
    Event,
    Idle,
    ReasoningDelta,
    TextDelta,
    TokenLogprob,
    ToolCallDelta,
    ToolCallStart,
)
from mlxserve.errors import MlxServeError, ModelNotFound
from mlxserve.http.errors import as_mlxserve_error, openai_error_body
from mlxserve.http.sse import EventStreamResponse, sse
from mlxserve.protocols.openai import ChatCompletionRequest, CompletionRequest
from mlxserve.routes.common import parse, read_json, unless_disconnected
from mlxserve.state import AppState

FINGERPRINT = f"mlxserve-{__version__}"


def _model_object(info: ModelInfo) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "id": info.key,
        "object": "model",
        "created": int(info.path.stat().st_mtime),
        "owned_by": info.publisher,
    }
    if info.description:
        obj["description"] = info.description
    return obj


async def list_models(request: Request) -> Response:
    state: AppState = request.app.state.mlxserve
    if state.settings.jit_loading:
        models = [_model_object(m) for m in await state.registry.models()]
    else:
        # Without JIT only loaded models can answer, so only they are listed (LM Studio).
        loaded: list[Loaded] = [*state.manager.loaded(), *state.manager.loaded_embedders()]
        models = [_model_object(i.info) | {"id": i.id} for i in loaded]
    return JSONResponse({"object": "list", "data": models})


async def get_model(request: Request) -> Response:
    state: AppState = request.app.state.mlxserve
    key = request.path_params["model"]
    info = await state.registry.find(key)
    if info is None:
        raise ModelNotFound(key)
    return JSONResponse(_model_object(info))


def usage_body(done: Done) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": done.usage.prompt_tokens,
        "completion_tokens": done.usage.completion_tokens,
        "total_tokens": done.usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": done.usage.cached_tokens},
    }
    if done.usage.reasoning_tokens:
        usage["completion_tokens_details"] = {"reasoning_tokens": done.usage.reasoning_tokens}
    return usage


@dataclass
class Reply:
    """A whole reply, gathered from the events."""

    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    # None unless the request asked for log probabilities.
    logprobs: list[TokenLogprob] | None = None

    def add(self, event: Event) -> None:
        if isinstance(event, TokenLogprob):
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.append(event)
        elif isinstance(event, TextDelta):
            self.text.append(event.text)
        elif isinstance(event, ReasoningDelta):
            self.reasoning.append(event.text)
        elif isinstance(event, ToolCallStart):
            self.calls[event.index] = {
                "id": event.id,
                "type": "function",
                "function": {"name": event.name, "arguments": ""},
            }
        elif isinstance(event, ToolCallDelta):
            self.calls[event.index]["function"]["arguments"] += event.arguments

    def message(self) -> dict[str, Any]:
        content = "".join(self.text)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": content if content or not self.calls else None,
        }
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.calls:
            message["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
        return message


def _candidate(c: Candidate) -> dict[str, Any]:
    return {"token": c.token, "logprob": c.logprob, "bytes": list(c.bytes)}


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    """A chat choice's ``logprobs``: the sampled token first, its alternatives sorted."""
    content = [
        _candidate(e.sampled) | {"top_logprobs": [_candidate(c) for c in e.top]} for e in entries
    ]
    return {"content": content, "refusal": None}


class CompletionLogprobs:
    """A text completion's ``logprobs`` (the legacy shape: parallel lists), chunk by chunk.

    ``text_offset`` is where each token's text starts in prompt + completion, in characters,
    as OpenAI's is (without ``echo`` too: the first token's offset is the prompt's length). A
    character split over several tokens counts once it is whole, so the offset of a token
    that ends inside one is where that character starts."""

    def __init__(self, prompt: str) -> None:
        self._offset = len(prompt)
        self._chars = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def render(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        offsets = []
        for e in entries:
            offsets.append(self._offset)
            self._offset += len(self._chars.decode(e.sampled.bytes))
        return {
            "tokens": [e.sampled.token for e in entries],
            "token_logprobs": [e.sampled.logprob for e in entries],
            "top_logprobs": [{c.token: c.logprob for c in e.top} for e in entries],
            "text_offset": offsets,
        }


async def _collect(gen: Generation, logprobs: bool = False) -> tuple[Reply, Done]:
    reply = Reply(logprobs=[] if logprobs else None)
    async for event in gen.events():
        if isinstance(event, Done):
            return reply, event
        reply.add(event)
    raise MlxServeError("generation ended without a result")


def _chat_delta(event: Event) -> dict[str, Any] | None:
    """The chunk delta for one event (OpenAI's streamed tool-call shape: the first chunk of a
    call has its index, id, type and name with empty arguments; then argument fragments)."""
    if isinstance(event, TextDelta):
        return {"content": event.text}
    if isinstance(event, ReasoningDelta):
        return {"reasoning_content": event.text}
    if isinstance(event, ToolCallStart):
        call = {
            "index": event.index,
            "id": event.id,
            "type": "function",
            "function": {"name": event.name, "arguments": ""},
        }
        return {"tool_calls": [call]}
    if isinstance(event, ToolCallDelta):
        return {"tool_calls": [{"index": event.index, "function": {"arguments": event.arguments}}]}
    return None


def _completion_delta(event: Event) -> dict[str, Any] | None:
    return {"text": event.text} if isinstance(event, TextDelta) else None


async def _stream(
    gen: Generation,
    envelope: Callable[[dict[str, Any]], dict[str, Any]],
    choice: Callable[[Event | None, str | None], dict[str, Any] | None],
    opening: dict[str, Any] | None,
    include_usage: bool,
    ping_seconds: float,
    logprobs: Callable[[list[TokenLogprob]], dict[str, Any]] | None = None,
) -> AsyncIterator[str]:
    """OpenAI SSE: an opening chunk, one chunk per event, a finish chunk, an optional usage
    chunk, then ``[DONE]``. An error after the stream has started is sent as an ``error``
    object and the stream ends without ``[DONE]``. Log probabilities ride on the next chunk
    after their token (its text may be held back a while), the rest on the finish chunk."""
    pending: list[TokenLogprob] = []

    def with_logprobs(part: dict[str, Any]) -> dict[str, Any]:
        if logprobs is not None and pending:
            part = part | {"logprobs": logprobs(pending)}
            pending.clear()
        return part

    try:
        if opening is not None:
            yield sse(envelope(opening))
        async for event in gen.events(ping_seconds):
            if isinstance(event, Idle):
                yield ": ping\n\n"
            elif isinstance(event, TokenLogprob):
                pending.append(event)
            elif isinstance(event, Done):
                yield sse(envelope(with_logprobs(choice(None, event.finish_reason) or {})))
                if include_usage:
                    final = envelope({})
                    final["choices"] = []
                    final["usage"] = usage_body(event)
                    yield sse(final)
            else:
                part = choice(event, None)
                if part is not None:
                    yield sse(envelope(with_logprobs(part)))
        yield sse("[DONE]")
    except Exception as exc:  # whatever fails, the client gets the dialect's error event
        yield sse(openai_error_body(as_mlxserve_error(exc)))
    finally:
        gen.cancel()


def _envelope(
    kind: str, cid: str, created: int, model: str, include_usage: bool
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def wrap(choice: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": cid,
            "object": kind,
            "created": created,
            "model": model,
            "system_fingerprint": FINGERPRINT,
            "choices": [choice] if choice else [],
        }
        if include_usage:
            out["usage"] = None
        return out

    return wrap


def chat_completion_body(
    cid: str, created: int, model: str, reply: Reply, done: Done
) -> dict[str, Any]:
    """A whole (not streamed) chat completion."""
    choice = {
        "index": 0,
        "message": reply.message(),
        "logprobs": None if reply.logprobs is None else chat_logprobs(reply.logprobs),
        "finish_reason": done.finish_reason,
    }
    return _envelope("chat.completion", cid, created, model, False)(choice) | {
        "usage": usage_body(done)
    }


def text_completion_body(
    cid: str, created: int, model: str, reply: Reply, done: Done, prompt: str
) -> dict[str, Any]:
    """A whole (not streamed) text completion of ``prompt``."""
    logprobs = None
    if reply.logprobs is not None:
        logprobs = CompletionLogprobs(prompt).render(reply.logprobs)
    choice = {
        "index": 0,
        "text": "".join(reply.text),
        "logprobs": logprobs,
        "finish_reason": done.finish_reason,
    }
    return _envelope("text_completion", cid, created, model, False)(choice) | {
        "usage": usage_body(done)
    }


async def chat_completions(request: Request) -> Response:
    state: AppState = request.app.state.mlxserve
    body = parse(ChatCompletionRequest, await read_json(request))
    gen = await generate.start(state.manager, body.to_core(state.settings.default_temperature))
    cid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), gen.instance.id

    if body.stream:

        def choice(event: Event | None, finish: str | None) -> dict[str, Any] | None:
            delta = {} if event is None else _chat_delta(event)
            if delta is None:
                return None
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        opening = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        envelope = _envelope("chat.completion.chunk", cid, created, model, body.include_usage)
        return EventStreamResponse(
            _stream(
                gen,
                envelope,
                choice,
                opening,
                body.include_usage,
                state.settings.sse_ping_seconds,
                chat_logprobs if body.logprobs else None,
            ),
            on_close=gen.cancel,
        )

    result = await unless_disconnected(request, _collect(gen, bool(body.logprobs)))
    if result is None:
        return Response(status_code=204)
    return JSONResponse(chat_completion_body(cid, created, model, *result))


async def completions(request: Request) -> Response:
    state: AppState = request.app.state.mlxserve
    body = parse(CompletionRequest, await read_json(request))
    gen = await generate.start(state.manager, body.to_core(state.settings.default_temperature))
    cid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), gen.instance.id

    if body.stream:

        def choice(event: Event | None, finish: str | None) -> dict[str, Any] | None:
            part = {"text": ""} if event is None else _completion_delta(event)
            if part is None:
                return None
            return {"index": 0, **part, "logprobs": None, "finish_reason": finish}

        envelope = _envelope("text_completion", cid, created, model, body.include_usage)
        assert isinstance(body.prompt, str)
        rendered = CompletionLogprobs(body.prompt).render
        return EventStreamResponse(
            _stream(
                gen,
                envelope,
                choice,
                None,
                body.include_usage,
                state.settings.sse_ping_seconds,
                rendered if body.logprobs is not None else None,
            ),
            on_close=gen.cancel,
        )

    result = await unless_disconnected(request, _collect(gen, body.logprobs is not None))
    if result is None:
        return Response(status_code=204)
    reply, done = result
    assert isinstance(body.prompt, str)
    return JSONResponse(text_completion_body(cid, created, model, reply, done, body.prompt))


routes = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
]
