"""The bench's in-process GGUF baselines and step replays take the KV cache type the server
gives the same file (``mlxserve.core.loader``: f32 for f32 weights, as the bench models'),
or the figures compare different work: an f16 cache made the f32 bench model's prompt
cheaper in process than on the server, and ``ttft_added_ms`` counted the difference."""

from __future__ import annotations

import inspect

import llama_cpp
from bench_common import server_kv_f32
from bench_inproc import _first_token

from mlxserve.core.instance import LoadRequest
from mlxserve.core.loader import ModelLoader
from mlxserve.core.registry import Registry
from mlxserve.settings import Settings
from tests.conftest import GGUF_KEY


def test_the_in_process_ttft_baseline_takes_the_servers_kv_type(models_root):
    info = Registry(models_root).get(GGUF_KEY)
    assert info is not None
    options = ModelLoader(Settings()).options(info, LoadRequest())
    # The test model's weights are f32, as the bench models' are.
    assert options.kv_cache_f32
    assert server_kv_f32(info.weights) == options.kv_cache_f32
    first, close = _first_token("gguf", info.weights)
    try:
        llm = inspect.getclosurevars(first).nonlocals["llm"]
        assert llm.context_params.type_k == llama_cpp.GGML_TYPE_F32
        assert llm.context_params.type_v == llama_cpp.GGML_TYPE_F32
        assert first("one two three") > 0
    finally:
        close()
