"""What every route shares: body parsing, error envelopes, SSE framing, disconnect handling."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import anyio
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from mlxserve.errors import (
    InvalidJSON,
    InvalidRequest,
    MethodNotAllowed,
    MlxServeError,
    NotFoundRoute,
    Overloaded,
)
from mlxserve.protocols.unicode import check_unicode

log = logging.getLogger("mlxserve.http")

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    body = await request.body()
    if not body.strip():
        raise InvalidJSON("The request body is empty; a JSON object is expected.")
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidJSON(f"The request body is not valid JSON: {exc}") from exc
    except ValueError:
        # An integer of thousands of digits (Python refuses to convert it) or NaN/Infinity.
        raise InvalidJSON(
            "The request body holds a number JSON cannot carry: NaN, Infinity, or an integer "
            "thousands of digits long."
        ) from None
    except RecursionError:
        raise InvalidJSON("The request body nests JSON too deeply.") from None
    if not isinstance(data, dict):
        raise InvalidJSON(f"The request body must be a JSON object, not {type(data).__name__}.")
    if _depth_exceeds(data, MAX_JSON_DEPTH):
        raise InvalidJSON(f"The request body nests JSON deeper than {MAX_JSON_DEPTH} levels.")
    check_unicode(data)
    return data


# Deeper than any real request (tool schemas included); checked before anything recurses.
MAX_JSON_DEPTH = 64


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether ``value`` nests containers more than ``limit`` deep (iteratively, no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return False


_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _param(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not out:
            out = str(part)
        elif not part.isidentifier() or part[0].isupper() or part in _TYPE_NAMES:
            # pydantic adds union member names to the location; they mean nothing to clients
            continue
        else:
            out += f".{part}"
    return out


def parse(model: type[M], data: dict[str, Any]) -> M:
    """Validate ``data`` against a wire model; the first problem becomes a 400 naming its field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        param = _param(tuple(err["loc"])) or None
        msg = err["msg"].removeprefix("Value error, ")
        text = f"Invalid value for '{param}': {msg}" if param else msg
        raise InvalidRequest(text, param=param) from None


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


class EventStreamResponse(StreamingResponse):
    """An SSE response that notices a client leaving even while it has nothing to send
    (queued, or processing a long prompt), and then stops the body iterator, whose
    ``finally`` cancels the generation.

    ``on_close`` (idempotent, sync or async) always runs once the response ends: a client
    that leaves before the first frame means the iterator never started, so its ``finally``
    never runs and only ``on_close`` can cancel the generation and close its sessions."""

    media_type = "text/event-stream"

    def __init__(
        self, content: Any, *, on_close: Callable[[], Any] | None = None, **kwargs: Any
    ) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, headers=headers, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    with contextlib.suppress(OSError):
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                try:
                    await self.listen_for_disconnect(receive)
                finally:
                    group.cancel_scope.cancel()
            # Runs the iterator's ``finally`` (which cancels the generation) now, not at GC.
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            if self.on_close is not None:
                with anyio.CancelScope(shield=True):
                    result = self.on_close()
                    if inspect.isawaitable(result):
                        await result


def sse(data: dict[str, Any] | str, event: str | None = None) -> str:
    """One server-sent event; ``event`` names it (the dialects with named events)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n"


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Run ``work`` unless the client goes away first; then cancel it and return None."""
    job = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({job, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if job in done:
            return job.result()
        job.cancel()
        log.info("client disconnected; request cancelled")
        return None
    finally:
        watcher.cancel()
        if not job.done():
            job.cancel()
