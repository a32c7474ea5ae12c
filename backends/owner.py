"""The owner thread: every call into an inference library for one loaded model runs here,
in order, so library state (MLX arrays, a llama.cpp context) never crosses threads."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    """The engine's request queue is full."""


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: Future[Any] = field(default_factory=Future)


class OwnerThread:
    """A thread with an inbox. :meth:`call` runs internal work (load, unload); :meth:`submit`
    runs a request, counted in :attr:`pending` and bounded by ``max_queue``."""

    def __init__(self, name: str, max_queue: int) -> None:
        self._max_queue = max_queue
        self._inbox: queue.Queue[_Call | None] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self.pending = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` on the owner thread."""
        item = _Call(fn)
        self._inbox.put(item)
        return item.future

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Run a request's ``fn``; :class:`QueueFull` when ``max_queue`` requests wait."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this model has been unloaded")
            if self.pending >= self._max_queue:
                raise QueueFull(f"{self.pending} requests are already waiting for this model")
            self.pending += 1
        future = self.call(fn)
        # Released however the call ends: done, failed, or cancelled while still queued.
        future.add_done_callback(lambda _: self._release())
        return future

    def _release(self) -> None:
        with self._lock:
            self.pending -= 1

    def close(self, last: Callable[[], None] | None = None, timeout: float = 30) -> None:
        """Refuse new requests, run ``last`` after the queued work, then stop the thread."""
        with self._lock:
            self._closed = True
        if self._thread.is_alive():
            if last is not None:
                self.call(last)
            self._inbox.put(None)
            self._thread.join(timeout=timeout)

    def _run(self) -> None:
        while True:
            item = self._inbox.get()
            if item is None:
                return
            if not item.future.set_running_or_notify_cancel():
                continue
            try:
                item.future.set_result(item.fn())
            except BaseException as exc:  # handed to the waiting caller
                item.future.set_exception(exc)
