"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlxserve import __version__
from mlxserve.core import generate
from mlxserve.core.generate import Generation
from mlxserve.core.registry import ModelInfo
from mlxserve.core.types import Done, Idle, TextDelta
from mlxserve.errors import MlxServeError, ModelNotFound
from mlxserve.protocols.openai import ChatCompletionRequest, CompletionRequest
from mlxserve.routes.common import (
    EventStreamResponse,
    openai_error_body,
    parse,
    read_json,
    sse,
    unless_disconnected,
)
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
    models = [_model_object(m) for m in state.registry.scan()]
    return JSONResponse({"object": "list", "data": models})


async def get_model(request: Request) -> Response:
    state: AppState = request.app.state.mlxserve
    key = request.path_params["model"]
    info = state.registry.get(key)
    if info is None:
        raise ModelNotFound(key)
    return JSONResponse(_model_object(info))


def _usage(done: Done) -> dict[str, int]:
    return {
        "prompt_tokens": done.usage.prompt_tokens,
        "completion_tokens": done.usage.completion_tokens,
        "total_tokens": done.usage.total_tokens,
    }


async def _collect(gen: Generation) -> tuple[str, Done]:
    parts: list[str] = []
    async for event in gen.events():
        if isinstance(event, TextDelta):
            parts.append(event.text)
        elif isinstance(event, Done):
            return "".join(parts), event
    raise MlxServeError("generation ended without a result")


async def _stream(
    gen: Generation,
    chunk: Callable[[str | None, str | None], dict[str, Any]],
    include_usage: bool,
    ping_seconds: float,
) -> AsyncIterator[str]:
    """OpenAI SSE: an opening chunk, text chunks, a finish chunk, an optional usage chunk,
    then ``[DONE]``. An error after the stream has started is sent as an ``error`` object
    and the stream ends without ``[DONE]``."""
    try:
        yield sse(chunk(None, None))
        async for event in gen.events(ping_seconds):
            if isinstance(event, TextDelta):
                yield sse(chunk(event.text, None))
            elif isinstance(event, Idle):
                yield ": ping\n\n"
            elif isinstance(event, Done):
                yield sse(chunk(None, event.finish_reason))
                if include_usage:
                    final = chunk(None, None)
                    final["choices"] = []
                    final["usage"] = _usage(event)
                    yield sse(final)
        yield sse("[DONE]")
    except MlxServeError as exc:
        yield sse(openai_error_body(exc))
    finally:
        gen.cancel()


async def chat_completions(request: Request) -> Response:
    state: AppState = request.app.state.mlxserve
    body = parse(ChatCompletionRequest, await read_json(request))
    gen = await generate.start(state.manager, body.to_core(state.settings.default_temperature))
    cid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), gen.instance.id

    if body.stream:
        opened = False

        def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
            nonlocal opened
            delta: dict[str, Any] = {}
            if not opened:
                delta, opened = {"role": "assistant", "content": ""}, True
            elif text is not None:
                delta = {"content": text}
            out: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": FINGERPRINT,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }
            if body.include_usage:
                out["usage"] = None
            return out

        return EventStreamResponse(
            _stream(gen, chunk, body.include_usage, state.settings.sse_ping_seconds)
        )

    result = await unless_disconnected(request, _collect(gen))
    if result is None:
        return Response(status_code=204)
    text, done = result
    return JSONResponse(
        {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": FINGERPRINT,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": done.finish_reason,
                }
            ],
            "usage": _usage(done),
        }
    )


async def completions(request: Request) -> Response:
    state: AppState = request.app.state.mlxserve
    body = parse(CompletionRequest, await read_json(request))
    gen = await generate.start(state.manager, body.to_core(state.settings.default_temperature))
    cid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), gen.instance.id

    def envelope(choice: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": FINGERPRINT,
            "choices": [choice],
        }

    if body.stream:

        def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
            out = envelope(
                {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            )
            if body.include_usage:
                out["usage"] = None
            return out

        return EventStreamResponse(
            _stream(gen, chunk, body.include_usage, state.settings.sse_ping_seconds)
        )

    result = await unless_disconnected(request, _collect(gen))
    if result is None:
        return Response(status_code=204)
    text, done = result
    out = envelope(
        {"index": 0, "text": text, "logprobs": None, "finish_reason": done.finish_reason}
    )
    out["usage"] = _usage(done)
    return JSONResponse(out)


routes = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
]
