"""Pure ASGI middleware that taps every API request and its response (bodies cut to a few KB,
headers never: they carry tokens) and publishes them to the app's :class:`LogBus`. With
nobody subscribed it only checks a length and passes the request on."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlxserve.core.logbus import BODY_LIMIT, LogBus, preview

# The log stream itself and health polls would only drown the rest.
_UNTAPPED = ("/api/v1/logs/stream", "/health")


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
                        "body": preview(request_body, request_size) if request_size else None,
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
                                preview(response_body, response_size) if response_size else None
                            ),
                        }
                    )
            await send(message)

        await self.app(scope, tapped_receive, tapped_send)
