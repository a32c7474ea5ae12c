"""Server-sent events: one frame, and the streaming response every streamed reply uses."""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Callable
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


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
