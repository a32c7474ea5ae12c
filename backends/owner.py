"""The owner thread: every call into an inference library for one loaded model runs here,
in order, so library state (MLX arrays, a llama.cpp context) never crosses threads."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The engine's request queue is full."""


class Pump(Protocol):
    """Work the owner thread advances one step at a time between inbox items (a batch).
    ``step`` should not raise: it fails the requests it cannot serve instead. If it raises
    anyway, the owner thread calls ``abort``, which fails every request the pump holds and
    resets its state, and goes on serving its inbox."""

    def busy(self) -> bool: ...

    def step(self) -> None: ...

    def abort(self, exc: BaseException) -> None: ...


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: Future[Any] = field(default_factory=Future)


class OwnerThread:
    """A thread with an inbox. :meth:`call` runs internal work (load, unload); :meth:`submit`
    runs a request, counted in :attr:`pending` and bounded by ``max_queue``.

    With a ``pump``, the thread steps it whenever the inbox is empty and the pump is busy, so
    a request queued while a batch runs is taken in before the batch's next step.
    """

    def __init__(self, name: str, max_queue: int, pump: Pump | None = None) -> None:
        self._max_queue = max_queue
        self._pump = pump
        self._inbox: queue.Queue[_Call | None] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        # The stop sentinel is queued: nothing put in the inbox after it would ever run.
        self._stopping = False
        self._last: Callable[[], None] | None = None
        self.pending = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` on the owner thread; once :meth:`close` was called, the future fails at
        once (the thread would never reach it, and its caller would wait forever)."""
        item = _Call(fn)
        with self._lock:
            if self._stopping:
                item.future.set_exception(RuntimeError("this model has been unloaded"))
                return item.future
            self._inbox.put(item)
        return item.future

    def reserve(self) -> Callable[[], None]:
        """Count one request as pending until the returned release function is called;
        :class:`QueueFull` when ``max_queue`` requests are already pending."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this model has been unloaded")
            if self.pending >= self._max_queue:
                raise QueueFull(f"{self.pending} requests are already waiting for this model")
            self.pending += 1
        released = threading.Event()

        def release() -> None:
            if not released.is_set():
                released.set()
                self._release()

        return release

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Run a request's ``fn``; :class:`QueueFull` when ``max_queue`` requests wait."""
        release = self.reserve()
        future = self.call(fn)
        # Released however the call ends: done, failed, or cancelled while still queued.
        future.add_done_callback(lambda _: release())
        return future

    def _release(self) -> None:
        with self._lock:
            self.pending -= 1

    def close(self, last: Callable[[], None] | None = None, timeout: float | None = None) -> None:
        """Refuse new requests, finish the queued and running work, run ``last``, then stop;
        returns once the thread has ended (what it held is then really freed), or after
        ``timeout`` seconds for a thread that may never end (a lost distributed rank)."""
        with self._lock:
            self._closed = True
            if self._stopping:
                return
            self._stopping = True
            if self._thread.is_alive():
                self._last = last
                self._inbox.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("%s did not stop within %ss", self._thread.name, timeout)

    def _step(self, pump: Pump) -> bool:
        """One pump step; an exception must not kill this thread (every request on the model
        would hang), so it fails what the pump holds instead. False if even that failed."""
        try:
            pump.step()
            return True
        except Exception as exc:
            log.exception("%s: a step failed; failing its requests", self._thread.name)
            try:
                pump.abort(exc)
                return True
            except Exception:
                log.exception("%s: aborting the requests failed", self._thread.name)
                return False

    def _run(self) -> None:
        pump = self._pump
        while True:
            busy = pump is not None and pump.busy()
            try:
                item = self._inbox.get_nowait() if busy else self._inbox.get()
            except queue.Empty:
                assert pump is not None
                self._step(pump)
                continue
            if item is None:
                while pump is not None and pump.busy():
                    if not self._step(pump):
                        break
                if self._last is not None:
                    try:
                        self._last()
                    except Exception:
                        log.exception("%s: the final call failed", self._thread.name)
                return
            if not item.future.set_running_or_notify_cancel():
                continue
            try:
                item.future.set_result(item.fn())
            except BaseException as exc:  # handed to the waiting caller
                item.future.set_exception(exc)
