"""Routes the command line uses to watch the server: loaded instances (``mlxserve ps``) and
the live request log (``mlxserve log stream``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlxserve.core.instance import Loaded, memory_report
from mlxserve.http.sse import EventStreamResponse, sse
from mlxserve.state import AppState


def _instance(state: AppState, instance: Loaded) -> dict[str, Any]:
    ttl_left = state.manager.ttl_left(instance)
    return {
        "id": instance.id,
        "model": instance.info.key,
        "type": instance.info.type,
        "format": instance.info.format,
        "context_length": instance.context_length,
        "ttl_seconds": instance.ttl,
        "ttl_left_seconds": round(ttl_left, 1) if ttl_left is not None else None,
        "jit": instance.jit,
        "memory_bytes": instance.memory_bytes,
        "memory": memory_report(instance),
        "size_bytes": instance.info.size_bytes,
        "pending": instance.engine.pending,
        "load_config": dict(instance.load_config),
    }


async def loaded(request: Request) -> Response:
    state: AppState = request.app.state.mlxserve
    instances: list[Loaded] = [*state.manager.loaded(), *state.manager.loaded_embedders()]
    return JSONResponse({"instances": [_instance(state, i) for i in instances]})


async def _log_events(state: AppState) -> AsyncIterator[str]:
    ping = state.settings.sse_ping_seconds or None
    async with state.logbus.subscribe() as queue:
        yield sse({"type": "log.start"})
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), ping)
            except asyncio.TimeoutError:
                yield ": ping\n\n"
                continue
            yield sse(event)


async def log_stream(request: Request) -> Response:
    state: AppState = request.app.state.mlxserve
    return EventStreamResponse(_log_events(state))


routes = [
    Route("/api/v1/models/loaded", loaded, methods=["GET"]),
    Route("/api/v1/logs/stream", log_stream, methods=["GET"]),
]
