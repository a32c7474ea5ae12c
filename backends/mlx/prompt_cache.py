"""The MLX prompt cache: caches of finished requests, reused by requests sharing a prefix.

Plain and quantized KV caches can be cut back to any prefix, so one entry serves every prompt
that shares some of its tokens. Recurrent states (``ArraysCache``: Gated DeltaNet, Mamba) and
sliding windows (``RotatingKVCache``) cannot be rolled back: an entry holding one is a
checkpoint, usable only at exactly its length, by a prompt that extends its tokens."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache

from backends.base import common_prefix
from backends.mlx.kvquant import QuantizedCache
from backends.mlx.lm_adapter import rotating_copy

__all__ = ["PromptCache", "Reuse", "Run", "align", "common_prefix"]

# Tokens hashed to find runs (at most), and how many places in the cached prompt one window
# is tried at (repetitive text has many).
_ANCHOR = 32
_CANDIDATES = 8
_MULTIPLIERS = np.random.default_rng(0).integers(1, 1 << 63, _ANCHOR, dtype=np.uint64) | 1


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


def _trimmable(cache: Sequence[Any]) -> bool:
    return all(type(c) in (KVCache, QuantizedCache) for c in cache)


def _checkpointable(c: Any, n: int) -> bool:
    """Whether layer cache ``c`` can be kept as (part of) a checkpoint of ``n`` tokens."""
    if type(c) is ArraysCache:
        return not c.empty()
    return type(c) in (KVCache, RotatingKVCache) and c.keys is not None and c.offset == n


def _snapshot(c: Any) -> Any:
    """A checkpoint layer with evaluated arrays of its own (the batch's buffers are not kept
    alive by it, and nothing the batch does later reaches it)."""
    if type(c) is KVCache:
        return _compact(c)
    if type(c) is RotatingKVCache:
        rotating = rotating_copy(c)
        mx.eval(rotating.keys, rotating.values)
        return rotating
    states: list[mx.array | None] = [None if a is None else mx.contiguous(a) for a in c.cache]
    mx.eval(*[a for a in states if a is not None])
    snap = ArraysCache(len(states))
    snap.state = (states, None, None)
    return snap


def _snapshot_bytes(c: Any) -> int:
    if type(c) is KVCache:
        return _held_bytes(c)
    if type(c) is RotatingKVCache:
        return sum(a.nbytes // a.shape[2] * c.size() for a in (c.keys, c.values))
    return int(c.nbytes)


def _handout(c: Any) -> Any:
    """A checkpoint layer for a request: new cache and array objects over the stored arrays,
    so updates made through it (even in place) never reach the entry."""
    if type(c) is KVCache:
        return _prefix_view(c, c.offset)
    if type(c) is RotatingKVCache:
        rotating = copy.copy(c)
        rotating.keys, rotating.values = c.keys[...], c.values[...]
        return rotating
    states: list[mx.array | None] = [None if a is None else a[...] for a in c.cache]
    arrays = ArraysCache(len(states))
    arrays.state = (states, None, None)
    return arrays


@dataclass(frozen=True)
class Run:
    """``length`` tokens held at position ``src`` of a stored entry, reused at ``dst`` of the
    new prompt (moved by ``dst - src`` positions)."""

    src: int
    dst: int
    length: int


@dataclass
class Reuse:
    """How a new prompt reuses one stored entry: its first ``prefix`` positions as they are,
    then ``runs`` moved to their new positions; the tokens between them are computed."""

    entry: list[Any]
    prefix: int
    runs: list[Run] = field(default_factory=list)

    @property
    def end(self) -> int:
        """Prompt positions the spliced cache holds: the tail after it is left to compute."""
        last = self.runs[-1] if self.runs else None
        return last.dst + last.length if last else self.prefix

    @property
    def reused(self) -> int:
        """Prompt tokens not computed."""
        return self.prefix + sum(r.length for r in self.runs)

    def views(self) -> list[Any]:
        """Per-layer caches holding the shared prefix, to build the rest on."""
        return [_prefix_view(c, self.prefix) for c in self.entry]


def _agree(x: np.ndarray, y: np.ndarray) -> int:
    """How many leading elements two arrays of the same length share (compared in growing
    pieces: most candidate matches fail in the first)."""
    done, piece = 0, 256
    while done < len(x):
        same = x[done : done + piece] == y[done : done + piece]
        if not same.all():
            return done + int(np.argmin(same))
        done += len(same)
        piece *= 8
    return done


def _hashes(tokens: np.ndarray, width: int, stride: int = 1) -> np.ndarray:
    """A 64-bit hash of every ``stride``-th window of ``width`` tokens (wrapping products)."""
    windows = np.lib.stride_tricks.sliding_window_view(tokens, width)[::stride]
    return windows.astype(np.uint64) @ _MULTIPLIERS[:width]


def _free(lo: int, hi: int, taken: list[Run]) -> tuple[int, int]:
    """The longest stretch of [lo, hi) that no run in ``taken`` covers."""
    stretches = [(lo, hi)]
    for t in taken:
        end = t.dst + t.length
        stretches = [
            piece
            for a, b in stretches
            for piece in ((a, min(b, t.dst)), (max(a, end), b))
            if piece[1] > piece[0]
        ]
    return max(stretches, key=lambda ab: ab[1] - ab[0], default=(lo, lo))


def align(
    old: Sequence[int], new: Sequence[int], start: int, min_run: int, limit: int
) -> list[Run]:
    """Runs of at least ``min_run`` tokens of ``new[start:limit]`` that ``old`` holds, the
    longest first; a run may come from anywhere in ``old``, so moved lines and reordered
    blocks are found too.

    Every ``stride``-th window of ``old`` is hashed: a run of ``min_run`` tokens holds one
    of them whole, so probing every window of ``new`` finds it, then it is extended both
    ways. The work is a few array passes, not a Python loop per token. In repetitive text a
    window matches at several shifts: each shift's run is measured, and the longest win."""
    width = max(1, min(min_run, _ANCHOR))
    if min_run <= 0 or limit - start < min_run or len(old) < min_run:
        return []
    stride = min_run - width + 1
    o = np.asarray(old, dtype=np.int64)
    n = np.asarray(new[:limit], dtype=np.int64)
    anchors: dict[int, list[int]] = {}
    for k, h in enumerate(cast(list[int], _hashes(o, width, stride).tolist())):
        anchors.setdefault(h, []).append(k * stride)
    probes = _hashes(n[start:], width)
    hits = np.flatnonzero(np.isin(probes, np.array(list(anchors), dtype=np.uint64)))
    by_shift: dict[int, list[Run]] = {}
    for i in cast(list[int], (hits + start).tolist()):
        for j in anchors[int(probes[i - start])][:_CANDIDATES]:
            known = by_shift.setdefault(i - j, [])
            if any(r.dst <= i < r.dst + r.length for r in known):
                continue
            ahead = min(len(o) - j, limit - i)
            forward = _agree(o[j : j + ahead], n[i : i + ahead])
            behind = min(j, i - start)
            back = _agree(o[j - behind : j][::-1], n[i - behind : i][::-1]) if behind else 0
            known.append(Run(j - back, i - back, back + forward))
    chosen: list[Run] = []
    for run in sorted((r for rs in by_shift.values() for r in rs), key=lambda r: -r.length):
        if run.length < min_run:
            break
        lo, hi = _free(run.dst, run.dst + run.length, chosen)
        if hi - lo >= min_run:
            chosen.append(Run(run.src + lo - run.dst, lo, hi - lo))
    return sorted(chosen, key=lambda r: r.dst)


class PromptCache:
    """Per-layer caches keyed by the tokens they hold, least recently used evicted first
    once their size passes ``budget`` bytes. A hit hands out views, never deep copies.

    An entry of plain or quantized KV caches serves any prompt sharing a prefix with it; a
    checkpoint (an entry with a recurrent or sliding-window layer) serves only a prompt it is
    a prefix of, at exactly its length."""

    def __init__(
        self,
        budget: int,
        on_evict: Callable[[tuple[int, ...], list[Any]], None] | None = None,
    ) -> None:
        self.budget = budget
        self._entries: OrderedDict[tuple[int, ...], list[Any]] = OrderedDict()
        self.nbytes = 0
        # Called with each entry the budget pushes out (not one a longer entry covers).
        self.on_evict = on_evict

    def __len__(self) -> int:
        return len(self._entries)

    def fetch(self, prompt: Sequence[int]) -> tuple[list[Any] | None, int]:
        """A cache holding the longest stored prefix of ``prompt`` and its length. The last
        prompt token is never served from the cache: sampling needs its logits."""
        best: tuple[int, ...] | None = None
        best_n = 0
        for key, cache in self._entries.items():
            if _trimmable(cache):
                n = common_prefix(key, prompt, len(prompt) - 1)
            elif len(key) < len(prompt) and common_prefix(key, prompt, len(key)) == len(key):
                n = len(key)
            else:
                continue
            if n > best_n:
                best, best_n = key, n
        if best is None:
            return None, 0
        self._entries.move_to_end(best)
        entry = self._entries[best]
        if not _trimmable(entry):
            return [_handout(c) for c in entry], best_n
        return [_prefix_view(c, best_n) for c in entry], best_n

    def plan(self, prompt: Sequence[int], min_run: int) -> Reuse | None:
        """The best reuse of a stored plain or quantized entry by ``prompt`` past its shared
        prefix: runs of at least ``min_run`` matching tokens moved to their new positions.
        None unless it serves more tokens than the longest exact prefix any entry shares
        (:meth:`fetch` then serves that, exactly). The entries tried are the one sharing the
        longest prefix and the most recent."""
        limit = len(prompt) - 1
        if min_run <= 0 or not self._entries:
            return None
        ranked = sorted(self._entries, key=lambda k: common_prefix(k, prompt, limit))
        exact = common_prefix(ranked[-1], prompt, limit)
        best: tuple[tuple[int, ...], Reuse] | None = None
        for key in dict.fromkeys([ranked[-1], next(reversed(self._entries))]):
            entry = self._entries[key]
            if not _trimmable(entry):
                continue
            prefix = common_prefix(key, prompt, limit)
            if limit - prefix < min_run:
                continue  # a continued conversation: its prefix is all there is
            reuse = Reuse(entry, prefix, align(key, prompt, prefix, min_run, limit))
            if reuse.reused > (best[1].reused if best else exact):
                best = key, reuse
        if best is None:
            return None
        self._entries.move_to_end(best[0])
        return best[1]

    def store(self, tokens: Sequence[int], cache: list[Any]) -> None:
        """Keep ``cache`` for the tokens it holds: plain or quantized KV caches (the leading
        ``offset`` tokens of ``tokens``), or a checkpoint of exactly ``tokens``."""
        if self.budget <= 0 or not cache:
            return
        trimmable = _trimmable(cache)
        if trimmable:
            if any(c.keys is None for c in cache):
                return
            n = cache[0].offset
            if len(tokens) < n:
                return
            held = sum(_held_bytes(c) for c in cache)
        else:
            n = len(tokens)
            if not n or not all(_checkpointable(c, n) for c in cache):
                return
            held = sum(_snapshot_bytes(c) for c in cache)
        # Checked before compacting: that copies and evaluates every layer.
        if held > self.budget:
            return
        key = tuple(tokens[:n])
        cache = [_compact(c) for c in cache] if trimmable else [_snapshot(c) for c in cache]
        size = sum(c.nbytes for c in cache)
        if size > self.budget:
            return
        # An entry this one extends is covered by it (a hit on either finds this one), unless
        # this one cannot be cut back to it.
        for old in [k for k in self._entries if len(k) <= n and key[: len(k)] == k]:
            if trimmable or old == key:
                self._drop(old)
        self._entries[key] = cache
        self.nbytes += size
        while self.nbytes > self.budget:
            self._evict(next(iter(self._entries)))

    def _evict(self, key: tuple[int, ...]) -> None:
        cache = self._entries[key]
        self._drop(key)
        if self.on_evict is not None:
            self.on_evict(key, cache)

    def _drop(self, key: tuple[int, ...]) -> None:
        cache = self._entries.pop(key)
        self.nbytes -= sum(c.nbytes for c in cache)

    def entries(self) -> list[tuple[tuple[int, ...], list[Any]]]:
        """Every stored entry and its tokens, least recently used first."""
        return list(self._entries.items())

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0
