"""The guardrail on GGUF models with recurrent layers (Qwen3.5's Gated DeltaNet): llama.cpp
keeps KV cells for the attention layers only, and a recurrent state per sequence id of the
context, which the engine opens with three per parallel slot."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

from backends.base import LoadOptions
from mlxserve.core import footprint
from mlxserve.core.loader import ModelLoader
from mlxserve.core.registry import ModelInfo, Registry
from mlxserve.settings import Settings
from tests.conftest import GGUF_KEY
from tests.test_prompt_cache_hybrid import (
    PUBLISHER,
    hybrid_models,  # noqa: F401 - its fixture
)

MIB = 1 << 20
# The llama.cpp report of a context's recurrent memory: "CPU RS buffer size =     2.75 MiB".
RS_BUFFER = re.compile(r"RS buffer size =\s*([0-9.]+) MiB")
KV_BUFFER = re.compile(r"KV buffer size =\s*([0-9.]+) MiB")


def _hybrid(root: Path) -> ModelInfo:
    info = Registry(root).get(f"{PUBLISHER}/tiny-qwen35-hybrid-gguf")
    assert info is not None
    return info


def _llama_buffers(path: Path, n_ctx: int, n_seq: int) -> tuple[float, float]:
    """(KV, recurrent) buffer sizes in MiB that llama.cpp reports for a context over ``path``
    with ``n_ctx`` cells and ``n_seq`` sequence ids (f32 KV, as the engine opens an f32
    model's)."""
    code = f"""
import llama_cpp
llama_cpp.llama_backend_init()
model = llama_cpp.llama_model_load_from_file({str(path).encode()!r}, llama_cpp.llama_model_default_params())
params = llama_cpp.llama_context_default_params()
params.n_ctx, params.n_seq_max, params.kv_unified = {n_ctx}, {n_seq}, True
params.type_k = params.type_v = llama_cpp.GGML_TYPE_F32
llama_cpp.llama_free(llama_cpp.llama_init_from_model(model, params))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    kv, rs = KV_BUFFER.search(out.stderr), RS_BUFFER.search(out.stderr)
    assert kv and rs, out.stderr[-2000:]
    return float(kv.group(1)), float(rs.group(1))


def test_a_recurrent_state_per_sequence_id_is_what_llama_cpp_allocates(hybrid_models):  # noqa: F811
    info = _hybrid(hybrid_models)
    layers = footprint.recurrent(info)
    shape = footprint.geometry(info)
    assert layers is not None and shape is not None
    # Two of the four layers attend; the other two are recurrent.
    assert (layers.layers, shape.layers) == (2, 2)
    kv, rs = _llama_buffers(info.weights, 4096, 256)
    # llama.cpp prints MiB to two decimals.
    assert abs(layers.state_bytes * 256 / MIB - rs) <= 0.006
    assert abs(shape.kv_bytes_per_token(32) * 4096 / MIB - kv) <= 0.006


def test_a_hybrid_gguf_load_counts_three_recurrent_states_per_parallel_slot(hybrid_models):  # noqa: F811
    info = _hybrid(hybrid_models)
    layers, shape = footprint.recurrent(info), footprint.geometry(info)
    assert layers is not None and shape is not None
    options = LoadOptions(context_length=1000, kv_cache_f32=True, parallel=2)
    need = asyncio.run(ModelLoader(Settings()).estimate(info, options))
    # One pool of KV cells for both slots (the attention layers'), a state per sequence id.
    pool = shape.kv_bytes_per_token(32) * 1000
    assert need.kv_cache == pool + 6 * layers.state_bytes
    assert "KV cache (1 window of 1000 tokens, 6 recurrent states)" in need.describe()


def test_an_attention_only_gguf_has_no_recurrent_state(hybrid_models, models_root):  # noqa: F811
    info = Registry(models_root).get(GGUF_KEY)
    assert info is not None and footprint.recurrent(info) is None
    need = asyncio.run(
        ModelLoader(Settings()).estimate(info, LoadOptions(context_length=1000, parallel=2))
    )
    assert need.states == 0 and "recurrent" not in need.describe()
