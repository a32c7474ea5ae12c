"""The loading guardrail's arithmetic: estimates from the model files, budgets, the refusal."""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from mlxserve.core import footprint, memory
from mlxserve.core.instance import Instance, LoadRequest
from mlxserve.core.loader import ModelLoader
from mlxserve.core.manager import ModelManager
from mlxserve.core.registry import ModelInfo, Registry
from mlxserve.settings import Settings
from tests.conftest import (
    EMBED_GGUF_KEY,
    GGUF_KEY,
    MLX_KEY,
    THINK_GGUF_KEY,
    THINK_MLX_KEY,
)

# tiny-qwen2: 2 layers, 2 KV heads of 16 dimensions; keys and values.
KV_VALUES_PER_TOKEN = 2 * 2 * 16 * 2


@pytest.fixture(scope="module")
def registry(models_root, embedding_models):
    return Registry(models_root)


@pytest.mark.parametrize("key", [MLX_KEY, GGUF_KEY])
def test_estimate_is_weights_plus_kv_cache(registry, key):
    info = registry.get(key)
    est = memory.estimate(info, 1000, kv_f32=True)
    assert est.weights == info.size_bytes
    assert est.kv_cache == KV_VALUES_PER_TOKEN * 4 * 1000
    assert memory.estimate(info, 1000).kv_cache == KV_VALUES_PER_TOKEN * 2 * 1000
    assert est.total == est.weights + est.kv_cache + est.runtime
    assert memory.estimate(info, 1000, windows=3).kv_cache == 3 * 2000 * KV_VALUES_PER_TOKEN


@pytest.mark.parametrize("key", [MLX_KEY, GGUF_KEY])
def test_a_load_counts_every_parallel_window_and_the_prompt_cache(registry, key):
    info = registry.get(key)
    settings = Settings(max_batch_size=6, prompt_cache_bytes=50_000_000)
    loader = ModelLoader(settings)
    options = loader.options(info, LoadRequest(context_length=1000))
    need = asyncio.run(loader.estimate(info, options))
    # llama.cpp reserves one pool of cells its 4 parallel sequences share (the kv_windows
    # setting); MLX's batch grows to one window per sequence decoded at once.
    windows = 1 if info.format == "gguf" else 6
    assert need.windows == windows
    assert need.kv_cache == windows * 1000 * KV_VALUES_PER_TOKEN * 4  # f32 weights: f32 KV
    # MLX keeps finished requests' KV beside the batch; llama.cpp moves the ones new
    # requests do not use from its windows to host memory: both count the budget.
    assert need.prompt_cache == 50_000_000
    # MLX runs fused attention. llama.cpp without flash attention (the default) holds 4
    # heads' f32 scores of a 512-token micro-batch against every cell.
    scores = 4 * 512 * windows * 1000 * 4 if info.format == "gguf" else 0
    assert need.compute == scores
    # With flash attention (a load's or the server's), no scores, only its attention mask
    # (512 queries against every cell, f32 and f16).
    mask = 512 * windows * 1000 * 6 if info.format == "gguf" else 0
    flash = loader.options(info, LoadRequest(context_length=1000, flash_attention=True))
    assert asyncio.run(loader.estimate(info, flash)).compute == mask
    server_wide = ModelLoader(Settings(**{**settings.model_dump(), "flash_attention": True}))
    options = server_wide.options(info, LoadRequest(context_length=1000))
    assert asyncio.run(server_wide.estimate(info, options)).compute == mask
    # Tokenizers and the engine's own buffers, measured per format.
    assert need.runtime == memory.RUNTIME_BYTES[info.format] > 0
    total = need.weights + need.kv_cache + need.prompt_cache + need.compute + need.runtime
    assert need.total == total
    parallel = loader.options(info, LoadRequest(context_length=1000, parallel=2))
    parallel_windows = 1 if info.format == "gguf" else 2
    assert (
        asyncio.run(loader.estimate(info, parallel)).kv_cache
        == parallel_windows * 1000 * KV_VALUES_PER_TOKEN * 4
    )
    # The setting reserves more GGUF windows, at most one per parallel sequence.
    if info.format == "gguf":
        wide = ModelLoader(Settings(**{**settings.model_dump(), "kv_windows": 3}))
        for parallel_count, reserved in ((None, 3), (2, 2)):
            request = LoadRequest(context_length=1000, parallel=parallel_count)
            need = asyncio.run(wide.estimate(info, wide.options(info, request)))
            assert need.windows == reserved
            assert need.kv_cache == reserved * 1000 * KV_VALUES_PER_TOKEN * 4


@pytest.mark.parametrize("fmt", ["mlx", "gguf"])
def test_a_draft_counts_its_weights_and_kv(registry, fmt):
    main = registry.get(MLX_KEY if fmt == "mlx" else GGUF_KEY)
    draft = registry.get(THINK_MLX_KEY if fmt == "mlx" else THINK_GGUF_KEY)
    loader = ModelLoader(Settings(max_batch_size=2))
    options = loader.options(main, LoadRequest(context_length=1000, draft_model=draft.key))
    plain = asyncio.run(loader.estimate(main, options))
    need = asyncio.run(loader.estimate(main, options, draft))
    # GGUF: the draft's context mirrors the main one (its pool of cells, 16-bit KV).
    # MLX: up to a drafted request per parallel place, each with a window of the draft's KV
    # (f32 here); their main-model KV is in the instance's windows.
    kv = (1000 * KV_VALUES_PER_TOKEN * 2) if fmt == "gguf" else 2 * 1000 * KV_VALUES_PER_TOKEN * 4
    scores = 4 * 512 * 1000 * 4 if fmt == "gguf" else 0  # its context's attention scores
    assert need.draft == draft.size_bytes + kv + scores
    assert need.total == plain.total + need.draft
    if fmt == "gguf":  # with flash attention, its context's attention mask instead
        on = loader.options(main, LoadRequest(context_length=1000, flash_attention=True))
        mask = 512 * 1000 * 6
        assert asyncio.run(loader.estimate(main, on, draft)).draft == draft.size_bytes + kv + mask


def _projector(folder: Path, **meta: object) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(folder / "mmproj-x-f32.gguf"), "clip")
    for name, value in meta.items():
        writer.add_uint32(name, value)  # type: ignore[arg-type]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def _vision_info(folder: Path, fmt: str) -> ModelInfo:
    weights = folder / "m.gguf" if fmt == "gguf" else folder
    return ModelInfo(
        key=f"pub/{folder.name}",
        publisher="pub",
        name=folder.name,
        format=fmt,  # type: ignore[arg-type]
        path=folder,
        weights=weights,
        architecture="qwen2vl",
        quantization="F32",
        bits_per_weight=32.0,
        size_bytes=1000,
        params_string="",
        max_context_length=4096,
        trained_for_tool_use=False,
        vision=True,
    )


def test_a_gguf_projector_counts_its_warm_up_buffer(tmp_path):
    # The test model's projector: llama.cpp logs "compute buffer size = 29.64 MiB" for it
    # (a 1288x1288 warm-up image, flash attention on); the model comes to 29.3 MiB.
    meta = {
        "clip.vision.patch_size": 14,
        "clip.vision.embedding_length": 32,
        "clip.vision.feed_forward_length": 128,
        "clip.vision.image_max_pixels": 200704,
    }
    _projector(tmp_path, **meta)
    info = _vision_info(tmp_path, "gguf")
    warm = footprint.vision_bytes(info)
    assert warm == 1288 * 1288 * 3 * 4 + (46 * 46 * 4) * (6 * 32 + 128) * 4
    assert 0.95 < warm / (29.64 * 2**20) < 1.05
    assert memory.estimate(info, 512).vision == warm
    # No projector: no encoder to count.
    (tmp_path / "mmproj-x-f32.gguf").unlink()
    assert footprint.vision_bytes(info) == 0


def test_an_mlx_vision_tower_counts_its_largest_image(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "vision_config": {
                    "embed_dim": 32,
                    "mlp_ratio": 4,
                    "patch_size": 14,
                    "temporal_patch_size": 2,
                }
            }
        )
    )
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"max_pixels": 200704}))
    info = _vision_info(tmp_path, "mlx")
    patches = 200704 // (14 * 14)
    expected = 200704 * 6 * 4 + patches * (6 * 32 + 128) * 4
    assert footprint.vision_bytes(info) == expected
    assert memory.estimate(info, 512).vision == expected
    # A text model's estimate has no vision part.
    assert footprint.vision_bytes(replace(info, vision=False)) == 0


def test_embedding_models_have_no_kv_cache(registry):
    est = memory.estimate(registry.get(EMBED_GGUF_KEY), 512)
    assert est.kv_cache == 0 and est.weights > 0


def test_fixed_budget_counts_loaded_models_and_evictions():
    gb = memory.GB
    assert memory.budget(1.0, in_use=300_000_000, freed=0) == gb - 300_000_000
    assert memory.budget(1.0, in_use=300_000_000, freed=300_000_000) == gb


def test_free_memory_budget_adds_what_evictions_free(monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda: 2 * memory.GB)
    assert memory.budget(None, in_use=5 * memory.GB, freed=memory.GB) == 3 * memory.GB
    monkeypatch.setattr(memory, "available_memory", lambda: None)
    assert memory.budget(None, in_use=0, freed=0) is None


def test_free_memory_budget_keeps_room_for_what_loaded_models_may_grow_into(monkeypatch):
    gb = memory.GB
    monkeypatch.setattr(memory, "available_memory", lambda: 10 * gb)
    # Loaded models whose estimates come to 6 GB hold 2 GB now: 4 GB more may still come
    # (KV windows filling, prompt caches, drafts), so a new load may take 6 GB, not 10.
    assert memory.budget(None, in_use=6 * gb, freed=0, resident=2 * gb) == 6 * gb
    # Fully grown: everything they may hold is held already.
    assert memory.budget(None, in_use=6 * gb, freed=0, resident=6 * gb) == 10 * gb
    # Unloading a 3 GB model that holds 1 GB of the 2 GB gives back what it holds, and the
    # models that stay hold the rest: 10 + 1 - (3 - 1).
    assert memory.budget(None, in_use=6 * gb, freed=3 * gb, resident=2 * gb) == 9 * gb


def test_refusal_names_the_estimate_in_lmstudio_words():
    need = memory.Estimate(weights=20_000_000_000, kv_cache=2_920_000_000, context_length=8192)
    with pytest.raises(memory.LoadRefused) as refused:
        memory.check_fits("pub/big", need, 16 * memory.GB)
    message = refused.value.message
    assert message.startswith("Model loading was stopped due to insufficient system resources.")
    assert "requires approximately 22.92 GB" in message and "16.00 GB is available" in message
    assert "8192-token context" in message
    assert "adjust the model loading guardrail" in message
    assert refused.value.status == 400 and refused.value.param == "model"
    memory.check_fits("pub/big", need, 23 * memory.GB)
    memory.check_fits("pub/big", need, None)


def test_refusal_names_every_part_that_would_not_fit():
    need = memory.Estimate(
        weights=4_000_000_000,
        kv_cache=2_000_000_000,
        context_length=4096,
        windows=8,
        prompt_cache=1_073_741_824,
        draft=52_000_000,
        vision=30_700_000,
        compute=134_200_000,
    )
    assert need.total == 7_290_641_824
    with pytest.raises(memory.LoadRefused) as refused:
        memory.check_fits("pub/vl", need, 5 * memory.GB)
    message = refused.value.message
    assert (
        "requires approximately 7.29 GB (4.00 GB of weights, 2.00 GB of KV cache (8 windows "
        "of 4096 tokens), 1.07 GB of prompt cache, 52.0 MB of draft model, 30.7 MB of vision "
        "encoder, 0.13 GB of attention buffers), but only about 5.00 GB is available" in message
    )
    # A part that is zero is not named.
    plain = memory.Estimate(weights=45_000_000, kv_cache=8_400_000, context_length=4096, windows=4)
    assert plain.describe() == "45.0 MB of weights, 8.4 MB of KV cache (4 windows of 4096 tokens)"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/meminfo")
def test_available_memory_is_read_on_linux():
    free = memory.available_memory()
    assert free is not None and free > 0
    memory.give_back_freed_memory()


def test_the_prompt_cache_gives_way_to_what_is_free_and_nothing_else_does():
    need = memory.Estimate(
        weights=4_000_000_000, kv_cache=1_000_000_000, context_length=4096, prompt_cache=1 << 30
    )
    assert memory.fit("pub/m", need, 8 * memory.GB) is need
    # Only part of the prompt cache fits: the load goes ahead with that part.
    cut = memory.fit("pub/m", need, 5_500_000_000)
    assert cut.prompt_cache == 500_000_000 and cut.total == 5_500_000_000
    assert replace(cut, prompt_cache=need.prompt_cache) == need
    # Not even the rest fits: refused, naming what must fit (the prompt cache would give way).
    with pytest.raises(memory.LoadRefused) as refused:
        memory.fit("pub/m", need, 4_900_000_000)
    assert "requires approximately 5.00 GB" in refused.value.message
    assert "prompt cache" not in refused.value.message
    # Without shrinking (a busy model's eviction is weighed on the whole estimate).
    with pytest.raises(memory.LoadRefused):
        memory.fit("pub/m", need, 5_500_000_000, shrink=False)


@pytest.mark.parametrize("key", [MLX_KEY, GGUF_KEY])
def test_a_load_gets_the_prompt_cache_that_fits_beside_it(registry, tmp_path, key):
    info = registry.get(key)
    settings = Settings(
        home=tmp_path, guardrail_memory_gb=0.25, prompt_cache_bytes=1 << 30, max_batch_size=8
    )
    manager = ModelManager(settings, registry)

    async def run() -> None:
        instance = await manager.load_any(info)
        try:
            assert isinstance(instance, Instance) and instance.memory is not None
            need = instance.memory
            rest = need.total - need.prompt_cache
            assert 0 < need.prompt_cache == 250_000_000 - rest < 1 << 30
            assert instance.memory_bytes == 250_000_000
            # The engine keeps no more than what was counted: MLX its whole prompt cache; a
            # GGUF model the host memory it parks kept requests in (those it keeps in the
            # context's cells are counted as KV, and the cut leaves them alone).
            engine: Any = instance.engine
            if key == MLX_KEY:
                assert engine.options.prompt_cache_bytes == need.prompt_cache
                budget = engine.call(lambda: engine._prompt_cache.budget).result()
            else:
                assert engine.options.host_cache_bytes == need.prompt_cache
                assert engine.options.prompt_cache_bytes == 1 << 30
                budget = engine.call(engine._host_budget).result()
            assert budget == need.prompt_cache
        finally:
            await manager.close()

    asyncio.run(run())


def test_flash_attention_is_the_server_default_for_gguf_loads(registry, monkeypatch):
    from mlxserve import cli

    parser = cli.build_parser()
    off = cli._settings(parser.parse_known_args(["serve"])[0])
    on = cli._settings(parser.parse_known_args(["serve", "--flash-attention"])[0])
    assert (off.flash_attention, on.flash_attention) == (False, True)
    monkeypatch.setenv("MLXSERVE_FLASH_ATTENTION", "1")
    assert cli._settings(parser.parse_known_args(["serve"])[0]).flash_attention is True
    info = registry.get(GGUF_KEY)
    # The server's setting is the default; a load's own choice wins either way.
    for settings, asked, expected in (
        (off, None, False),
        (on, None, True),
        (on, False, False),
        (off, True, True),
    ):
        options = ModelLoader(settings).options(info, LoadRequest(flash_attention=asked))
        assert bool(options.flash_attention) is expected
        compute = asyncio.run(ModelLoader(settings).estimate(info, options)).compute
        # The mask (not the scores) against the one pool of 4096 cells.
        assert (compute == 512 * 4096 * 6) is expected
