"""The MLX engine's requests decoded outside the batch: seeded requests (and every request of
a model whose cache cannot join a batch) on the single path, and drafted requests through
mlx-lm's speculative step."""

from __future__ import annotations

from collections.abc import Generator
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.generate import generate_step, generation_stream, speculative_generate_step
from mlx_lm.models.cache import make_prompt_cache

from backends.base import (
    DraftStats,
    GenerationRequest,
    Job,
    PromptProgress,
    Sampled,
    TokenStream,
)
from backends.mlx.kvquant import quantized_caches
from backends.mlx.sampling import Sampling, _logprobs, _with_history


class SoloPaths(Sampling):
    """The single and the speculative path of an MLX engine (see MLXEngine, which loads the
    model and the drafts)."""

    _model: Any
    _drafts: dict[Path, Any]
    _kv_group: int | None

    def _speculates(self, request: GenerationRequest) -> bool:
        """Drafted requests run on their own lane; mlx-lm's speculative step feeds logits
        processors the draft's tokens too, so a grammar or a penalty would see tokens that
        verification then rejects: those requests decode without the draft."""
        p = request.sampling
        penalties = p.repeat_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
        return (
            request.draft is not None
            and request.constraint is None
            and not penalties
            and self._kv_group is None
        )

    def _spec_steps(self, job: Job) -> Generator[Sampled | PromptProgress, None, None]:
        request = job.request
        assert request.draft is not None
        stats = job.draft = DraftStats()
        k = request.logprobs
        draft = self._drafts[request.draft]
        prompt = request.prompt
        # The prompt goes through the model and the draft one chunk per owner-thread step (as
        # on the single path), in the pieces mlx-lm's own prefill would take; its
        # speculative step then starts from the last prompt token. Left to mlx-lm, both
        # prefills ran in one step while every batched stream waited.
        caches = make_prompt_cache(self._model), make_prompt_cache(draft)
        spec = partial(
            speculative_generate_step,
            model=self._model,
            draft_model=draft,
            num_draft_tokens=request.num_draft_tokens,
            max_tokens=request.max_tokens,
            sampler=self._sampler(request.sampling),
        )
        if len(caches[0]) != len(self._model.layers):
            # mlx-lm splits a given cache list at len(model.layers): wrong for models with
            # fewer caches than layers (KV-shared layers: Gemma 3n, Gemma 4), so mlx-lm makes
            # its own caches and prefills in one step. (The draft's list is the remainder,
            # right whatever its length.)
            steps = spec(mx.array(prompt), prefill_step_size=self.options.prefill_chunk)
        else:
            done = 0
            models = ((self._model, caches[0]), (draft, caches[1]))
            for done in self._prefill_chunks(prompt, models):
                yield PromptProgress(done, len(prompt))
            steps = spec(mx.array(prompt[done:]), prompt_cache=caches[0] + caches[1])
        produced = 0
        drafted = accepted = 0
        in_round = False
        try:
            for token, logprobs, from_draft in steps:
                if not in_round:
                    # A round: the draft proposes, verification accepts some, then the
                    # model's own token ends it.
                    drafted = min(request.max_tokens - produced, request.num_draft_tokens)
                    accepted = 0
                    stats.total += drafted
                    in_round = True
                if from_draft:
                    accepted += 1
                    stats.accepted += 1
                else:
                    stats.rejected += drafted - accepted
                    in_round = False
                produced += 1
                if k is None:
                    yield int(token)
                else:
                    yield int(token), _logprobs([(logprobs, int(token), k)])[0]
        finally:
            if in_round:
                stats.ignored += drafted - accepted

    def _prefill_chunks(
        self, prompt: tuple[int, ...], models: tuple[tuple[Any, list[Any]], ...]
    ) -> Generator[int, None, None]:
        """Process all but the last prompt token into each (model, cache), one
        ``prefill_chunk`` at a time; yields the positions done after each chunk, for the
        caller to end the owner-thread step there."""
        chunk = self.options.prefill_chunk
        done = 0
        while len(prompt) - done > 1:
            n = min(chunk, len(prompt) - done - 1)
            with mx.stream(generation_stream):
                for model, cache in models:
                    model(mx.array(prompt[done : done + n])[None], cache=cache)
                    mx.eval([c.state for c in cache])
            mx.clear_cache()
            done += n
            yield done

    def _fresh_cache(self) -> list[Any] | None:
        """A new request's cache when it must not be mlx-lm's default (quantized KV)."""
        if self._kv_group is None or self.options.kv_cache_bits is None:
            return None
        return quantized_caches(self._model, self._kv_group, self.options.kv_cache_bits)

    def _steps(
        self, request: GenerationRequest, stream: TokenStream
    ) -> Generator[Sampled | PromptProgress, None, None]:
        """The single path: a seeded request, whose draws must not depend on its neighbours
        (and every request of a model whose cache cannot join a batch).

        The prompt advances one ``prefill_chunk`` per owner-thread step, so the streams
        beside it wait one chunk at most. The chunk does not grow when nothing else runs:
        a seeded request's output must not depend on what ran beside it."""
        prompt = request.prompt
        cache = self._fresh_cache() or make_prompt_cache(self._model)
        done = 0
        for done in self._prefill_chunks(prompt, ((self._model, cache),)):
            yield PromptProgress(done, len(prompt))
        processors = self._processors(request)
        if processors and done:
            # mlx-lm hands processors only the tokens it was given: put the prompt's
            # processed part in front, so penalties see the whole history as before.
            head = mx.array(prompt[:done])
            processors = [_with_history(p, head) for p in processors]
        k = request.logprobs
        for token, logprobs in generate_step(
            mx.array(prompt[done:]),
            self._model,
            max_tokens=-1,
            sampler=self._sampler(request.sampling),
            logits_processors=processors,
            prompt_cache=cache,
        ):
            if k is None:
                yield int(token)
            else:
                yield int(token), _logprobs([(logprobs, int(token), k)])[0]
