"""End to end: the loading guardrail counts every part a model can come to hold (KV windows,
the MLX prompt cache, draft models, tokenizer and runtime) and a refusal names them in each
dialect's envelope; what it counts is what ``/api/v1/models``, ``/api/v0/models`` and
``mlxserve ps`` report.

One server with a fixed 250 MB budget, reserving a GGUF window of KV per parallel sequence
(``--kv-windows 4``; one pool by default): a tiny Qwen2 GGUF loaded without flash attention (45
MB of weights, 8.4 MB of KV in 4 windows, 134 MB of attention scores, 51 MB of tokenizer and
runtime) fits; the same model as MLX fits alone with its prompt cache cut from 1 GiB to what
is left, and not beside the GGUF; nor does a second tiny model as a draft."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from tests.conftest import GGUF_KEY, MLX_KEY, THINK_GGUF_KEY, Server

HELLO = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def tight(models_root, tmp_path_factory):
    home = tmp_path_factory.mktemp("guardrail")
    budget = ("--guardrail-memory-gb", "0.25", "--prompt-cache-bytes", str(1 << 30))
    budget += ("--kv-windows", "4")
    srv = Server(models_root, home, *budget)
    yield srv
    srv.stop()


@pytest.fixture
def http(tight):
    with httpx.Client(base_url=tight.url, timeout=120) as client:
        for model in client.get("/api/v1/models").json()["models"]:
            for instance in model["loaded_instances"]:
                client.post("/api/v1/models/unload", json={"instance_id": instance["id"]})
        yield client


def _loaded(http) -> list[str]:
    return [i["id"] for i in http.get("/api/v1/models/loaded").json()["instances"]]


def test_mlx_jit_load_gets_the_prompt_cache_left_or_is_refused_in_openai_and_anthropic(http, tight):
    oai = openai.OpenAI(base_url=tight.url + "/v1", api_key="x", max_retries=0)
    # Alone: weights, 8 KV windows and the runtime fit, and the prompt cache takes the rest
    # of the budget instead of its whole 1 GiB (which would refuse the load).
    reply = oai.chat.completions.create(model=MLX_KEY, messages=HELLO, max_tokens=2)
    assert reply.usage is not None and reply.usage.completion_tokens == 2
    (instance,) = http.get("/api/v1/models/loaded").json()["instances"]
    memory = instance["memory"]
    rest = memory["weights_bytes"] + memory["kv_cache_bytes"] + memory["runtime_bytes"]
    assert memory["prompt_cache_bytes"] == 250_000_000 - rest > 0
    assert memory["total_bytes"] == 250_000_000
    http.post("/api/v1/models/unload", json={"instance_id": instance["id"]})
    # Beside a loaded GGUF (without flash attention: its scores count) even the rest does not
    # fit: refused, naming what must fit.
    # The GGUF's prompt cache (kept sequences moved to host memory) counts too, and gives way
    # the same: it takes what its weights, windows, scores and runtime leave of the budget.
    body = {"model": GGUF_KEY, "flash_attention": False}
    assert http.post("/api/v1/models/load", json=body).status_code == 200
    (gguf,) = http.get("/api/v1/models/loaded").json()["instances"]
    assert 0 < gguf["memory"]["prompt_cache_bytes"] < 1 << 30
    assert gguf["memory"]["total_bytes"] == 250_000_000
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(model=MLX_KEY, messages=HELLO, max_tokens=2)
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["code"] == "insufficient_system_resources" and error["param"] == "model"
    message = error["message"]
    assert (
        f"Loading '{MLX_KEY}' with a 4096-token context requires approximately 0.11 GB (50.7 "
        "MB of weights, 16.8 MB of KV cache (8 windows of 4096 tokens), 44.0 MB of tokenizer "
        "and runtime), but only about 0.00 GB is available" in message
    )
    claude = anthropic.Anthropic(base_url=tight.url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as refused_too:
        claude.messages.create(model=MLX_KEY, messages=HELLO, max_tokens=2)
    body = refused_too.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert "44.0 MB of tokenizer and runtime" in body["error"]["message"]
    assert len(_loaded(http)) == 1


def test_gguf_load_refused_for_its_draft_in_the_lmstudio_envelope(http):
    body = {"model": GGUF_KEY, "draft_model": THINK_GGUF_KEY, "flash_attention": False}
    r = http.post("/api/v1/models/load", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request" and error["code"] == "insufficient_system_resources"
    assert error["param"] == "model"
    # 45.1 MB of weights, 8.4 MB of KV, 134.2 MB of scores; the draft: 45.1 MB, 4.2 MB of
    # 16-bit KV and its own 134.2 MB of scores.
    assert "requires approximately 0.42 GB" in error["message"]
    assert (
        "45.1 MB of weights, 8.4 MB of KV cache (4 windows of 4096 tokens), 0.18 GB of draft "
        "model, 0.13 GB of attention buffers, 51.0 MB of tokenizer and runtime" in error["message"]
    )
    assert _loaded(http) == []


def test_a_draft_loaded_on_first_use_must_fit_beside_its_model(http, tight):
    r = http.post("/api/v1/models/load", json={"model": GGUF_KEY, "flash_attention": False})
    assert r.status_code == 200, r.text
    oai = openai.OpenAI(base_url=tight.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(
            model=GGUF_KEY,
            messages=HELLO,
            max_tokens=2,
            extra_body={"draft_model": THINK_GGUF_KEY},
        )
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["code"] == "insufficient_system_resources"
    assert error["param"] == "draft_model"
    assert f"Loading the draft model '{THINK_GGUF_KEY}' into '{GGUF_KEY}'" in error["message"]
    assert "0.18 GB of draft model" in error["message"]
    # The model itself goes on serving, and its memory is what it was.
    reply = oai.chat.completions.create(model=GGUF_KEY, messages=HELLO, max_tokens=2)
    assert reply.usage is not None and reply.usage.completion_tokens == 2
    (instance,) = http.get("/api/v1/models/loaded").json()["instances"]
    assert instance["memory"]["draft_bytes"] == 0


def test_listings_report_what_the_guardrail_counts(http):
    body = {"model": GGUF_KEY, "parallel": 2, "flash_attention": True}
    r = http.post("/api/v1/models/load", json=body)
    assert r.status_code == 200, r.text
    (instance,) = http.get("/api/v1/models/loaded").json()["instances"]
    memory = instance["memory"]
    parts = ("weights", "kv_cache", "prompt_cache", "draft", "vision", "compute", "runtime")
    assert sum(memory[f"{p}_bytes"] for p in parts) == memory["total_bytes"]
    assert memory["total_bytes"] == instance["memory_bytes"]
    assert memory["kv_windows"] == instance["load_config"]["parallel"] == 2
    # tiny Qwen2: 512 bytes of f32 keys and values per token.
    assert memory["kv_cache_bytes"] == 2 * 4096 * 512
    # Flash attention keeps no scores, only its mask: 512 queries against both
    # windows' cells, f32 and f16.
    assert memory["compute_bytes"] == 512 * 2 * 4096 * 6
    assert memory["weights_bytes"] == instance["size_bytes"]
    models = {m["key"]: m for m in http.get("/api/v1/models").json()["models"]}
    (entry,) = models[GGUF_KEY]["loaded_instances"]
    assert entry["memory"] == memory and entry["memory_bytes"] == memory["total_bytes"]
    v0 = http.get(f"/api/v0/models/{GGUF_KEY}").json()
    assert v0["loaded_memory_bytes"] == memory["total_bytes"]
    # Without flash attention (the default): 4 heads' scores of 512 queries against both
    # windows' cells (loaded alone: both do not fit the budget together).
    http.post("/api/v1/models/unload", json={"instance_id": instance["id"]})
    body = {"model": GGUF_KEY, "parallel": 2}
    r = http.post("/api/v1/models/load", json=body)
    assert r.status_code == 200, r.text
    (plain,) = http.get("/api/v1/models/loaded").json()["instances"]
    assert plain["load_config"]["flash_attention"] is False
    assert plain["memory"]["compute_bytes"] == 4 * 512 * 2 * 4096 * 4
    scores = plain["memory"]["compute_bytes"]
    # Both loads' prompt caches take what the rest leaves of the budget.
    rest = memory["total_bytes"] - memory["prompt_cache_bytes"] - memory["compute_bytes"]
    assert plain["memory_bytes"] - plain["memory"]["prompt_cache_bytes"] == rest + scores
