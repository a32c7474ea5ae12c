"""Images with a quantized KV cache: a tiny Qwen2-VL with one attention head of 64 (the shared
one's heads of 16 take no quantization group on either engine), loaded with 8 KV bits on MLX
and q8_0 cache types on GGUF."""

from __future__ import annotations

import httpx
import openai
import pytest
from script_loader import load_script

from tests.conftest import MODELS_CACHE, PUBLISHER, Server
from tests.vision_support import IMG_A, IMG_B, QUESTION, N, _ask, _data_url, _together_equals_solo

ROOT = MODELS_CACHE.parent / "vision-models-kvq"
NAME = "tiny-qwen2-vl-onehead"
LOADS = {
    "vl-mlx-q8": {"model": f"{PUBLISHER}/{NAME}-mlx", "kv_cache_quantization": 8},
    "vl-gguf-q8": {
        "model": f"{PUBLISHER}/{NAME}-gguf",
        "cache_type_k": "q8_0",
        "cache_type_v": "q8_0",
    },
}


def _generate() -> None:
    # Its own copy: the sizes below stay out of the shared one.
    module = load_script("make_vision_models")
    make_base = module._base

    def onehead():
        base = make_base()
        base.HEADS, base.KV_HEADS = 1, 1
        return base

    module._base = onehead
    module.MROPE_SECTION = (8, 12, 12)  # halves of the head dimension, now 64
    module.generate(ROOT, publisher=PUBLISHER, name=NAME)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _generate()
    srv = Server(ROOT, tmp_path_factory.mktemp("vision-kvq-home"), "--no-auto-evict")
    with httpx.Client(base_url=srv.url, timeout=120) as http:
        for ident, body in LOADS.items():
            r = http.post(
                "/api/v1/models/load",
                json={**body, "identifier": ident, "echo_load_config": True},
            )
            assert r.status_code == 200, r.text
            config = r.json()["load_config"]
            if "kv_cache_quantization" in body:
                assert config["kv_cache_quantization"]["bits"] == 8, config
            else:
                assert config["cache_type_k"] == config["cache_type_v"] == "q8_0", config
    yield srv
    srv.stop()


@pytest.mark.parametrize("ident", list(LOADS))
def test_images_with_a_quantized_kv_cache(server, ident):
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    plain = _ask(oai, _data_url(IMG_A), model=LOADS[ident]["model"])
    a = _ask(oai, _data_url(IMG_A), model=ident)
    b = _ask(oai, _data_url(IMG_B), model=ident)
    assert a.choices[0].message.content and b.choices[0].message.content
    assert a.choices[0].message.content != b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens == plain.usage.prompt_tokens
    # A later turn about the image takes the first turn's quantized KV from the prompt cache.
    later = oai.chat.completions.create(
        model=ident,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": _data_url(IMG_A)}},
                    {"type": "text", "text": QUESTION},
                ],
            },
            {"role": "assistant", "content": a.choices[0].message.content},
            {"role": "user", "content": "And its colours?"},
        ],
        max_tokens=N,
        temperature=0,
    )
    assert later.usage.prompt_tokens_details.cached_tokens >= a.usage.prompt_tokens
    assert later.choices[0].message.content
    _together_equals_solo(oai, ident)
