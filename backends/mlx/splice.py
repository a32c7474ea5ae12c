"""Reuse of cached KV past a changed middle: runs of a stored entry moved to their new
positions (keys re-rotated), with the tokens between them computed over everything before.

Keys are cached after RoPE, so a key moved by ``delta`` positions is the stored key rotated
by ``delta``: rotations compose, which makes the moved key equal (to float rounding) the key
a cold run computes at the new position, for every layer whose key depends only on the token
and its position (layer 0). Deeper layers' moved keys and values still attended to the old
text before them: that part is approximate, and ``cache_reuse=0`` turns it off."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.rope_utils import Llama3RoPE, YarnRoPE

from backends.mlx.kvquant import QuantizedCache
from backends.mlx.prompt_cache import Reuse, Run

__all__ = ["Splice", "key_shifts", "rope_shift"]

Shift = Callable[[mx.array, int], mx.array]

# mlx-lm model modules whose attention caches exactly ``rope(k_proj(x) [normed], offset)``
# per layer under ``self_attn.rope`` (read in mlx-lm 0.32). Others (M-RoPE, learned or no
# positions, MLA's split keys) keep to exact prefix reuse.
_VERIFIED_MODULES = frozenset(
    {
        "llama",
        "qwen2",
        "qwen3",
        "qwen2_moe",
        "qwen3_moe",
        "mixtral",
        "olmo2",
        "granite",
        "glm4",
        "internlm3",
        "phi3",
        "gpt_oss",
    }
)


def _rotate(rope: Any, keys: mx.array, delta: int) -> mx.array:
    # Every position moves by the same delta: positions fold into the batch so that the rope
    # sees sequences of one token at offset ``delta``.
    b, h, n, d = keys.shape
    return rope(keys.reshape(b, h * n, 1, d), offset=delta).reshape(b, h, n, d)


def rope_shift(rope: Any) -> Shift | None:
    """A key shift through ``rope`` if it is a pure rotation by position (checked per class:
    a scale on the input, like YaRN's mscale, would be applied a second time)."""
    kind = type(rope)
    if kind in (nn.RoPE, Llama3RoPE):
        # Linear scaling is nn.RoPE's ``scale`` on the angle: it composes too.
        return lambda keys, delta: _rotate(rope, keys, delta)
    if kind is YarnRoPE:
        mscale, dims = float(rope.mscale), int(rope.dims)
        if mscale == 1.0:
            return lambda keys, delta: _rotate(rope, keys, delta)
        return lambda keys, delta: _rotate(rope, keys, delta).at[..., :dims].multiply(1 / mscale)
    return None


def key_shifts(model: Any) -> list[Shift] | None:
    """Per layer, how to move that layer's cached keys by ``delta`` positions; None when the
    model's positions cannot be moved that way (or we have not verified that they can)."""
    if type(model).__module__.rsplit(".", 1)[-1] not in _VERIFIED_MODULES:
        return None
    shifts = []
    for layer in model.layers:
        rope = getattr(getattr(layer, "self_attn", None), "rope", None)
        shift = rope_shift(rope) if rope is not None else None
        if shift is None:
            return None
        shifts.append(shift)
    return shifts


def _floats(cache: Any, start: int, end: int) -> tuple[mx.array, mx.array]:
    """Keys and values of positions [start, end) of a stored entry, as floats."""
    if isinstance(cache, QuantizedCache):
        g, b = cache.group_size, cache.bits

        def plain(t: Any) -> mx.array:
            w, scales, biases = (a[..., start:end, :] for a in t)
            return mx.dequantize(w, scales, biases, group_size=g, bits=b)

        return plain(cache.keys), plain(cache.values)
    return cache.keys[..., start:end, :], cache.values[..., start:end, :]


class Splice:
    """One request's cache assembled from a :class:`Reuse` on the owner thread: the shared
    prefix, then each gap computed by the model over the cache built so far and each run
    appended at its new position. :meth:`advance` computes at most one chunk per call, so the
    streams decoding beside it stall for one chunk at a time."""

    def __init__(self, prompt: Sequence[int], reuse: Reuse, shifts: list[Shift]) -> None:
        self.prompt = list(prompt)
        self.reuse = reuse
        self.cache = reuse.views()
        self.filled = reuse.prefix
        self._shifts = shifts
        self._runs: deque[Run] = deque(reuse.runs)

    def advance(self, model: Any, chunk: int) -> bool:
        """Compute the next gap chunk (appending any runs reached); True once complete."""
        while self._runs:
            run = self._runs[0]
            if self.filled < run.dst:
                n = min(chunk, run.dst - self.filled)
                # Only the cache is evaluated: the logits of these tokens are never computed.
                model(mx.array(self.prompt[self.filled : self.filled + n])[None], cache=self.cache)
                mx.eval([c.state for c in self.cache])
                self.filled += n
                return False
            delta = run.dst - run.src
            for view, stored, shift in zip(self.cache, self.reuse.entry, self._shifts, strict=True):
                keys, values = _floats(stored, run.src, run.src + run.length)
                view.update_and_fetch(shift(keys, delta) if delta else keys, values)
            mx.eval([c.state for c in self.cache])
            self.filled += run.length
            self._runs.popleft()
        return True
