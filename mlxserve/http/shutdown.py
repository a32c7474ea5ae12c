"""Graceful shutdown: on SIGTERM/SIGINT, work in flight ends promptly and cleanly.

uvicorn stops accepting connections and waits for the open ones, but an SSE stream of
thousands of tokens would outlast its grace period and then be cut mid-chunk. So when the
signal arrives, :class:`GracefulShutdown` tells every request that has read its body that
its client left (the routes' own cancellation path: the generation stops at its next
step), and then finishes the reply itself:

- a stream gets a terminal ``error`` event in its dialect (code ``server_shutting_down``)
  and a proper end, so a client sees why it ended, never a truncated body;
- a non-streamed request gets 503 with ``Retry-After`` (the SDKs retry it elsewhere).

Stored chats are written in single SQLite transactions (WAL), so an unfinished turn is
simply not stored. Then the lifespan unloads the models and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import sys
from types import FrameType
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlxserve.errors import Overloaded
from mlxserve.http.errors import (
    anthropic_error_body,
    dialect_of,
    lmstudio_error_body,
    openai_error_body,
    reject,
)
from mlxserve.http.sse import sse

log = logging.getLogger("mlxserve.shutdown")

_SEQUENCE = re.compile(rb'"sequence_number":\s*(\d+)')


class ServerShuttingDown(Overloaded):
    code = "server_shutting_down"

    def __init__(self) -> None:
        super().__init__("The server is shutting down; retry the request once it is back.")


def terminal_event(path: str, exc: ServerShuttingDown, last_sequence: int) -> str:
    """The event that ends a stream in the dialect of ``path``."""
    dialect = dialect_of(path)
    if dialect == "anthropic":
        return sse(anthropic_error_body(exc), "error")
    if dialect == "lmstudio":
        return sse({"type": "error", **lmstudio_error_body(exc)}, "error")
    if path.startswith("/v1/responses"):
        error = {"type": "error", "code": exc.code, "message": exc.message, "param": None}
        return sse({**error, "sequence_number": last_sequence + 1}, "error")
    return sse(openai_error_body(exc))


class GracefulShutdown:
    """Pure ASGI: ends in-flight requests cleanly once a stop signal arrives (installed
    innermost, next to the routes)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.stopping = asyncio.Event()

    def begin(self) -> None:
        if not self.stopping.is_set():
            log.info("shutting down: ending the requests in flight")
            self.stopping.set()

    def _hook_signals(self) -> None:
        """Chain onto the server's SIGTERM/SIGINT handlers (uvicorn's ``handle_exit``)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)

            def handler(signum: int, frame: FrameType | None, previous: Any = previous) -> None:
                loop.call_soon_threadsafe(self.begin)
                if callable(previous):
                    previous(signum, frame)

            try:
                signal.signal(sig, handler)
            except ValueError:
                return  # not the main thread: an in-process test client, no signals

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            self._hook_signals()

            async def lifespan_receive() -> Message:
                message = await receive()
                if message["type"] == "lifespan.shutdown":
                    self.begin()
                return message

            await self.app(scope, lifespan_receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await _Exchange(self, scope, receive, send).run()


class _Exchange:
    """One HTTP request under :class:`GracefulShutdown`."""

    def __init__(self, owner: GracefulShutdown, scope: Scope, receive: Receive, send: Send):
        self.owner = owner
        self.scope = scope
        self._receive = receive
        self._send = send
        self.body_read = False
        # We told the app its client left because the server is stopping.
        self.interrupted = False
        self.started = False
        self.streaming = False
        self.complete = False
        self.replaced = False
        self.last_sequence = -1

    async def receive(self) -> Message:
        if self.interrupted:
            return {"type": "http.disconnect"}
        if not self.body_read:
            message = await self._receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                self.body_read = True
            return message
        # The body is in: the next message can only be the client leaving, and a stopping
        # server counts as that.
        incoming = asyncio.ensure_future(self._receive())
        stopping = asyncio.ensure_future(self.owner.stopping.wait())
        try:
            await asyncio.wait({incoming, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not incoming.done():
                incoming.cancel()
        if incoming.done() and not incoming.cancelled():
            return incoming.result()
        self.interrupted = True
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self.replaced:
            return
        if message["type"] == "http.response.start":
            if self.interrupted:
                # The app gave up a non-streamed reply because "the client left": answer it.
                self.replaced = self.complete = True
                await reject(self.scope, self._receive, self._send, ServerShuttingDown())
                return
            self.started = True
            content_type = Headers(raw=message.get("headers", [])).get("content-type", "")
            self.streaming = content_type.startswith("text/event-stream")
        elif message["type"] == "http.response.body":
            if self.streaming:
                found = _SEQUENCE.findall(message.get("body", b""))
                if found:
                    self.last_sequence = int(found[-1])
            if not message.get("more_body", False):
                self.complete = True
        await self._send(message)

    async def run(self) -> None:
        try:
            await self.owner.app(self.scope, self.receive, self.send)
        finally:
            if self.interrupted and self.streaming and not self.complete:
                event = terminal_event(self.scope["path"], ServerShuttingDown(), self.last_sequence)
                with contextlib.suppress(Exception):
                    await self._send(
                        {"type": "http.response.body", "body": event.encode(), "more_body": False}
                    )


def exit_zero_after_signal() -> None:
    """uvicorn re-raises the stop signal once it has shut down gracefully; make that an exit
    with status 0 (a clean stop) instead of death by signal or a KeyboardInterrupt
    traceback. Call before ``uvicorn.run``."""

    def stopped(signum: int, frame: FrameType | None) -> None:
        sys.exit(0)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stopped)
