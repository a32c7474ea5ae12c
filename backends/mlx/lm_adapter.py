"""Every use of mlx-lm's private parts, in one place.

Checked against mlx-lm 0.32.2; a release that renames any of these breaks only this module.
What mlx-lm exports without an underscore (``load``, ``generate_step``,
``speculative_generate_step``, ``BatchGenerator``, ``StopSequences``, the caches,
``sample_utils``, ``utils.sharded_load``, ``tool_parsers``) is used directly.

Private parts used here:

- ``mlx_lm.models.cache._BaseCache``: the base class of mlx-lm's caches, which our batched
  quantized KV cache (``backends/mlx/kvquant.py``) extends so the attention code and
  ``BatchGenerator`` treat it as one of theirs.
- ``RotatingKVCache._temporal_order`` and ``_idx``: its ring buffer in time order and the write
  position, to keep a sliding-window layer in a prompt-cache checkpoint
  (``backends/mlx/prompt_cache.py``).
- ``TokenizerWrapper._tokenizer``: the Hugging Face tokenizer inside mlx-lm's wrapper (its
  vocabulary, special tokens, decoder and plain ``encode``).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import RotatingKVCache, _BaseCache

BaseCache = _BaseCache


def hf_tokenizer(wrapper: Any) -> Any:
    """The Hugging Face tokenizer inside mlx-lm's ``TokenizerWrapper``."""
    return wrapper._tokenizer


def rotating_copy(cache: RotatingKVCache) -> RotatingKVCache:
    """A ``RotatingKVCache`` holding what ``cache`` holds, its ring buffer laid out oldest
    position first (at most the window when ``keep`` is 0) in arrays of its own, unevaluated."""
    keys, values = cache._temporal_order(cache.keys), cache._temporal_order(cache.values)
    if cache.keep == 0:
        held = cache.size()
        keys, values = keys[..., -held:, :], values[..., -held:, :]
    copy = RotatingKVCache(cache.max_size, cache.keep)
    copy.keys, copy.values = mx.contiguous(keys), mx.contiguous(values)
    copy.offset = cache.offset
    copy._idx = keys.shape[2]
    return copy
