"""What an engine hands back to the event loop: the items of a request's stream (tokens with
their log probabilities, prompt progress, the finish) and the :class:`TokenStream` that carries
them from the owner thread, through a :class:`Relay` shared by an engine's streams."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal


class EngineError(Exception):
    """The engine failed while generating."""


@dataclass(frozen=True)
class TokenLogprobs:
    """Log probabilities from the distribution a token was sampled from: the log-softmax of
    the logits after repetition, presence and frequency penalties and the grammar mask,
    before temperature and top-k/top-p/min-p truncation (on both backends)."""

    # The sampled token's, whatever its rank.
    logprob: float
    # The most likely tokens, most likely first (ties: lower id first); tokens the grammar
    # forbids are never listed.
    top: tuple[tuple[int, float], ...] = ()


class DeferredLogprobs(TokenLogprobs):
    """Log probabilities an engine thread leaves to be computed on the event loop, where the
    relay delivers the token (:meth:`resolve`): the engine's next step need not wait for them.
    Read like :class:`TokenLogprobs`; reading resolves them too."""

    _value: TokenLogprobs | None

    def __init__(self) -> None:
        object.__setattr__(self, "_value", None)

    def _compute(self) -> TokenLogprobs:
        raise NotImplementedError

    def resolve(self) -> TokenLogprobs:
        value = self._value
        if value is None:
            value = self._compute()
            object.__setattr__(self, "_value", value)
        return value

    @property
    def logprob(self) -> float:
        return self.resolve().logprob

    @property
    def top(self) -> tuple[tuple[int, float], ...]:
        return self.resolve().top


@dataclass(frozen=True)
class Token:
    """One sampled token (never an end-of-generation token)."""

    id: int
    # Set when the request asked for log probabilities.
    logprobs: TokenLogprobs | None = None


@dataclass(frozen=True)
class PromptProgress:
    """Prompt tokens processed so far; ``cached`` of them came from the prompt cache."""

    processed: int
    total: int
    cached: int = 0


@dataclass
class DraftStats:
    """What a draft model proposed for a request (LM Studio's counts): accepted and rejected
    by verification, or ignored because the reply ended first."""

    total: int = 0
    accepted: int = 0
    rejected: int = 0
    ignored: int = 0


@dataclass(frozen=True)
class Finished:
    """The last item of every stream. ``generated`` counts every sampled token, stop tokens too."""

    reason: Literal["stop", "length", "cancelled"]
    generated: int
    # Set when a draft model proposed tokens.
    draft: DraftStats | None = None
    # Prompt tokens this request computed (not read from the prompt cache) that the engine
    # keeps in its prompt cache when the request ends: Anthropic's cache_creation_input_tokens.
    cache_written: int = 0


StreamItem = Token | PromptProgress | Finished
# What a single-path generator yields per token: the id, or the id and its log probabilities.
Sampled = int | tuple[int, TokenLogprobs]


class Relay:
    """Hands stream items from engine threads to one event loop, waking the loop once per
    batch of items rather than once per item: a wake-up is a self-pipe write and a pass of
    the loop, and the engine thread then waits for the GIL while the loop renders what it got.

    The first item put wakes the loop at once; items put before the loop has taken them ride
    on that wake-up. Inside :meth:`hold` (an engine step's tokens for all its streams) items
    wait and go in one wake-up when the hold ends. Items reach each stream in the order put.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[TokenStream, StreamItem | BaseException]] = []
        self._scheduled = False
        self._held = 0

    def put(self, stream: TokenStream, item: StreamItem | BaseException) -> None:
        """Called from an engine thread."""
        with self._lock:
            self._items.append((stream, item))
            wake = not self._scheduled and not self._held
            if wake:
                self._scheduled = True
        if wake:
            self._wake()
        elif self.loop.is_closed():
            self._drop()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Items put inside go to the loop together when the outermost hold ends."""
        with self._lock:
            self._held += 1
        try:
            yield
        finally:
            with self._lock:
                self._held -= 1
                wake = not self._held and not self._scheduled and bool(self._items)
                if wake:
                    self._scheduled = True
            if wake:
                self._wake()

    def _wake(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:
            self._drop()

    def _drop(self) -> None:
        """The event loop is closed: nobody is listening any more, so the engine stops."""
        with self._lock:
            items, self._items = self._items, []
        for stream, _ in items:
            stream.cancel()

    def _deliver(self) -> None:
        """On the event loop: every waiting item into its stream's queue."""
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        for stream, item in items:
            delivered: StreamItem | BaseException = item
            if isinstance(item, Token) and isinstance(item.logprobs, DeferredLogprobs):
                try:
                    item.logprobs.resolve()
                except Exception as exc:
                    # That request fails alone: the other items of this wake-up (other
                    # streams' tokens and ends) are still delivered.
                    stream.cancel()
                    delivered = EngineError(f"{type(exc).__name__}: {exc}")
            stream._queue.put_nowait(delivered)


class TokenStream:
    """An async stream of a request's tokens, fed from the owner thread without polling.
    Streams sharing a :class:`Relay` (an engine's requests) share its wake-ups."""

    def __init__(self, loop: asyncio.AbstractEventLoop, relay: Relay | None = None) -> None:
        self._relay = relay if relay is not None else Relay(loop)
        self._queue: asyncio.Queue[StreamItem | BaseException] = asyncio.Queue()
        self._cancel = threading.Event()
        # An error met while draining a batch, raised after that batch's items are delivered.
        self._error: BaseException | None = None

    def cancel(self) -> None:
        """Ask the engine to stop this request at its next step (prompt processing included)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def put(self, item: StreamItem | BaseException) -> None:
        """Called from the owner thread."""
        self._relay.put(self, item)

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> StreamItem:
        if self._error is not None:
            raise self._error
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def next_batch(self, timeout: float | None = None) -> list[StreamItem]:
        """The next item and every other one already waiting, so a fast engine is drained in
        bulk; an empty list if nothing arrived within ``timeout`` seconds."""
        if self._error is not None:
            raise self._error
        try:
            first = await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return []
        if isinstance(first, BaseException):
            raise first
        items: list[StreamItem] = [first]
        while not isinstance(items[-1], Finished) and not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, BaseException):
                self._error = item  # the tokens before it are delivered first
                break
            items.append(item)
        return items
