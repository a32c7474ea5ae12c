"""Errors rendered once, at the edge, in the dialect of the path: OpenAI, Anthropic and
LM Studio envelopes, their headers, the exception handler every route shares, and
:func:`reject` for middleware answering without reaching the app."""

from __future__ import annotations

import logging
from typing import Any, Literal

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from mlxserve.errors import MethodNotAllowed, MlxServeError, NotFoundRoute, Overloaded, Unauthorized

log = logging.getLogger("mlxserve.http")


def openai_error_body(exc: MlxServeError) -> dict[str, Any]:
    return {
        "error": {
            "message": exc.message,
            "type": exc.kind,
            "param": exc.param,
            "code": exc.code,
        }
    }


def error_headers(exc: MlxServeError) -> dict[str, str]:
    if isinstance(exc, Overloaded):
        return {"Retry-After": str(exc.retry_after_seconds)}
    if exc.status >= 500:
        # Deterministic server faults: tell the official SDKs not to retry them.
        return {"x-should-retry": "false"}
    return {}


def as_mlxserve_error(exc: Exception) -> MlxServeError:
    if isinstance(exc, MlxServeError):
        return exc
    if isinstance(exc, HTTPException):
        if exc.status_code == 404:
            return NotFoundRoute("No such endpoint. See README.md for the API.")
        if exc.status_code == 405:
            return MethodNotAllowed("This endpoint does not accept that HTTP method.")
        err = MlxServeError(str(exc.detail))
        err.status = exc.status_code
        err.kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return err
    log.error("unhandled error", exc_info=exc)
    return MlxServeError(f"Internal server error: {type(exc).__name__}")


_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def anthropic_error_body(exc: MlxServeError) -> dict[str, Any]:
    """Anthropic's envelope: ``{"type": "error", "error": {"type", "message"}}``."""
    kind = _ANTHROPIC_TYPES.get(exc.status)
    if kind is None:
        kind = "invalid_request_error" if exc.status < 500 else "api_error"
    return {"type": "error", "error": {"type": kind, "message": exc.message}}


def lmstudio_error_body(exc: MlxServeError) -> dict[str, Any]:
    """LM Studio v1's envelope: ``{"error": {"type", "message", "code"?, "param"?}}``."""
    if exc.code in ("model_not_found", "mcp_connection_error"):
        kind = exc.code
    elif exc.status == 501:
        kind = "not_implemented"
    elif exc.status < 500:
        kind = "invalid_request"
    else:
        kind = "internal_error"
    error: dict[str, Any] = {"type": kind, "message": exc.message}
    if exc.code:
        error["code"] = exc.code
    if exc.param:
        error["param"] = exc.param
    return {"error": error}


Dialect = Literal["openai", "anthropic", "lmstudio"]


def dialect_of(path: str) -> Dialect:
    """Which API's error envelope a path speaks."""
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/api/v1/"):
        return "lmstudio"
    return "openai"


def error_body_for(path: str, exc: MlxServeError) -> dict[str, Any]:
    """The error envelope of the dialect a path speaks."""
    dialect = dialect_of(path)
    if dialect == "anthropic":
        return anthropic_error_body(exc)
    if dialect == "lmstudio":
        return lmstudio_error_body(exc)
    return openai_error_body(exc)


async def error_response(request: Request, exc: Exception) -> JSONResponse:
    """The exception handler for every route: one place that renders errors."""
    err = as_mlxserve_error(exc)
    return JSONResponse(
        error_body_for(request.url.path, err), status_code=err.status, headers=error_headers(err)
    )


async def reject(scope: Scope, receive: Receive, send: Send, exc: MlxServeError) -> None:
    """Answer with ``exc`` in the path's dialect, without reaching the app."""
    if scope["type"] == "websocket":
        # Closing before accepting makes the server answer the upgrade with 403.
        await send({"type": "websocket.close", "code": 1008, "reason": exc.message[:120]})
        return
    headers = error_headers(exc)
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    body = error_body_for(scope.get("path", ""), exc)
    response = JSONResponse(body, status_code=exc.status, headers=headers)
    await response(scope, receive, send)
