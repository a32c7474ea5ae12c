"""MLX vision models: mlx-vlm encodes images, mlx-lm keeps serving text.

A model whose ``config.json`` has a ``vision_config`` is loaded twice over the same weights:
mlx-vlm's model (vision tower + language model) and mlx-lm's text-only view of it, whose
parameters are the very arrays of mlx-vlm's language model (no second copy). Text-only
requests take mlx-lm's continuous batch exactly as on a text model. A request with images
runs mlx-vlm's ``generate_step`` beside the batch, one token per engine step: M-RoPE models
(Qwen2-VL and kin) place tokens after an image at positions that differ from their cache
offset, which mlx-lm's batch cannot express.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Generator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from backends.base import (
    EngineInfo,
    GenerationRequest,
    Job,
    PromptProgress,
    TokenStream,
    VisionPrompt,
)
from backends.mlx.engine import MLXEngine

log = logging.getLogger("mlxserve.backends")

# Per-request state mlx-vlm language models keep on the module between steps (M-RoPE
# positions); saved and restored around each step so image requests can interleave.
_STEP_STATE = ("_rope_deltas", "_position_ids")


def has_vision_tower(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("vision_config"), dict)


@dataclass(frozen=True)
class _Inputs:
    """What mlx-vlm's processor made of a prompt and its images (numpy arrays)."""

    input_ids: Any
    pixel_values: Any
    mask: Any
    extra: dict[str, Any]


class MLXVisionEngine(MLXEngine):
    """An mlx-vlm model behind the backend interface."""

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
        payload = _Inputs(
            input_ids, inputs.get("pixel_values"), inputs.get("attention_mask"), extra
        )
        return VisionPrompt(tokens, payload, n_image)

    def _admit(self, job: Job) -> None:
        if job.request.vision is not None:
            self._solo.append((job, self._image_steps(job.request, job.stream)))
        else:
            super()._admit(job)

    def _image_steps(
        self, request: GenerationRequest, stream: TokenStream
    ) -> Generator[int | PromptProgress, None, None]:
        from mlx_vlm.generate import generate_step

        inputs = request.vision
        assert isinstance(inputs, _Inputs)
        lm = self._vlm.language_model
        state: dict[str, Any] = {k: None for k in _STEP_STATE if hasattr(lm, k)}
        steps = generate_step(
            inputs.input_ids,
            self._vlm,
            inputs.pixel_values,
            inputs.mask,
            max_tokens=request.max_tokens + 1,
            sampler=self._sampler(request.sampling),
            logits_processors=self._processors(request),
            prefill_step_size=self.options.prefill_chunk,
            **inputs.extra,
        )
        try:
            while not stream.cancelled:
                for key, value in state.items():
                    setattr(lm, key, value)
                try:
                    token, _ = next(steps)
                except StopIteration:
                    return
                finally:
                    state = {k: getattr(lm, k) for k in state}
                yield int(token)
        finally:
            steps.close()
