"""How the MLX engine samples: per-request samplers and logits processors (penalties, a
grammar), and log probabilities of sampled tokens."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import cast

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors

from backends.base import PENALTY_WINDOW, Engine, GenerationRequest, SamplingParams, TokenLogprobs
from backends.constraint import GrammarConstraint
from backends.logprobs import ranked

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def _greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def _logprobs(rows: list[tuple[mx.array, int, int]]) -> list[TokenLogprobs]:
    """For each (log-softmax row, sampled token, k): the token's log probability and the k
    most likely tokens', computed for all rows in one evaluation."""
    lps = mx.stack([row for row, _, _ in rows]).astype(mx.float32)
    tokens = mx.array([[token] for _, token, _ in rows])
    chosen = mx.take_along_axis(lps, tokens, axis=-1)[:, 0]
    k = max(k for _, _, k in rows)
    if not k:
        mx.eval(chosen)
        return [TokenLogprobs(float(v)) for v in cast(list[float], chosen.tolist())]
    # A few spare candidates, so ties at the boundary still resolve by lower id.
    m = min(k + 8, lps.shape[-1])
    ids = mx.argpartition(-lps, m - 1, axis=-1)[:, :m]
    values = mx.take_along_axis(lps, ids, axis=-1)
    mx.eval(chosen, ids, values)
    picked = cast(list[float], chosen.tolist())
    id_rows = cast(list[list[int]], ids.tolist())
    value_rows = cast(list[list[float]], values.tolist())
    return [
        TokenLogprobs(float(v), ranked(i, vs, n))
        for v, i, vs, (_, _, n) in zip(picked, id_rows, value_rows, rows, strict=True)
    ]


def _with_history(processor: LogitsProcessor, head: mx.array) -> LogitsProcessor:
    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        return processor(mx.concatenate([head, tokens]), logits)

    return process


def _constrain(constraint: GrammarConstraint) -> LogitsProcessor:
    calls = 0

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        # Called once per sampled token; from the second call on, the history ends with the
        # token sampled at the previous call (the batched and the single path alike).
        nonlocal calls
        if calls:
            constraint.advance(int(tokens[-1].item()))  # type: ignore[arg-type]
        calls += 1
        allowed = mx.array(constraint.allowed(logits.shape[-1]))
        return mx.where(allowed, logits, -mx.inf)

    return process


class Sampling(Engine):
    """Samplers and logits processors for an MLX engine's requests (see MLXEngine)."""

    _vocab_size: int

    def _sampler(self, p: SamplingParams) -> Callable[[mx.array], mx.array]:
        if p.temperature == 0:
            # One shared function: a batch whose requests all share it samples in one call.
            return _greedy
        filters: list[Callable[[mx.array], mx.array]] = []
        # A top-k as large as the vocabulary keeps every token (mlx-lm refuses such a k).
        if 0 < p.top_k < self._vocab_size:
            filters.append(lambda x: apply_top_k(x, p.top_k))
        if 0 < p.top_p < 1:
            filters.append(lambda x: apply_top_p(x, p.top_p))
        if p.min_p > 0:
            filters.append(lambda x: apply_min_p(x, p.min_p))
        # A key per request, not MLX's global random state, so that a seeded request is
        # reproducible whatever else runs.
        seed = p.seed % (1 << 63) if p.seed is not None else random.getrandbits(62)
        key = mx.random.key(seed)
        inv_temp = 1.0 / p.temperature

        def sample(logprobs: mx.array) -> mx.array:
            nonlocal key
            key, sub = mx.random.split(key)
            for f in filters:
                logprobs = f(logprobs)
            return mx.random.categorical(logprobs * inv_temp, key=sub)

        return sample

    def _processors(self, request: GenerationRequest) -> list[LogitsProcessor]:
        p = request.sampling
        processors: list[LogitsProcessor] = make_logits_processors(
            repetition_penalty=p.repeat_penalty if p.repeat_penalty != 1.0 else None,
            repetition_context_size=PENALTY_WINDOW,
            presence_penalty=p.presence_penalty or None,
            presence_context_size=PENALTY_WINDOW,
            frequency_penalty=p.frequency_penalty or None,
            frequency_context_size=PENALTY_WINDOW,
        )
        if request.constraint is not None:
            processors.append(_constrain(request.constraint))
        return processors
