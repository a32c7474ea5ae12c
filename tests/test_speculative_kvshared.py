"""MLX drafting on a model whose cache list is shorter than its layers (Gemma 4's KV-shared
layers): mlx-lm splits a cache list it is given at the model's layer count, so such a model
must not be handed one."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from mlx_lm.models.cache import make_prompt_cache
from script_loader import load_script

from backends import open_engine
from backends.base import GenerationRequest, LoadOptions, SamplingParams
from tests.conftest import PUBLISHER
from tests.test_mlx_scheduling import tokens_of

NAME = "tiny-gemma4-kvshared"


def test_a_kv_shared_model_drafting_for_itself_gives_the_undrafted_tokens(models_root):
    load_script("make_hybrid_models").generate(models_root, NAME, PUBLISHER)
    path = models_root / PUBLISHER / f"{NAME}-mlx"
    options = LoadOptions(context_length=2048, prompt_cache_bytes=0, prefill_chunk=16)
    engine = open_engine("mlx", path, options)
    try:
        model = engine._model
        assert len(make_prompt_cache(model)) < len(model.layers)
        engine.call(lambda: engine.prepare_draft(path)).result()
        prompt = tuple(engine.tokenize("Tell me a story about " + "a red fox " * 8))
        plain = GenerationRequest(prompt, SamplingParams(temperature=0.0), 16)
        drafted = replace(plain, draft=path, num_draft_tokens=3)

        async def run():
            return [await tokens_of(engine.submit(r)) for r in (plain, drafted)]

        undrafted, with_draft = asyncio.run(run())
        assert len(undrafted) == 16
        # Given one list split at the model's layer count, the model took the draft's caches
        # too and the draft ran without any: other tokens here, an EngineError on larger ones.
        assert with_draft == undrafted
    finally:
        engine.close()
