"""Several GGUF quantizations in one model folder: each has its own key, loads and chats
(``mlxserve.core.registry``; a real Q8_0 made from the tiny test model by llama.cpp)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from mlxserve.app import create_app
from mlxserve.settings import Settings
from tests.conftest import PUBLISHER

KEY = f"{PUBLISHER}/tiny-qwen2-GGUF"


@pytest.fixture(scope="module")
def quants_root(models_root, tmp_path_factory) -> Path:
    import llama_cpp

    root = tmp_path_factory.mktemp("quants")
    folder = root / PUBLISHER / "tiny-qwen2-GGUF"
    folder.mkdir(parents=True)
    source = models_root / PUBLISHER / "tiny-qwen2-gguf" / "tiny-qwen2-f32.gguf"
    try:
        os.link(source, folder / "tiny-qwen2-F32.gguf")
    except OSError:
        shutil.copy(source, folder / "tiny-qwen2-F32.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    out = str(folder / "tiny-qwen2-Q8_0.gguf").encode()
    assert llama_cpp.llama_model_quantize(str(source).encode(), out, params) == 0
    return root


def test_each_quantization_loads_and_chats(quants_root, tmp_path):
    settings = Settings(home=tmp_path / "home", models_dir=quants_root, auto_evict=False)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        listed = {m["key"]: m for m in client.get("/api/v1/models").json()["models"]}
        assert {KEY, f"{KEY}@F32", f"{KEY}@Q8_0"} <= set(listed)
        assert listed[f"{KEY}@Q8_0"]["quantization"]["name"] == "Q8_0"
        assert listed[KEY]["quantization"]["name"] == "F32"  # the first file, as before
        for key in (KEY, f"{KEY}@Q8_0"):
            r = client.post(
                "/v1/chat/completions",
                json={
                    "model": key,
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 3,
                },
            )
            assert r.status_code == 200, r.text
            assert r.json()["model"] == key
        loaded = client.get("/api/v1/models/loaded").json()["instances"]
        assert {i["model"] for i in loaded} == {KEY, f"{KEY}@Q8_0"}
        r = client.post("/api/v1/models/load", json={"model": f"{KEY}@q2_k"})
        assert r.status_code == 404, r.text
