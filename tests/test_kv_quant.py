"""KV-cache quantization inside continuous batching (MLX: our batch cache of quantized
triples; GGUF: llama.cpp cache types), with the prompt cache and the load surfaces."""

from __future__ import annotations

import asyncio
import math

import httpx
import pytest

from backends import open_engine
from backends.base import Finished, GenerationRequest, LoadOptions, SamplingParams, Token
from tests.conftest import PUBLISHER, Server
from tests.engine_harness import ONEHEAD_NAME, ONEHEAD_ROOT, generate, onehead_models

pytestmark = pytest.mark.filterwarnings("ignore:llama_token_get_attr:DeprecationWarning")

WORDS = ["apple", "river", "stone", "cloud", "music", "green", "paper", "light"]


@pytest.fixture(scope="module")
def paths():
    return onehead_models()


def engine(paths, fmt, **kw):
    options = LoadOptions(context_length=2048, kv_cache_f32=True, **kw)
    return open_engine(fmt, paths[fmt], options)


def prompts(e):
    return [e.tokenize(f"{w} " + "tell me more " * (i * 3)) for i, w in enumerate(WORDS)]


async def first_logprobs(e, prompt):
    request = GenerationRequest(
        tuple(prompt), SamplingParams(temperature=0.0), 1, frozenset(), logprobs=20
    )
    async for item in e.submit(request):
        if isinstance(item, Token):
            return dict(item.logprobs.top)
        if isinstance(item, Finished):
            break
    raise AssertionError("no token")


def logprob_error(a, b):
    """Largest difference of the first step's log probabilities over tokens both list."""
    return max(abs(a[t] - b[t]) for t in a.keys() & b.keys())


@pytest.mark.parametrize("fmt", ["mlx", "gguf"])
def test_quantized_cache_batches_and_stays_close(paths, fmt):
    kw = {"kv_cache_bits": 8} if fmt == "mlx" else {"cache_type_k": "q8_0", "cache_type_v": "q8_0"}
    base, q8 = (
        engine(paths, fmt, prompt_cache_bytes=0),
        engine(paths, fmt, prompt_cache_bytes=0, **kw),
    )
    try:
        if fmt == "mlx":
            assert q8.info.load_config["kv_cache_quantization"] == {"bits": 8, "group_size": 64}
        else:
            assert q8.info.load_config["cache_type_v"] == "q8_0"
            assert q8.info.load_config["flash_attention"] is True
        ps = prompts(q8)

        async def run():
            solo = [await generate(q8, p, 12) for p in ps]
            together = await asyncio.gather(*(generate(q8, p, 12) for p in ps))
            errors = [
                logprob_error(await first_logprobs(base, p), await first_logprobs(q8, p))
                for p in ps
            ]
            return solo, together, errors

        solo, together, errors = asyncio.run(run())
        assert [r.tokens for r in together] == [r.tokens for r in solo]
        assert max(errors) < 0.02, errors
    finally:
        base.close()
        q8.close()


def test_mlx_bits_bound_the_error_and_the_bytes_per_token(paths):
    es = {b: engine(paths, "mlx", kv_cache_bits=b) for b in (None, 8, 4)}
    try:
        prompt = prompts(es[None])[5]

        async def run():
            out = {}
            for bits, e in es.items():
                lp = await first_logprobs(e, prompt)
                cold = await generate(e, prompt, 8)
                warm = await generate(e, prompt, 8)
                out[bits] = (lp, cold, warm, e._prompt_cache.nbytes)
            return out

        out = asyncio.run(run())
        err8 = logprob_error(out[None][0], out[8][0])
        err4 = logprob_error(out[None][0], out[4][0])
        assert err8 < err4
        for bits in (8, 4):
            lp, cold, warm, _ = out[bits]
            # The prompt cache serves quantized entries: the second run reuses the first's.
            assert warm.cached > 0 and warm.tokens == cold.tokens
        # One cached token per layer: 64 K and 64 V elements, in f32 unquantized; quantized,
        # packed bits plus one f32 scale and bias per group of 64.
        per_token = {b: out[b][3] for b in es}
        assert per_token[8] / per_token[None] == pytest.approx((8 + 1) / 32, rel=0.01)
        assert per_token[4] / per_token[None] == pytest.approx((4 + 1) / 32, rel=0.01)
    finally:
        for e in es.values():
            e.close()


@pytest.fixture(scope="module")
def kvq_server(paths, tmp_path_factory):
    srv = Server(ONEHEAD_ROOT, tmp_path_factory.mktemp("kvq-home"), "--no-auto-evict")
    yield srv
    srv.stop()


def test_load_endpoint_reports_and_accounts_for_the_quantized_cache(kvq_server):
    mlx, gguf = f"{PUBLISHER}/{ONEHEAD_NAME}-mlx", f"{PUBLISHER}/{ONEHEAD_NAME}-gguf"
    with httpx.Client(base_url=kvq_server.url, timeout=120) as http:
        loads = [
            {"model": mlx, "identifier": "plain"},
            {"model": mlx, "identifier": "q4", "kv_cache_quantization": 4},
            {"model": gguf, "identifier": "gq", "cache_type_k": "q8_0", "cache_type_v": "q4_0"},
        ]
        configs = {}
        for body in loads:
            r = http.post("/api/v1/models/load", json={**body, "echo_load_config": True})
            assert r.status_code == 200, r.text
            configs[body["identifier"]] = r.json()["load_config"]
        assert configs["q4"]["kv_cache_quantization"]["bits"] == 4
        assert configs["gq"]["flash_attention"] is True
        assert configs["gq"]["cache_type_k"] == "q8_0"
        loaded = {i["id"]: i for i in http.get("/api/v1/models/loaded").json()["instances"]}
        kv_plain = loaded["plain"]["memory"]["kv_cache_bytes"]
        kv_q4 = loaded["q4"]["memory"]["kv_cache_bytes"]
        # The quantized cache is all that differs between the two estimates.
        assert loaded["plain"]["memory_bytes"] - kv_plain == loaded["q4"]["memory_bytes"] - kv_q4
        assert kv_q4 / kv_plain == pytest.approx((4 + 1) / 32, rel=0.01)
        r = http.post(
            "/v1/chat/completions",
            json={"model": "q4", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        )
        assert r.status_code == 200
        for bad in ({"kv_cache_quantization": 5}, {"cache_type_k": "q9_0"}):
            r = http.post("/api/v1/models/load", json={"model": mlx, **bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(bad))
        for ident in configs:
            http.post("/api/v1/models/unload", json={"instance_id": ident})


def test_a_head_size_that_cannot_be_quantized_is_refused(models_root):
    # The shared tiny model has heads of 16: no group size fits.
    folder = models_root / PUBLISHER / "tiny-qwen2-mlx"
    with pytest.raises(ValueError, match="head size"):
        open_engine("mlx", folder, LoadOptions(context_length=512, kv_cache_bits=8))
    assert math.isfinite(LoadOptions(context_length=1, kv_cache_bits=8).kv_element_bits("mlx"))


def test_a_head_size_that_cannot_be_quantized_is_a_400_naming_the_option(server):
    # The load failing on the model's shape is the client's choice of option, not a server
    # fault: it was a 500 (model_load_failed) before.
    with httpx.Client(base_url=server.url, timeout=120) as http:
        r = http.post(
            "/api/v1/models/load",
            json={"model": f"{PUBLISHER}/tiny-qwen2-mlx", "kv_cache_quantization": 8},
        )
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "kv_cache_quantization" and "head size of 16" in error["message"]
        r = http.post(
            "/v1/chat/completions",
            json={
                "model": f"{PUBLISHER}/tiny-qwen2-mlx",
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 2,
            },
        )
        assert r.status_code == 200


def test_a_gguf_cache_type_the_heads_cannot_take_is_a_400_naming_the_option(server):
    # With flash attention (which a quantized V cache turns on) llama.cpp's quantized cache
    # types store blocks of 32 values; the tiny model's heads of 16 cannot hold them, and the
    # context fails to open: that was a 500 (model_load_failed).
    model = f"{PUBLISHER}/tiny-qwen2-gguf"
    with httpx.Client(base_url=server.url, timeout=120) as http:
        for options, param in (
            ({"cache_type_k": "q8_0", "cache_type_v": "q8_0"}, "cache_type_k"),
            ({"cache_type_v": "q4_0"}, "cache_type_v"),
            ({"cache_type_k": "q8_0", "flash_attention": True}, "cache_type_k"),
        ):
            r = http.post("/api/v1/models/load", json={"model": model, **options})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["param"] == param and "multiple of 32" in error["message"]
        # Without flash attention a quantized K cache fits heads of 16.
        r = http.post(
            "/api/v1/models/load",
            json={"model": model, "identifier": "k8", "cache_type_k": "q8_0"},
        )
        assert r.status_code == 200, r.text
        http.post("/api/v1/models/unload", json={"instance_id": "k8"})
        r = http.post(
            "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        )
        assert r.status_code == 200
