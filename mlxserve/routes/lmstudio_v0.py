"""LM Studio's legacy REST API v0 (``/api/v0/*``): model listing with load state, and the
OpenAI chat and text completions with LM Studio's ``stats``, ``model_info`` and ``runtime``
objects added. Streams are the OpenAI ones. (``/api/v0/embeddings`` is in routes.embeddings.)"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlxserve.core import generate
from mlxserve.core.generate import Generation
from mlxserve.core.instance import Loaded
from mlxserve.core.registry import ModelInfo
from mlxserve.core.types import Done, Event, Progress, ReasoningDelta, TextDelta, ToolCallStart
from mlxserve.errors import MlxServeError
from mlxserve.protocols.openai import ChatCompletionRequest, CompletionRequest
from mlxserve.routes import openai
from mlxserve.routes.common import parse, read_json, unless_disconnected
from mlxserve.state import AppState

_RUNTIMES = {"mlx": ("mlx-lm", "mlx-lm"), "gguf": ("llama.cpp", "llama_cpp_python")}


def model_entry(info: ModelInfo, instances: list[Loaded]) -> dict[str, Any]:
    """One model as ``GET /api/v0/models`` lists it."""
    entry: dict[str, Any] = {
        "id": info.key,
        "object": "model",
        "type": "embeddings" if info.type == "embedding" else "vlm" if info.vision else "llm",
        "publisher": info.publisher,
        "arch": info.architecture,
        "compatibility_type": info.format,
        "quantization": info.quantization,
        "state": "loaded" if instances else "not-loaded",
        "max_context_length": info.max_context_length,
    }
    if instances:
        entry["loaded_context_length"] = instances[0].context_length
        # Ours: what the loading guardrail counts for its loaded instances together.
        entry["loaded_memory_bytes"] = sum(i.memory_bytes for i in instances)
    entry["capabilities"] = ["tool_use"] if info.trained_for_tool_use else []
    return entry


async def list_models(request: Request) -> Response:
    state: AppState = request.app.state.mlxserve
    models = [
        model_entry(m, state.manager.instances_of(m.key)) for m in await state.registry.models()
    ]
    return JSONResponse({"object": "list", "data": models})


async def get_model(request: Request) -> Response:
    state: AppState = request.app.state.mlxserve
    info = await state.manager.find_model(request.path_params["model"])
    return JSONResponse(model_entry(info, state.manager.instances_of(info.key)))


def _runtime(fmt: str) -> dict[str, Any]:
    name, dist = _RUNTIMES[fmt]
    try:
        version = metadata.version(dist)
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {"name": name, "version": version, "supported_formats": [fmt]}


@dataclass
class _Timed:
    """A whole reply with LM Studio's timings."""

    started: float
    reply: openai.Reply = field(default_factory=openai.Reply)
    first_at: float | None = None
    ended: float = 0.0
    done: Done | None = None

    def add(self, event: Event) -> None:
        if isinstance(event, Progress):
            return
        if self.first_at is None and isinstance(event, (TextDelta, ReasoningDelta, ToolCallStart)):
            self.first_at = time.perf_counter()
        if isinstance(event, Done):
            self.done = event
            self.ended = time.perf_counter()
        else:
            self.reply.add(event)

    def extras(self, gen: Generation) -> dict[str, Any]:
        assert self.done is not None
        first = self.first_at if self.first_at is not None else self.ended
        generation_time = max(self.ended - first, 0.0)
        tokens = self.done.usage.completion_tokens
        if self.done.finish_reason == "tool_calls":
            stop_reason = "toolCalls"
        elif self.done.finish_reason == "length":
            stop_reason = "maxPredictedTokensReached"
        elif self.done.stop_sequence is not None:
            stop_reason = "stopStringFound"
        else:
            stop_reason = "eosFound"
        info = gen.instance.info
        return {
            "stats": {
                "tokens_per_second": tokens / generation_time if generation_time > 0 else 0.0,
                "time_to_first_token": round(first - self.started, 3),
                "generation_time": round(generation_time, 3),
                "stop_reason": stop_reason,
                # Of usage.prompt_tokens, those served from the prompt cache, named the way
                # the stats' draft counts are.
                "cached_prompt_tokens_count": self.done.usage.cached_tokens,
                **_draft_stats(self.done),
            },
            "model_info": {
                "arch": info.architecture,
                "quant": info.quantization,
                "format": info.format,
                "context_length": gen.instance.context_length,
            },
            "runtime": _runtime(info.format),
        }


def _draft_stats(done: Done) -> dict[str, Any]:
    """LM Studio's speculative-decoding stats, when a draft model proposed tokens."""
    if done.draft is None or done.draft_model is None:
        return {}
    d = done.draft
    return {
        "draft_model": done.draft_model,
        "total_draft_tokens_count": d.total,
        "accepted_draft_tokens_count": d.accepted,
        "rejected_draft_tokens_count": d.rejected,
        "ignored_draft_tokens_count": d.ignored,
    }


async def _run(gen: Generation, started: float) -> _Timed:
    timed = _Timed(started)
    async for event in gen.events():
        timed.add(event)
        if timed.done is not None:
            return timed
    raise MlxServeError("generation ended without a result")


async def _whole(request: Request, gen: Generation, started: float) -> _Timed | None:
    try:
        return await unless_disconnected(request, _run(gen, started))
    finally:
        gen.cancel()


async def _v0(
    request: Request,
    model: type[ChatCompletionRequest] | type[CompletionRequest],
    streamed: Callable[[Request], Awaitable[Response]],
    render: Callable[[Any, str, int, str, openai.Reply, Done], dict[str, Any]],
    prefix: str,
) -> Response:
    """The OpenAI shape plus v0's ``stats``, ``model_info`` and ``runtime``; streams are the
    OpenAI route's."""
    state: AppState = request.app.state.mlxserve
    body = parse(model, await read_json(request))
    if body.stream:
        return await streamed(request)
    started = time.perf_counter()
    gen = await generate.start(state.manager, body.to_core(state.settings.default_temperature))
    timed = await _whole(request, gen, started)
    if timed is None or timed.done is None:
        return Response(status_code=204)
    cid = f"{prefix}-{uuid.uuid4().hex}"
    out = render(body, cid, int(time.time()), gen.instance.id, timed.reply, timed.done)
    return JSONResponse(out | timed.extras(gen))


def _chat_body(
    body: ChatCompletionRequest, cid: str, created: int, model: str, reply: openai.Reply, done: Done
) -> dict[str, Any]:
    return openai.chat_completion_body(cid, created, model, reply, done)


def _text_body(
    body: CompletionRequest, cid: str, created: int, model: str, reply: openai.Reply, done: Done
) -> dict[str, Any]:
    assert isinstance(body.prompt, str)
    return openai.text_completion_body(cid, created, model, reply, done, body.prompt)


async def chat_completions(request: Request) -> Response:
    return await _v0(
        request, ChatCompletionRequest, openai.chat_completions, _chat_body, "chatcmpl"
    )


async def completions(request: Request) -> Response:
    return await _v0(request, CompletionRequest, openai.completions, _text_body, "cmpl")


routes = [
    Route("/api/v0/models", list_models, methods=["GET"]),
    Route("/api/v0/models/{model:path}", get_model, methods=["GET"]),
    Route("/api/v0/chat/completions", chat_completions, methods=["POST"]),
    Route("/api/v0/completions", completions, methods=["POST"]),
]
