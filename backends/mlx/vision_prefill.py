"""An image prompt's positions up to the end of its last image, through mlx-vlm, one chunk
per engine step (the batch's streams wait one chunk at a time): first the vision tower over
the images, then the language model over the prompt's embeddings. The text after the last
image is left to the batch, which processes it like any text (see ``backends/mlx/vision.py``).
"""

from __future__ import annotations

from typing import Any, cast

import mlx.core as mx
from mlx_lm.generate import generation_stream


def rope_delta(deltas: Any) -> int:
    """The shift of a one-prompt M-RoPE model's ``rope_deltas`` (shape (1, 1))."""
    return int(cast(list[int], mx.array(deltas).reshape(-1).tolist())[0])


class VisionPrefill:
    """Fills ``cache`` (holding the first ``start`` prompt positions) up to position ``end``
    with mlx-vlm's model ``vlm``; :attr:`delta` is then the RoPE shift of the text after the
    images (0 for models without M-RoPE)."""

    def __init__(
        self,
        vlm: Any,
        inputs: tuple[Any, Any, Any, dict[str, Any]],
        cache: list[Any],
        start: int,
        end: int,
    ) -> None:
        self._vlm = vlm
        self._ids, self._pixels, self._mask, self._extra = inputs
        self.cache = cache
        self.filled = start
        self.end = end
        self.delta = 0
        self._embeds: Any = None
        self._encoded = False
        # What the language model takes beside the embeddings (M-RoPE positions...).
        self.metadata: dict[str, Any] = {}

    def advance(self, chunk: int) -> bool:
        """Encode the images (the first call) or process the next chunk of at most ``chunk``
        positions; True once the cache holds every position before ``end``."""
        with mx.stream(generation_stream):
            if not self._encoded:
                self._encode()
                self._encoded = True
                return False
            if self.filled >= self.end:
                return True
            n = min(chunk, self.end - self.filled)
            a, b = self.filled, self.filled + n
            # Only the cache is evaluated: these positions' logits are never computed.
            self._vlm.language_model(
                inputs=self._ids[:, a:b],
                inputs_embeds=self._embeds[:, a:b],
                cache=self.cache,
                n_to_process=n,
                logits_to_keep=1,
                **self._extra,
                **self.metadata,
            )
            mx.eval([c.state for c in self.cache])
        mx.clear_cache()
        self.filled = b
        return self.filled >= self.end

    def _encode(self) -> None:
        out = self._vlm.get_input_embeddings(
            self._ids, self._pixels, mask=self._mask, **self._extra
        )
        # M-RoPE models return the whole prompt's positions (the language model slices them
        # at its cache offset) and the shift of the positions after the prompt.
        meta = {k: v for k, v in out.to_dict().items() if k != "inputs_embeds" and v is not None}
        self.metadata = meta
        deltas = meta.get("rope_deltas")
        if deltas is not None:
            self.delta = rope_delta(deltas)
        self._embeds = out.inputs_embeds
        mx.eval(self._embeds)
