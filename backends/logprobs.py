"""Log probabilities from a logits row, in numpy (the GGUF engine; MLX computes its own)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np

from backends.base import SamplingParams, TokenLogprobs


def ranked(ids: Iterable[int], values: Iterable[float], k: int) -> tuple[tuple[int, float], ...]:
    """The ``k`` most likely of the candidates, most likely first, lower id first on ties;
    impossible tokens (``-inf``: masked by a grammar) are left out."""
    pairs = [(int(i), float(v)) for i, v in zip(ids, values, strict=True) if v != -np.inf]
    pairs.sort(key=lambda p: (-p[1], p[0]))
    return tuple(pairs[:k])


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    peak = np.max(x)
    return x - (peak + np.log(np.sum(np.exp(x - peak))))


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
    softmax of ``logits`` (already penalised and masked)."""
    lp = log_softmax(logits)
    top: tuple[tuple[int, float], ...] = ()
    if k > 0:
        # A few spare candidates, so ties at the boundary still resolve by lower id.
        m = min(k + 8, lp.shape[0])
        ids = np.argpartition(-lp, m - 1)[:m]
        top = ranked(ids.tolist(), lp[ids].tolist(), k)
    return TokenLogprobs(float(lp[token]), top)
