"""The loading guardrail's arithmetic: estimates from the model files, budgets, the refusal."""

from __future__ import annotations

import sys

import pytest

from backends.base import LoadOptions
from mlxserve.core import memory
from mlxserve.core.registry import Registry
from tests.conftest import EMBED_GGUF_KEY, GGUF_KEY, MLX_KEY

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
    assert est.total == est.weights + est.kv_cache
    # A GGUF context reserves one window per parallel sequence; MLX grows its caches.
    windows = LoadOptions(context_length=1000).kv_windows(info.format)
    assert windows == (4 if info.format == "gguf" else 1)
    assert memory.estimate(info, 1000, windows=windows).kv_cache == windows * 2000 * (
        KV_VALUES_PER_TOKEN
    )


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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/meminfo")
def test_available_memory_is_read_on_linux():
    free = memory.available_memory()
    assert free is not None and free > 0
    memory.give_back_freed_memory()
