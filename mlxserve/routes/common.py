"""What every route shares: body parsing, error envelopes, SSE framing, disconnect handling."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from mlxserve.errors import (
    InvalidJSON,
    InvalidRequest,
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
