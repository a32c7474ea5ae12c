"""Per-instance parallelism (LM Studio's ``parallel``): set at load through the REST API, the
CLI and the SDK's load config, honoured by both engines, and reported where LM Studio does."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from mlxserve.sdk.kvconfig import load_request
from mlxserve.sdk.transport import SdkError
from tests.conftest import GGUF_KEY, MLX_KEY
from tests.engine_harness import generate, load

pytestmark = pytest.mark.filterwarnings("ignore:llama_token_get_attr:DeprecationWarning")


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


@pytest.mark.parametrize("key", [MLX_KEY, GGUF_KEY])
def test_load_with_parallel_is_reported_everywhere(http, key):
    ident = f"par-{key.rsplit('-', 1)[1]}"
    r = http.post(
        "/api/v1/models/load",
        json={"model": key, "identifier": ident, "parallel": 3, "echo_load_config": True},
    )
    assert r.status_code == 200, r.text
    try:
        assert r.json()["load_config"]["parallel"] == 3
        listed = {m["key"]: m for m in http.get("/api/v1/models").json()["models"]}[key]
        config = next(i["config"] for i in listed["loaded_instances"] if i["id"] == ident)
        assert config["parallel"] == 3
        loaded = http.get("/api/v1/models/loaded").json()["instances"]
        assert next(i for i in loaded if i["id"] == ident)["load_config"]["parallel"] == 3
        reply = http.post(
            "/v1/completions",
            json={"model": ident, "prompt": "Hi", "max_tokens": 3, "temperature": 0},
        )
        assert reply.status_code == 200
    finally:
        http.post("/api/v1/models/unload", json={"instance_id": ident})


@pytest.mark.parametrize("value", [0, 65, "2", 1.5])
def test_bad_parallel_is_400_naming_it(http, value):
    r = http.post("/api/v1/models/load", json={"model": GGUF_KEY, "parallel": value})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "parallel"


def test_sdk_load_config_carries_parallel():
    stack = {
        "layers": [
            {
                "layerName": "apiOverride",
                "config": {"fields": [{"key": "llm.load.numParallelSessions", "value": 2}]},
            }
        ]
    }
    assert load_request(stack).parallel == 2
    bad = {
        "layers": [
            {
                "layerName": "apiOverride",
                "config": {"fields": [{"key": "llm.load.numParallelSessions", "value": 0}]},
            }
        ]
    }
    with pytest.raises(SdkError):
        load_request(bad)


@pytest.mark.parametrize("fmt", ["mlx", "gguf"])
def test_engine_decodes_at_most_parallel_requests(models_root, fmt):
    engine = load(models_root, fmt, prompt_cache_bytes=0, parallel=2)
    try:
        assert engine.info.load_config["parallel"] == 2
        most = 0

        def running() -> int:
            if fmt == "gguf":
                return len(engine._running)
            return len(engine._batch._generation_batch)

        prompts = [engine.tokenize(f"{w} tell me more") for w in ("apple", "river", "stone")]

        async def run():
            nonlocal most
            solo = [await generate(engine, p, 12) for p in prompts]
            tasks = [asyncio.create_task(generate(engine, p, 12)) for p in prompts]
            while not all(t.done() for t in tasks):
                most = max(most, engine.call(running).result())
                await asyncio.sleep(0.005)
            return solo, [t.result() for t in tasks]

        solo, together = asyncio.run(run())
        assert [r.tokens for r in together] == [r.tokens for r in solo]
        assert 1 <= most <= 2
    finally:
        engine.close()
