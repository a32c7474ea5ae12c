"""``GET /metrics``: the metrics registry in Prometheus' text format, or as JSON for the web
app's charts; and the middleware that counts every HTTP request by route and status."""

from __future__ import annotations

import time

from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlxserve.core.metrics import Metrics, request_labels
from mlxserve.errors import InvalidRequest
from mlxserve.state import AppState

# Requests that matched no route share one label, so that probing random paths cannot grow
# the registry without bound.
UNMATCHED = "unmatched"


async def metrics(request: Request) -> Response:
    """The metrics registry: Prometheus text, or JSON with ``?format=json``."""
    state: AppState = request.app.state.mlxserve
    fmt = request.query_params.get("format", "prometheus")
    if fmt == "json":
        return JSONResponse(state.metrics.snapshot())
    if fmt != "prometheus":
        raise InvalidRequest("format must be 'prometheus' or 'json'.", param="format")
    return Response(state.metrics.text(), media_type=CONTENT_TYPE_LATEST)


class RequestMetrics:
    """Counts each HTTP request once, outermost, with the model the generation path noted,
    the route template it matched and the status it got (refusals included)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with request_labels() as labels:
            try:
                await self.app(scope, receive, send_status)
            finally:
                route = scope.get("route")
                path = getattr(route, "path", None) or UNMATCHED
                self.metrics.observe_request(
                    labels.model, path, status, time.perf_counter() - started
                )


routes = [Route("/metrics", metrics, methods=["GET"])]
