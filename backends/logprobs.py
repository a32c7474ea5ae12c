"""Log probabilities from a logits row, in numpy (the GGUF engine; MLX computes its own)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

import numpy as np

from backends.base import SamplingParams, TokenLogprobs
from backends.stream import DeferredLogprobs


def ranked(ids: Iterable[int], values: Iterable[float], k: int) -> tuple[tuple[int, float], ...]:
    """The ``k`` most likely of the candidates, most likely first, lower id first on ties;
    impossible tokens (``-inf``: masked by a grammar) are left out."""
    pairs = [(int(i), float(v)) for i, v in zip(ids, values, strict=True) if v != -np.inf]
    pairs.sort(key=lambda p: (-p[1], p[0]))
    return tuple(pairs[:k])


def penalize(logits: np.ndarray, window: Iterable[int], p: SamplingParams) -> np.ndarray:
    """``logits`` with llama.cpp's repetition, frequency and presence penalties applied for
    the tokens in ``window`` (the recent sampled tokens its penalty sampler has seen)."""
    if p.repeat_penalty == 1.0 and not p.frequency_penalty and not p.presence_penalty:
        return logits
    counts = Counter(window)
    if not counts:
        return logits
    out = logits.copy()
    ids = np.fromiter(counts.keys(), dtype=np.int64)
    n = np.fromiter(counts.values(), dtype=np.float32)
    row = out[ids]
    row = np.where(row <= 0, row * p.repeat_penalty, row / p.repeat_penalty)
    out[ids] = row - n * p.frequency_penalty - p.presence_penalty
    return out


def token_logprobs(logits: np.ndarray, token: int, k: int) -> TokenLogprobs:
    """The sampled ``token``'s log probability and the ``k`` most likely tokens' under the
    softmax of ``logits`` (already penalised and masked), in float32."""
    peak = float(logits.max())
    lse = peak + math.log(float(np.exp(logits - peak).sum()))
    top: tuple[tuple[int, float], ...] = ()
    if k > 0:
        # k passes of argmax beat a partition of the whole vocabulary several times over, and
        # argmax takes the lowest id among equals.
        work = logits.copy()
        ids = []
        for _ in range(min(k, work.shape[0])):
            i = int(work.argmax())
            if work[i] == -np.inf:
                break  # the grammar allows fewer than k tokens
            ids.append(i)
            work[i] = -np.inf
        top = ranked(ids, (logits[ids] - lse).tolist(), k)
    return TokenLogprobs(float(logits[token]) - lse, top)


class RowLogprobs(DeferredLogprobs):
    """:func:`token_logprobs` of a logits row, computed where the token is delivered (the
    event loop) instead of on the owner thread between two decodes (≈ 0.25 ms of a
    152k-token row). Holds its own copy of the row until then."""

    _args: tuple[np.ndarray, int, int] | None

    def __init__(self, logits: np.ndarray, token: int, k: int) -> None:
        super().__init__()
        row = logits if logits.flags.owndata else logits.copy()
        object.__setattr__(self, "_args", (row, token, k))

    def _compute(self) -> TokenLogprobs:
        assert self._args is not None
        row, token, k = self._args
        object.__setattr__(self, "_args", None)  # the row's memory goes with the result
        return token_logprobs(row, token, k)
