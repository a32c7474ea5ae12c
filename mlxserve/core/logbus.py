"""Live request/response log for ``mlxserve log stream`` (like ``lms log stream``).

A pure ASGI middleware taps every API request and its response (bodies cut to a few KB,
headers never: they carry tokens) and publishes them to the subscribers of a small event
bus. With nobody subscribed it only checks a length and passes the request on.
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

from starlette.types import ASGIApp, Message, Receive, Scope, Send

BODY_LIMIT = 8192
_QUEUE_SIZE = 1000
# The log stream itself and health polls would only drown the rest.
_UNTAPPED = ("/api/v1/logs/stream", "/health")
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


def _preview(chunks: list[bytes], size: int) -> Any:
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


class LogTap:
    """Pure ASGI middleware publishing each HTTP request and response to a :class:`LogBus`."""

    def __init__(self, app: ASGIApp, bus: LogBus) -> None:
        self.app = app
        self.bus = bus

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.bus.active or scope["path"].startswith(_UNTAPPED):
            await self.app(scope, receive, send)
            return
        bus = self.bus
        request_id = bus.next_id()
        started = time.perf_counter()
        request_body: list[bytes] = []
        request_size = 0
        sent_request = False
        response_body: list[bytes] = []
        response_size = 0
        status = 0

        def publish_request() -> None:
            nonlocal sent_request
            if not sent_request:
                sent_request = True
                bus.publish(
                    {
                        "type": "request",
                        "id": request_id,
                        "method": scope["method"],
                        "path": scope["path"],
                        "body": _preview(request_body, request_size) if request_size else None,
                    }
                )

        async def tapped_receive() -> Message:
            nonlocal request_size
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                if request_size < BODY_LIMIT + 1:
                    request_body.append(chunk[: BODY_LIMIT + 1 - request_size])
                request_size += len(chunk)
                if not message.get("more_body", False):
                    publish_request()
            return message

        async def tapped_send(message: Message) -> None:
            nonlocal response_size, status
            if message["type"] == "http.response.start":
                publish_request()
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                if response_size < BODY_LIMIT + 1:
                    response_body.append(chunk[: BODY_LIMIT + 1 - response_size])
                response_size += len(chunk)
                if not message.get("more_body", False):
                    bus.publish(
                        {
                            "type": "response",
                            "id": request_id,
                            "method": scope["method"],
                            "path": scope["path"],
                            "status": status,
                            "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                            "body": (
                                _preview(response_body, response_size) if response_size else None
                            ),
                        }
                    )
            await send(message)

        await self.app(scope, tapped_receive, tapped_send)
