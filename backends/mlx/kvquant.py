"""Quantized KV caches that batch: mlx-lm's ``QuantizedKVCache`` has no ``merge``, so its
``BatchGenerator`` cannot hold one. :class:`QuantizedCache` is a request's quantized cache
that merges into a :class:`BatchQuantizedKVCache`, which pads, filters, extends and extracts
like mlx-lm's ``BatchKVCache``, on the (packed, scales, biases) triple of each of keys and
values. The attention then runs mlx-lm's quantized path (it checks the cache's ``bits``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import QuantizedKVCache, dynamic_roll

from backends.mlx.lm_adapter import BaseCache

Triple = tuple[mx.array, mx.array, mx.array]

# Group sizes mx.quantize accepts, largest first; a head size must be a multiple of one.
GROUP_SIZES = (64, 32)
BITS = (2, 3, 4, 6, 8)


def group_size_for(head_dim: int) -> int | None:
    """The quantization group size for keys and values of ``head_dim``, or None."""
    return next((g for g in GROUP_SIZES if head_dim % g == 0), None)


def _map(fn: Callable[[mx.array], mx.array], triple: Triple) -> Triple:
    a, b, c = triple
    return fn(a), fn(b), fn(c)


class QuantizedCache(QuantizedKVCache):
    """One request's quantized KV cache (mlx-lm's), able to join a batch."""

    @classmethod
    def merge(cls, caches: list[QuantizedCache]) -> BatchQuantizedKVCache:
        first = caches[0]
        lengths = [c.offset if c.keys is not None else 0 for c in caches]
        longest = max(lengths)
        padding = [longest - n for n in lengths]
        batch = BatchQuantizedKVCache(padding, first.group_size, first.bits)
        if longest == 0:
            return batch
        held: list[Any] = [c for c in caches if c.keys is not None]
        shape = held[0].keys[0].shape

        def zeros(like: Triple) -> Triple:
            rows, heads = len(caches), shape[1]
            return _map(lambda x: mx.zeros((rows, heads, longest, x.shape[-1]), x.dtype), like)

        keys, values = zeros(held[0].keys), zeros(held[0].values)
        for i, (pad, c) in enumerate(zip(padding, cast(list[Any], caches), strict=True)):
            if c.keys is None:
                continue
            for dst, src in ((keys, c.keys), (values, c.values)):
                for d, s in zip(dst, src, strict=True):
                    d[i : i + 1, :, pad : pad + c.offset] = s[..., : c.offset, :]
        batch.keys, batch.values = keys, values
        batch.offset = batch.offset + longest
        batch._idx = longest
        return batch

    def size(self) -> int:
        return int(self.offset)


class BatchQuantizedKVCache(BaseCache):
    """Left-padded batch of quantized KV caches (mlx-lm's ``BatchKVCache``, quantized)."""

    step = 256

    def __init__(self, left_padding: list[int], group_size: int, bits: int) -> None:
        self.keys: Triple | None = None
        self.values: Triple | None = None
        self.left_padding = mx.array(left_padding)
        self.offset = mx.array([-p for p in left_padding])
        self._idx = 0
        self._right_padding: mx.array | None = None
        self.group_size = group_size
        self.bits = bits

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Triple, Triple]:
        prev = self._idx
        steps = keys.shape[2]
        if self.keys is None or prev + steps > self.keys[0].shape[2]:
            batch, heads = keys.shape[:2]
            size = (self.step + steps - 1) // self.step * self.step
            per_int = 32 // self.bits

            def empty(dim: int) -> Triple:
                shape = (batch, heads, size)
                groups = dim // self.group_size
                return (
                    mx.zeros((*shape, dim // per_int), mx.uint32),
                    mx.zeros((*shape, groups), keys.dtype),
                    mx.zeros((*shape, groups), keys.dtype),
                )

            new_k, new_v = empty(keys.shape[3]), empty(values.shape[3])
            if self.keys is not None and self.values is not None:
                if prev % self.step != 0:
                    self.keys = _map(lambda x: x[..., :prev, :], self.keys)
                    self.values = _map(lambda x: x[..., :prev, :], self.values)
                self.keys = _join(self.keys, new_k)
                self.values = _join(self.values, new_v)
            else:
                self.keys, self.values = new_k, new_v
        self.offset = self.offset + steps
        self._idx += steps
        assert self.keys is not None and self.values is not None
        qk = mx.quantize(keys, group_size=self.group_size, bits=self.bits)
        qv = mx.quantize(values, group_size=self.group_size, bits=self.bits)
        for dst, src in ((self.keys, qk), (self.values, qv)):
            for d, s in zip(dst, src, strict=True):
                d[..., prev : self._idx, :] = s
        return self.keys_and_values()

    def keys_and_values(self) -> tuple[Triple, Triple]:
        assert self.keys is not None and self.values is not None
        n = self._idx
        return _map(lambda x: x[..., :n, :], self.keys), _map(lambda x: x[..., :n, :], self.values)

    def prepare(
        self,
        *,
        left_padding: list[int] | None = None,
        lengths: list[int] | None = None,
        right_padding: list[int] | None = None,
    ) -> None:
        if left_padding is not None:
            if self.keys is not None:
                raise ValueError("left padding can only be added to an empty cache")
            pad = mx.array(left_padding)
            self.left_padding = self.left_padding + pad
            self.offset = self.offset - pad
        if right_padding is not None and max(right_padding) > 0:
            self._right_padding = mx.array(right_padding)

    def finalize(self) -> None:
        if self._right_padding is not None and self.keys is not None and self.values is not None:
            shift = self._right_padding[:, None]
            self.keys = _map(lambda x: dynamic_roll(x, shift, axis=2), self.keys)
            self.values = _map(lambda x: dynamic_roll(x, shift, axis=2), self.values)
            self.offset = self.offset - self._right_padding
            self.left_padding = self.left_padding + self._right_padding
            self._right_padding = None

    @property
    def state(self) -> Any:
        return self.keys, self.values, self.offset, self.left_padding

    @state.setter
    def state(self, v: Any) -> None:
        self.keys, self.values, self.offset, self.left_padding = v

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self._idx, n)
        self._idx -= n
        self.offset = self.offset - n
        return n

    def make_mask(self, N: int, return_array: bool = False, **kwargs: Any) -> mx.array:  # noqa: N803
        return create_causal_mask(N, offset=self._idx, left_padding=self.left_padding, **kwargs)

    def filter(self, batch_indices: list[int] | mx.array) -> None:
        index = mx.array(batch_indices) if isinstance(batch_indices, list) else batch_indices
        if self.keys is not None and self.values is not None:
            self.keys = _map(lambda x: x[index], self.keys)
            self.values = _map(lambda x: x[index], self.values)
        self.offset = self.offset[index]
        self.left_padding = self.left_padding[index]
        trim = min(cast(list[int], self.left_padding.tolist()), default=0)
        if trim > 0:
            if self.keys is not None and self.values is not None:
                self.keys = _map(lambda x: x[..., trim:, :], self.keys)
                self.values = _map(lambda x: x[..., trim:, :], self.values)
            self._idx -= trim
            self.left_padding = self.left_padding - trim

    def extend(self, other: BatchQuantizedKVCache) -> None:
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        idx = max(self._idx, other._idx)
        full = max(c.keys[0].shape[2] for c in (self, other) if c.keys is not None)
        like = next(c for c in (self, other) if c.keys is not None)

        def none_yet(rows: int, triple: Triple) -> Triple:
            return _map(lambda x: mx.zeros((rows, x.shape[1], 0, x.shape[3]), x.dtype), triple)

        def padded(c: BatchQuantizedKVCache) -> tuple[Triple, Triple, mx.array]:
            assert like.keys is not None and like.values is not None
            rows = c.offset.shape[0]
            k = c.keys if c.keys is not None else none_yet(rows, like.keys)
            v = c.values if c.values is not None else none_yet(rows, like.values)
            left = idx - c._idx
            right = full - k[0].shape[2] - left
            if right < 0:
                k = _map(lambda x: x[..., :right, :], k)
                v = _map(lambda x: x[..., :right, :], v)
                right = 0
            if left or right:
                widths = [(0, 0), (0, 0), (left, right), (0, 0)]
                k = _map(lambda x: mx.pad(x, widths), k)
                v = _map(lambda x: mx.pad(x, widths), v)
            return k, v, c.left_padding + left

        k1, v1, p1 = padded(self)
        k2, v2, p2 = padded(other)
        self.keys = _join(k1, k2, axis=0)
        self.values = _join(v1, v2, axis=0)
        self.offset = mx.concatenate([self.offset, other.offset])
        self.left_padding = mx.concatenate([p1, p2])
        self._idx = idx

    def extract(self, idx: int) -> Any:
        assert self.keys is not None and self.values is not None
        pad = cast(list[int], self.left_padding.tolist())[idx]
        end = self._idx
        cache: Any = QuantizedCache(group_size=self.group_size, bits=self.bits)
        cache.keys = _map(lambda x: mx.contiguous(x[idx : idx + 1, :, pad:end]), self.keys)
        cache.values = _map(lambda x: mx.contiguous(x[idx : idx + 1, :, pad:end]), self.values)
        cache.offset = end - pad
        return cache

    def size(self) -> int:
        return self._idx

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        if self.keys is None or self.values is None:
            return 0
        return sum(x.nbytes for x in (*self.keys, *self.values))


def _join(a: Triple, b: Triple, axis: int = 2) -> Triple:
    return (
        mx.concatenate([a[0], b[0]], axis=axis),
        mx.concatenate([a[1], b[1]], axis=axis),
        mx.concatenate([a[2], b[2]], axis=axis),
    )


def quantized_caches(model: Any, group_size: int, bits: int) -> list[QuantizedCache]:
    """A fresh per-layer quantized cache for one request."""
    return [QuantizedCache(group_size=group_size, bits=bits) for _ in model.layers]
