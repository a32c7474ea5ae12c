"""The ASGI application."""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlxserve import __version__, versions
from mlxserve import openapi as api_description
from mlxserve.core import heap
from mlxserve.errors import MlxServeError
from mlxserve.http.errors import error_response
from mlxserve.http.middleware import (
    AuthMiddleware,
    BodyLimitMiddleware,
    CORSMiddleware,
    HostGuardMiddleware,
    authenticated,
    warn_about_exposure,
)
from mlxserve.http.requestlog import LogTap
from mlxserve.http.shutdown import GracefulShutdown
from mlxserve.routes import (
    anthropic,
    downloads,
    embeddings,
    library,
    lmstudio_v0,
    lmstudio_v1,
    metrics,
    openai,
    ops,
    responses,
    web,
)
from mlxserve.sdk.routes import routes as sdk_routes
from mlxserve.settings import Settings
from mlxserve.state import AppState

log = logging.getLogger("mlxserve.app")


async def health(request: Request) -> Response:
    state: AppState = request.app.state.mlxserve
    # A distributed server that lost a rank cannot generate until it is restarted.
    group = state.manager.distributed
    extra = {} if group is None else {"distributed": group.describe()}
    failed = group is not None and group.failed is not None
    if not authenticated(request.scope, state):
        # Open for liveness probes; which models are loaded is for token holders only.
        return JSONResponse(
            {"status": "error" if failed else "ok", "version": __version__},
            status_code=503 if failed else 200,
        )
    return JSONResponse(
        {
            "status": "error" if failed else "ok",
            **extra,
            "version": __version__,
            "loaded": [
                {
                    "id": i.id,
                    "format": i.info.format,
                    "pending": i.engine.pending,
                    "generated_tokens": i.engine.generated_tokens,
                    "batched_tokens": i.engine.batched_tokens,
                    "prompt_cache_held_bytes": i.engine.prompt_cache_held_bytes,
                    "preempted": i.engine.preempted,
                }
                for i in state.manager.loaded()
            ]
            + [
                {
                    "id": e.id,
                    "format": e.info.format,
                    "type": "embedding",
                    "pending": e.engine.pending,
                    "embedded_inputs": e.engine.embedded_inputs,
                }
                for e in state.manager.loaded_embedders()
            ],
        },
        status_code=503 if failed else 200,
    )


def _middleware(state: AppState) -> list[Middleware]:
    """The stack, outermost first (:mod:`mlxserve.http.middleware` says why in this order)."""
    settings = state.settings
    return [
        # Outermost, so that refusals are counted too.
        Middleware(metrics.RequestMetrics, metrics=state.metrics),
        Middleware(HostGuardMiddleware, settings=settings),
        Middleware(CORSMiddleware, settings=settings),
        Middleware(AuthMiddleware, state=state),
        # Inside the guards: a request they refused never reaches the log stream.
        Middleware(LogTap, bus=state.logbus),
        Middleware(BodyLimitMiddleware, limit=settings.max_body_bytes),
        # Innermost: it sees each exchange to its end, to finish it on shutdown.
        Middleware(GracefulShutdown),
    ]


def create_app(settings: Settings | None = None) -> Starlette:
    """Build the server: every piece of state hangs off ``app.state.mlxserve``."""
    settings = settings or Settings()
    state = AppState.build(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        warn_about_exposure(state)
        versions.check()
        if settings.require_auth:
            # A corrupt token file would turn every request away: refuse to start instead.
            try:
                state.tokens.check()
            except (OSError, ValueError) as exc:
                log.error("refusing to start with --require-auth: %s", exc)
                raise
        await state.registry.models()
        state.manager.start()
        heap.settle()
        yield
        # Each part is closed even if one before it fails: a broken MCP session must not leave
        # the models loaded or the chat store open.
        closes: list[tuple[str, Callable[[], Any]]] = [
            ("downloads", state.downloads.close),
            ("MCP sessions", state.mcp.close),
            ("models", state.manager.close),
            ("chat store", state.chats.close),
        ]
        for what, close in closes:
            try:
                result = close()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("closing the %s failed; closing the rest", what)

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            *api_description.routes,
            *openai.routes,
            *embeddings.routes,
            *responses.routes,
            *anthropic.routes,
            *lmstudio_v1.routes,
            *lmstudio_v0.routes,
            *downloads.routes,
            *ops.routes,
            *metrics.routes,
            *library.routes,
            *web.routes,
            *sdk_routes(),
        ],
        exception_handlers={
            MlxServeError: error_response,
            HTTPException: error_response,
            Exception: error_response,
        },
        middleware=_middleware(state),
        lifespan=lifespan,
    )
    app.state.mlxserve = state
    return app
