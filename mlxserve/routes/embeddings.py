"""Embeddings: OpenAI's ``POST /v1/embeddings`` and LM Studio's ``POST /api/v0/embeddings``
(the same request and response)."""

from __future__ import annotations

import base64
import threading
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlxserve.core.embeddings import Embeddings, EmbeddingsCancelled, embed
from mlxserve.protocols.embeddings import EmbeddingRequest
from mlxserve.routes.common import parse, read_json, unless_disconnected
from mlxserve.state import AppState


def _vector(v: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        # OpenAI's format: the little-endian float32 bytes, base64-encoded.
        return base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
    return v.tolist()


def render(result: Embeddings, encoding: str) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _vector(v, encoding)}
            for i, v in enumerate(result.vectors)
        ],
        "model": result.model,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }


async def embeddings(request: Request) -> Response:
    state: AppState = request.app.state.mlxserve
    body = parse(EmbeddingRequest, await read_json(request))
    core = body.to_core()
    cancel = threading.Event()
    try:
        result = await unless_disconnected(request, embed(state.manager, core, cancel))
    except EmbeddingsCancelled:
        result = None
    finally:
        # The client is gone (or the work is done): drop what the engine has not started.
        cancel.set()
    if result is None:
        return Response(status_code=204)
    return JSONResponse(render(result, body.encoding_format))


routes = [
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/api/v0/embeddings", embeddings, methods=["POST"]),
]
