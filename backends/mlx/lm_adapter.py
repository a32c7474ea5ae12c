"""Every use of mlx-lm's private parts, in one place.

Checked against mlx-lm 0.32.2; a release that renames any of these breaks only this module.
What mlx-lm exports without an underscore (``load``, ``generate_step``,
``speculative_generate_step``, ``BatchGenerator``, ``StopSequences``, the caches,
``sample_utils``, ``utils.sharded_load``, ``tool_parsers``) is used directly.

Private parts used here:

- ``mlx_lm.models.cache._BaseCache``: the base class of mlx-lm's caches, which our batched
  quantized KV cache (``backends/mlx/kvquant.py``) extends so the attention code and
  ``BatchGenerator`` treat it as one of theirs.
- ``TokenizerWrapper._tokenizer``: the Hugging Face tokenizer inside mlx-lm's wrapper (its
  vocabulary, special tokens, decoder and plain ``encode``).
"""

from __future__ import annotations

from typing import Any

from mlx_lm.models.cache import _BaseCache

BaseCache = _BaseCache


def hf_tokenizer(wrapper: Any) -> Any:
    """The Hugging Face tokenizer inside mlx-lm's ``TokenizerWrapper``."""
    return wrapper._tokenizer
