"""The MLX prompt cache: KV caches of finished requests, reused by requests sharing a prefix."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from backends.base import common_prefix
from backends.mlx.kvquant import QuantizedCache

__all__ = ["PromptCache", "common_prefix"]


def _each(x: Any, fn: Callable[[mx.array], mx.array]) -> Any:
    """``fn`` on an array, or on each array of a quantized (packed, scales, biases) triple."""
    return tuple(fn(a) for a in x) if isinstance(x, tuple) else fn(x)


def _arrays(cache: Any) -> list[mx.array]:
    return [a for x in (cache.keys, cache.values) for a in (x if isinstance(x, tuple) else (x,))]


def _prefix_view(cache: Any, n: int) -> Any:
    # A new cache object over the first n positions: MLX arrays are values, so the stored
    # entry is not copied here and later writes to the view never reach it.
    view = copy.copy(cache)
    view.keys = _each(cache.keys, lambda a: a[..., :n, :])
    view.values = _each(cache.values, lambda a: a[..., :n, :])
    view.offset = n
    return view


def _held_bytes(cache: Any) -> int:
    # What the cache will take once compacted to the positions it holds, from shapes alone.
    n = cache.offset
    return sum(a.nbytes // a.shape[2] * n for a in _arrays(cache))


def _compact(cache: Any) -> Any:
    # Keep exactly the positions held, as evaluated arrays of their own: a lazy slice or an
    # unevaluated copy would keep the whole step-allocated (or whole-batch) buffer alive,
    # several times what ``nbytes`` counts.
    n = cache.offset
    if _arrays(cache)[0].shape[2] != n:
        cache.keys = _each(cache.keys, lambda a: mx.contiguous(a[..., :n, :]))
        cache.values = _each(cache.values, lambda a: mx.contiguous(a[..., :n, :]))
    mx.eval(*_arrays(cache))
    return cache


class PromptCache:
    """Per-layer KV caches keyed by the tokens they hold, least recently used evicted first
    once their size passes ``budget`` bytes. A hit hands out views, never deep copies."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._entries: OrderedDict[tuple[int, ...], list[KVCache]] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def fetch(self, prompt: Sequence[int]) -> tuple[list[KVCache] | None, int]:
        """A cache holding the longest stored prefix of ``prompt`` and its length. The last
        prompt token is never served from the cache: sampling needs its logits."""
        best: tuple[int, ...] | None = None
        best_n = 0
        for key in self._entries:
            n = common_prefix(key, prompt, len(prompt) - 1)
            if n > best_n:
                best, best_n = key, n
        if best is None:
            return None, 0
        self._entries.move_to_end(best)
        return [_prefix_view(c, best_n) for c in self._entries[best]], best_n

    def store(self, tokens: Sequence[int], cache: list[Any]) -> None:
        """Keep ``cache`` (plain or quantized KV caches only) for the tokens it holds."""
        if self.budget <= 0 or not cache:
            return
        if not all(type(c) in (KVCache, QuantizedCache) and c.keys is not None for c in cache):
            return
        n = cache[0].offset
        if len(tokens) < n:
            return
        # Checked before compacting: that copies and evaluates every layer.
        if sum(_held_bytes(c) for c in cache) > self.budget:
            return
        key = tuple(tokens[:n])
        cache = [_compact(c) for c in cache]
        size = sum(c.nbytes for c in cache)
        if size > self.budget:
            return
        # An entry this one extends is covered by it: a hit on either finds this one.
        for old in [k for k in self._entries if len(k) <= n and key[: len(k)] == k]:
            self._drop(old)
        self._entries[key] = cache
        self.nbytes += size
        while self.nbytes > self.budget:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: tuple[int, ...]) -> None:
        cache = self._entries.pop(key)
        self.nbytes -= sum(c.nbytes for c in cache)

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0
