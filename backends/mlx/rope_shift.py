"""Per-sequence RoPE position shifts inside mlx-lm's batch caches.

mlx-lm's ``BatchKVCache`` keeps, per sequence, an ``offset`` that the attention layers use as
the RoPE position of the next token, apart from its write index (``_idx``) and left padding:
a shift added to that offset moves a sequence's positions without touching its keys, values
or mask, and it survives ``filter``, ``extend`` and ``trim`` (they index, concatenate or
subtract from the offsets). Only ``merge``, which builds the batch cache from requests'
caches, computes offsets afresh: the request caches here carry their shift (``rope_delta``)
and add it there.

M-RoPE models (Qwen2-VL and kin) give the text after an image positions that differ from its
cache index by a fixed delta (the image's tokens take fewer positions than tokens); text
tokens take equal temporal, height and width positions, which is plain RoPE at
``index + delta``. Every request of a batch must hold one of these caches, delta 0 for text,
since ``merge`` is that of the first request's cache.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache

from backends.mlx.kvquant import QuantizedCache


def _shifted(batch: Any, caches: list[Any]) -> Any:
    deltas = [getattr(c, "rope_delta", 0) for c in caches]
    if any(deltas):
        batch.offset = batch.offset + mx.array(deltas)
    return batch


class ShiftedKVCache(KVCache):
    """A request's KV cache whose later tokens sit ``rope_delta`` RoPE positions away from
    their index once it joins a batch."""

    rope_delta = 0

    @classmethod
    def merge(cls, caches: list[Any]) -> BatchKVCache:
        return _shifted(BatchKVCache.merge(caches), caches)


class ShiftedQuantizedCache(QuantizedCache):
    """:class:`ShiftedKVCache` for a quantized KV cache."""

    rope_delta = 0

    @classmethod
    def merge(cls, caches: list[Any]) -> Any:
        return _shifted(QuantizedCache.merge(caches), caches)


def shift(cache: list[Any], delta: int) -> list[Any]:
    """New cache objects over ``cache``'s arrays, carrying ``delta`` into the batch; layers
    of another kind (sliding window, recurrent state) are kept as they are, which only a
    delta of 0 allows."""
    out: list[Any] = []
    for c in cache:
        layer: Any
        if type(c) is KVCache:
            layer = ShiftedKVCache()
        elif type(c) is QuantizedCache:
            layer = ShiftedQuantizedCache(group_size=c.group_size, bits=c.bits)
        elif delta:
            raise ValueError(f"a {type(c).__name__} layer cannot take a RoPE shift")
        else:
            out.append(c)
            continue
        layer.keys, layer.values, layer.offset = c.keys, c.values, c.offset
        layer.rope_delta = delta
        out.append(layer)
    return out
