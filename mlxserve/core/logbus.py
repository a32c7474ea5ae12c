"""Live request/response log for ``mlxserve log stream`` (like ``lms log stream``): the event
bus its subscribers read, and how a body is shown there (cut to a few KB, credentials
masked). The HTTP middleware that taps the requests is :mod:`mlxserve.http.requestlog`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

BODY_LIMIT = 8192
_QUEUE_SIZE = 1000
# MCP credentials travel in request bodies (``integrations[].headers``, ``tools[].headers``,
# ``tools[].authorization``): their values are masked before anything is published.
_SECRET_KEYS = frozenset(
    {"headers", "authorization", "api_key", "apikey", "x-api-key", "token", "password"}
)
_SECRET_TEXT = re.compile(r"sk-lm-[A-Za-z0-9_\-:.]+|(?i:bearer)\s+[^\s\"',}]+")
MASK = "***"
# "key": <string | object | array up to its first closing bracket> in text that isn't JSON.
_SECRET_FIELD = re.compile(
    r'("(?:' + "|".join(re.escape(k) for k in sorted(_SECRET_KEYS)) + r')"\s*:\s*)'
    r'(?:"(?:[^"\\]|\\.)*"?|\{[^}]*\}?|\[[^\]]*\]?)',
    re.IGNORECASE,
)


def redact(value: Any) -> Any:
    """Mask credential-looking values anywhere in a decoded JSON body (or a plain string)."""
    if isinstance(value, dict):
        return {
            key: MASK if str(key).lower() in _SECRET_KEYS else redact(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [redact(item) for item in value]
    if isinstance(value, str):
        return _SECRET_TEXT.sub(MASK, value)
    return value


class LogBus:
    """Fan-out of log events to subscribers; a slow subscriber loses events, never blocks."""

    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self._ids = itertools.count(1)

    @property
    def active(self) -> bool:
        return bool(self._subscribers)

    def next_id(self) -> int:
        return next(self._ids)

    def publish(self, event: dict[str, Any]) -> None:
        event.setdefault("timestamp", time.time())
        for queue in self._subscribers:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(event)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(_QUEUE_SIZE)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)


def preview(chunks: list[bytes], size: int) -> Any:
    text = b"".join(chunks)[:BODY_LIMIT].decode("utf-8", errors="replace")
    if size > BODY_LIMIT:
        # A cut body cannot be parsed, so a secret key's value is masked textually.
        return redact(_SECRET_FIELD.sub(r"\1" + json.dumps(MASK), text)) + (
            f"… ({size - BODY_LIMIT} more bytes)"
        )
    try:
        return redact(json.loads(text))
    except ValueError:
        return redact(_SECRET_FIELD.sub(r"\1" + json.dumps(MASK), text))
