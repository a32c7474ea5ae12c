"""MLX vision models: mlx-vlm encodes images, mlx-lm's continuous batch decodes every request.

A model whose ``config.json`` has a ``vision_config`` is loaded twice over the same weights:
mlx-vlm's model (vision tower + language model) and mlx-lm's text-only view of it, whose
parameters are the very arrays of mlx-vlm's language model (no second copy). Text-only
requests take mlx-lm's continuous batch exactly as on a text model. A request with images
is prefilled through mlx-vlm up to the end of its last image, one chunk per engine step
(:class:`~backends.mlx.vision_prefill.VisionPrefill`), then joins the same batch with that
cache: the batch processes the rest of its prompt and decodes it beside the text requests.
M-RoPE models (Qwen2-VL and kin) place the text after an image at positions that differ
from its cache index by a fixed delta; the request's cache carries that delta into the
batch's per-sequence RoPE offsets (:mod:`backends.mlx.rope_shift`). Seeded image requests
(whose draws must not depend on their neighbours) run mlx-vlm's own ``generate_step``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Generator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.cache import make_prompt_cache

from backends.base import EngineInfo, Job, PromptProgress, Sampled, VisionPrompt
from backends.mlx import vlm_adapter
from backends.mlx.engine import MLXEngine
from backends.mlx.prefill import IDLE_PREFILL_CHUNK
from backends.mlx.rope_shift import shift
from backends.mlx.sampling import _logprobs
from backends.mlx.vision_prefill import VisionPrefill, rope_delta

log = logging.getLogger("mlxserve.backends")


def has_vision_tower(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("vision_config"), dict)


@dataclass(frozen=True)
class _Inputs:
    """What mlx-vlm's processor made of a prompt and its images, and the prompt-cache key:
    the token ids with each image's positions holding a (negative) mark of its pixels."""

    input_ids: Any
    pixel_values: Any
    mask: Any
    extra: dict[str, Any]
    key: tuple[int, ...]
    # Positions up to the end of the last image: a cached prefix must cover them.
    media_end: int


def _mark(image: Any) -> int:
    digest = hashlib.sha256(image.tobytes()).hexdigest()
    return -1 - int(digest[:15], 16)


class MLXVisionEngine(MLXEngine):
    """An mlx-vlm model behind the backend interface."""

    def _setup(self) -> None:
        super()._setup()
        # Image requests whose prompt mlx-vlm is filling in, oldest first.
        self._prefills: list[tuple[Job, VisionPrefill, int]] = []

    def _load_model(self) -> tuple[Any, Any]:
        from mlx_lm import load as lm_load
        from mlx_vlm import load as vlm_load

        vlm, processor = vlm_load(str(self.path))
        # Lazily: the arrays mlx-lm would read are replaced before anything evaluates them.
        model, tokenizer = lm_load(str(self.path), lazy=True)[:2]
        shared: dict[str, Any] = dict(tree_flatten(vlm.language_model.parameters()))
        own = cast(list[tuple[str, Any]], tree_flatten(model.language_model.parameters()))
        if all(
            k in shared and shared[k].shape == v.shape and shared[k].dtype == v.dtype
            for k, v in own
        ):
            model.language_model.update(tree_unflatten([(k, shared[k]) for k, _ in own]))
        else:
            log.warning("%s: text weights not shared with the vision model", self.path.name)
        mx.eval(model.parameters())
        self._vlm, self._processor = vlm, processor
        return model, tokenizer

    def _load(self) -> EngineInfo:
        info = super()._load()
        image_processor = getattr(self._processor, "image_processor", None)
        max_pixels = getattr(image_processor, "max_pixels", None)
        if not isinstance(max_pixels, int):
            size = getattr(image_processor, "size", None)
            edge = size.get("longest_edge") if isinstance(size, dict) else None
            max_pixels = edge * edge if isinstance(edge, int) and edge < 10_000 else edge
        return replace(info, vision=True, image_max_pixels=max_pixels or None)

    def prepare_vision(self, text: str, images: list[Any]) -> VisionPrompt:
        # On the owner thread: the processor makes MLX arrays.
        return self.call(lambda: self._prepare(text, images)).result()

    def _prepare(self, text: str, images: list[Any]) -> VisionPrompt:
        from mlx_vlm.utils import prepare_inputs

        config = self._vlm.config
        inputs = prepare_inputs(
            self._processor,
            images=images,
            prompts=text,
            image_token_index=getattr(config, "image_token_index", None),
            add_special_tokens=False,
        )
        input_ids = inputs["input_ids"]
        extra = {
            k: v
            for k, v in inputs.items()
            if k not in ("input_ids", "pixel_values", "attention_mask")
        }
        tokens = tuple(int(t) for t in input_ids.flatten().tolist())
        image_ids = {
            getattr(config, name, None) for name in ("image_token_id", "image_token_index")
        } - {None}
        n_image = sum(1 for t in tokens if t in image_ids)
        # Each run of image tokens is one image, in order.
        marks = iter([_mark(image) for image in images] + [-1] * len(tokens))
        key: list[int] = []
        for i, t in enumerate(tokens):
            if t in image_ids:
                key.append(next(marks) if i == 0 or tokens[i - 1] not in image_ids else key[-1])
            else:
                key.append(t)
        media_end = max((i + 1 for i, t in enumerate(tokens) if t in image_ids), default=0)
        payload = _Inputs(
            input_ids,
            inputs.get("pixel_values"),
            inputs.get("attention_mask"),
            extra,
            tuple(key),
            media_end,
        )
        return VisionPrompt(tokens, payload, n_image)

    def _admit(self, job: Job) -> None:
        request = job.request
        inputs = request.vision
        if inputs is None:
            super()._admit(job)
            return
        assert isinstance(inputs, _Inputs)
        if request.sampling.seed is not None or not self._batchable:
            self._solo.append((job, self._image_steps(job)))
            return
        # The prompt cache is keyed by the images' pixels: a later turn of a chat about them
        # finds its first turn here (or on disk), and its images are not encoded again.
        cache, cached = self._prompt_cache.fetch(inputs.key)
        if self._spill is not None:
            spilled, n = self._spill.fetch(inputs.key, cached)
            if spilled is not None:
                cache, cached = spilled, n
        if cache is None:
            cache, cached = self._fresh_cache() or make_prompt_cache(self._model), 0
        delta = self._text_delta(inputs) if cached >= inputs.media_end else None
        if delta is not None:
            self._join_batch(job, cache, cached, cached, delta)
            return
        arrays = (inputs.input_ids, inputs.pixel_values, inputs.mask, inputs.extra)
        prefill = VisionPrefill(self._vlm, arrays, cache, cached, inputs.media_end)
        self._prefills.append((job, prefill, cached))
        if self._prompt_cache.budget > 0:
            job.cache_written = len(inputs.key) - cached
        job.progress(cached, len(inputs.key), cached)

    def _text_delta(self, inputs: _Inputs) -> int | None:
        """The RoPE shift of the text after the prompt's images, without encoding them
        (None: this model cannot tell it so)."""
        lm = self._vlm.language_model
        if not vlm_adapter.step_state(lm):
            return 0  # no M-RoPE: positions are cache indices
        rope_index = getattr(lm, "get_rope_index", None)
        if not callable(rope_index):
            return None
        extra = inputs.extra
        _, deltas = rope_index(
            inputs.input_ids, extra.get("image_grid_thw"), extra.get("video_grid_thw"), inputs.mask
        )
        return rope_delta(deltas)

    def _join_batch(
        self, job: Job, cache: list[Any] | None, start: int, cached: int, delta: int = 0
    ) -> None:
        # Every request's cache carries its shift (0 for text): the batch cache is merged by
        # the first one's kind.
        if cache is None:
            cache = self._fresh_cache() or make_prompt_cache(self._model)
        super()._join_batch(job, shift(cache, delta), start, cached)

    def _cache_key(self, job: Job, tokens: list[int]) -> list[int]:
        inputs = job.request.vision
        if not isinstance(inputs, _Inputs):
            return tokens
        return [*inputs.key, *tokens[len(inputs.key) :]]

    def _running(self) -> int:
        return super()._running() + len(self._prefills)

    def busy(self) -> bool:
        return bool(self._prefills) or super().busy()

    def step(self) -> None:
        if self._prefills:
            self._step_prefill()
        super().step()

    def abort(self, exc: BaseException) -> None:
        prefills, self._prefills = self._prefills, []
        for job, *_ in prefills:
            job.fail(exc)
        super().abort(exc)

    def _step_prefill(self) -> None:
        """One chunk of the oldest image prompt; a filled one joins the batch."""
        job, prefill, cached = self._prefills[0]
        if job.cancelled:
            self._prefills.pop(0)
            job.finish("cancelled")
            return
        chunk = self.options.prefill_chunk
        try:
            done = prefill.advance(chunk if self._decoding() else max(chunk, IDLE_PREFILL_CHUNK))
            if done:
                self._prefills.pop(0)
                self._join_batch(job, prefill.cache, prefill.filled, cached, prefill.delta)
            else:
                job.progress(prefill.filled, len(job.request.prompt), cached)
        except Exception as exc:
            log.exception("processing an image prompt failed on %s", self.path.name)
            if self._prefills and self._prefills[0][0] is job:
                self._prefills.pop(0)
            job.fail(exc)

    def _image_steps(self, job: Job) -> Generator[Sampled | PromptProgress, None, None]:
        """The single path of an image request: the prompt prefilled one ``prefill_chunk``
        per step (the chunk does not grow when nothing else runs: the output must not depend
        on what ran beside it), then mlx-vlm's own ``generate_step``; for seeded requests (and
        models whose cache cannot join a batch)."""
        from mlx_vlm.generate import generate_step

        request = job.request
        inputs = request.vision
        assert isinstance(inputs, _Inputs)
        lm = self._vlm.language_model
        state = vlm_adapter.step_state(lm)
        ids, pixels, mask, extra = inputs.input_ids, inputs.pixel_values, inputs.mask, inputs.extra
        total = len(inputs.key)
        cache, cached = self._prompt_cache.fetch(inputs.key)
        if cache is None:
            # Quantized like the text batch's when the model has KV-cache bits, so the kept
            # entry can serve a later text or image request alike.
            cache, cached = self._fresh_cache() or make_prompt_cache(self._model), 0
        if self._prompt_cache.budget > 0:
            job.cache_written = total - cached
        rope_index = getattr(lm, "get_rope_index", None)
        done = cached
        if cached >= inputs.media_end and (callable(rope_index) or not state):
            # A stored prefix holds every image (a later turn of a chat about them): only
            # the text after it is processed, the images are not encoded again.
            if callable(rope_index):
                # M-RoPE positions come from the whole prompt; the model slices them at its
                # cache offset.
                positions, deltas = rope_index(
                    ids, extra.get("image_grid_thw"), extra.get("video_grid_thw"), mask
                )
                extra = {**extra, "position_ids": positions, "rope_deltas": deltas}
            job.progress(cached, total, cached)
        else:
            arrays = (ids, pixels, mask, extra)
            prefill = VisionPrefill(self._vlm, arrays, cache, cached, total - 1)
            while not prefill.advance(self.options.prefill_chunk):
                yield PromptProgress(prefill.filled, total, cached)
            extra = {**extra, **prefill.metadata}
            done = prefill.filled
        if "position_ids" in extra and "rope_deltas" in extra:
            state = vlm_adapter.rope_state(state, extra["position_ids"], extra["rope_deltas"])
        if done:
            ids, pixels, mask = ids[:, done:], None, None
        steps = generate_step(
            ids,
            self._vlm,
            pixels,
            mask,
            max_tokens=request.max_tokens + 1,
            sampler=self._sampler(request.sampling),
            logits_processors=self._processors(request),
            prefill_step_size=self.options.prefill_chunk,
            prompt_cache=cache,
            **extra,
        )
        generated: list[int] = []
        k = request.logprobs
        try:
            while not job.cancelled:
                vlm_adapter.load_state(lm, state)
                try:
                    token, logprobs = next(steps)
                except StopIteration:
                    return
                finally:
                    state = vlm_adapter.save_state(lm, state)
                generated.append(int(token))
                if k is None:
                    yield int(token)
                else:
                    # mlx-vlm yields the processed logits' log-softmax, as mlx-lm does.
                    yield int(token), _logprobs([(logprobs, int(token), k)])[0]
        finally:
            steps.close()
            if generated:
                self._prompt_cache.store([*inputs.key, *generated], cache)
