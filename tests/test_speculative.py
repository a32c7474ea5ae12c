"""Speculative decoding (MLX through mlx-lm's speculative step, GGUF through a draft context
of our own, both on their own lane): greedy output is the same with and without a draft,
LM Studio's draft stats, and refusals naming the field."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest

from tests.conftest import GGUF_KEY, MLX_KEY, PUBLISHER, THINK_GGUF_KEY, THINK_MLX_KEY
from tests.engine_harness import NEAR_NAME, near_models

HELLO = [{"role": "user", "content": "Hello, who are you?"}]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def check_stats(stats, draft):
    assert stats["draft_model"] == draft
    total = stats["total_draft_tokens_count"]
    parts = ("accepted", "rejected", "ignored")
    assert total == sum(stats[f"{p}_draft_tokens_count"] for p in parts)
    return stats


def v0(http, **kw):
    body = {"model": MLX_KEY, "messages": HELLO, "max_tokens": 20, "temperature": 0, **kw}
    r = http.post("/api/v0/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize(
    ("model", "draft"),
    [
        (MLX_KEY, MLX_KEY),
        (MLX_KEY, THINK_MLX_KEY),
        (GGUF_KEY, GGUF_KEY),
        (GGUF_KEY, THINK_GGUF_KEY),
    ],
)
def test_greedy_output_is_identical_with_a_draft(http, model, draft):
    plain = v0(http, model=model)
    drafted = v0(http, model=model, draft_model=draft, num_draft_tokens=4)
    assert drafted["choices"][0]["message"] == plain["choices"][0]["message"]
    stats = check_stats(drafted["stats"], draft)
    # The same weights draft for themselves: every proposal is accepted.
    assert stats["accepted_draft_tokens_count"] > 0 and stats["rejected_draft_tokens_count"] == 0
    assert "draft_model" not in plain["stats"]


@pytest.fixture(scope="module")
def near(models_root):
    """Keys of a different model sharing the vocabulary: the tiny Qwen2, last layer perturbed."""
    near_models(models_root)
    return {fmt: f"{PUBLISHER}/{NEAR_NAME}-{fmt}" for fmt in ("mlx", "gguf")}


@pytest.mark.parametrize(("model", "fmt"), [(MLX_KEY, "mlx"), (GGUF_KEY, "gguf")])
def test_a_different_draft_is_partly_accepted_and_output_is_unchanged(http, near, model, fmt):
    """A draft that agrees with the model on only part of the continuation: verification
    accepts some proposals and rejects others, and the greedy output is the undrafted one."""
    draft = near[fmt]
    plain = v0(http, model=model, max_tokens=40)
    drafted = v0(http, model=model, max_tokens=40, draft_model=draft, num_draft_tokens=4)
    assert drafted["choices"][0]["message"] == plain["choices"][0]["message"]
    stats = check_stats(drafted["stats"], draft)
    assert stats["accepted_draft_tokens_count"] > 0 and stats["rejected_draft_tokens_count"] > 0
    body = {"model": model, "input": "Tell me a story.", "temperature": 0}
    body |= {"max_output_tokens": 40, "store": False}
    plain = http.post("/api/v1/chat", json=body).json()
    drafted = http.post("/api/v1/chat", json={**body, "draft_model": draft}).json()
    assert drafted["output"] == plain["output"]
    stats = check_stats(drafted["stats"], draft)
    assert stats["accepted_draft_tokens_count"] > 0 and stats["rejected_draft_tokens_count"] > 0


def _instance(http, instance_id):
    loaded = http.get("/api/v1/models/loaded").json()["instances"]
    return next(i for i in loaded if i["id"] == instance_id)


@pytest.mark.parametrize(("model", "draft"), [(MLX_KEY, THINK_MLX_KEY), (GGUF_KEY, THINK_GGUF_KEY)])
def test_a_draft_counts_in_its_instance_memory_once_loaded(http, model, draft):
    v0(http, model=model, draft_model=draft, max_tokens=2)
    counted = _instance(http, model)
    memory = counted["memory"]
    size = {m["key"]: m["size_bytes"] for m in http.get("/api/v1/models").json()["models"]}
    # Its weights and some KV, in the parts and in the whole.
    assert memory["draft_bytes"] > size[draft]
    assert counted["memory_bytes"] == memory["total_bytes"]
    parts = ("weights", "kv_cache", "prompt_cache", "draft", "vision", "compute", "runtime")
    assert sum(memory[f"{p}_bytes"] for p in parts) == memory["total_bytes"]
    families = http.get("/metrics", params={"format": "json"}).json()["families"]
    samples = next(f["samples"] for f in families if f["name"] == "mlxserve_model_memory_bytes")
    gauge = next(s["value"] for s in samples if s["labels"] == {"model": model})
    assert gauge == memory["total_bytes"]
    # Counted once: using it again adds nothing.
    v0(http, model=model, draft_model=draft, max_tokens=2)
    assert _instance(http, model)["memory"] == memory


@pytest.mark.parametrize("model", [MLX_KEY, GGUF_KEY])
def test_completions_and_json_schema_with_a_draft_are_identical(http, model):
    body = {"model": model, "prompt": "Once upon", "max_tokens": 12, "temperature": 0}
    plain = http.post("/v1/completions", json=body).json()
    drafted = http.post("/v1/completions", json={**body, "draft_model": model}).json()
    assert drafted["choices"][0]["text"] == plain["choices"][0]["text"]
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    a = v0(http, model=model, response_format=fmt, max_tokens=40)
    b = v0(http, model=model, response_format=fmt, max_tokens=40, draft_model=model)
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    if model == GGUF_KEY:
        # GGUF verifies drafts under the grammar: the schema request is drafted too (this
        # random model's unconstrained draft rarely proposes what the grammar allows).
        assert check_stats(b["stats"], model)["total_draft_tokens_count"] > 0


def test_gguf_rejected_drafts_are_rolled_back(http):
    """Seeded sampling at a low temperature: the greedy draft is sometimes rejected, and every
    rejection rolls both caches back, yet the output is the seeded output without a draft
    (each token is still drawn from the model's row for its own prefix, in the same order)."""
    kw = {"model": GGUF_KEY, "temperature": 0.005, "seed": 7, "max_tokens": 40}
    plain = v0(http, **kw)
    drafted = v0(http, **kw, draft_model=GGUF_KEY, num_draft_tokens=3)
    assert drafted["choices"][0]["message"] == plain["choices"][0]["message"]
    stats = check_stats(drafted["stats"], GGUF_KEY)
    assert stats["rejected_draft_tokens_count"] > 0 and stats["accepted_draft_tokens_count"] > 0


def test_gguf_plain_stream_beside_a_drafted_one_equals_its_solo_output(http):
    # Exact beside a drafted stream, whose rejected proposals free cells that the others'
    # next tokens refill: without flash attention (see tests/test_gguf_attention.py).
    model = "spec-plain-attention"
    body = {"model": GGUF_KEY, "identifier": model, "flash_attention": False}
    r = http.post("/api/v1/models/load", json=body)
    assert r.status_code == 200, r.text
    try:
        prompts = ["Tell me a story.", "What is two plus two?", "Hello there"]
        solo = [v0(http, model=model, messages=[{"role": "user", "content": p}]) for p in prompts]
        drafted_body = {"draft_model": GGUF_KEY, "max_tokens": 60}
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            drafted = pool.submit(v0, http, model=model, **drafted_body)
            plain = [
                pool.submit(v0, http, model=model, messages=[{"role": "user", "content": p}])
                for p in prompts
            ]
            together = [f.result() for f in plain]
            check_stats(drafted.result()["stats"], GGUF_KEY)
    finally:
        http.post("/api/v1/models/unload", json={"instance_id": model})
    for a, b in zip(solo, together, strict=True):
        assert a["choices"][0]["message"] == b["choices"][0]["message"]
        assert "draft_model" not in b["stats"]


@pytest.mark.parametrize(
    ("model", "draft", "status"),
    [
        (MLX_KEY, GGUF_KEY, 400),
        (GGUF_KEY, MLX_KEY, 400),
        (MLX_KEY, "nobody/nothing", 404),
        (GGUF_KEY, "nobody/nothing", 404),
    ],
)
def test_bad_drafts_are_refused(http, model, draft, status):
    body = {"model": model, "messages": HELLO, "max_tokens": 2, "draft_model": draft}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    if status == 400:
        err = r.json()["error"]
        assert err["param"] == "draft_model"
        assert model.split("/")[1] in err["message"]


def test_python_sdk_draft_model_and_stats(server):
    import lmstudio as lms

    with lms.Client(server.url.removeprefix("http://")) as client:
        model = client.llm.model(MLX_KEY)
        config = {"temperature": 0, "maxTokens": 10, "repeatPenalty": False}
        plain = model.respond("Hello", config=config)
        drafted = model.respond("Hello", config={**config, "draftModel": MLX_KEY})
    assert drafted.content == plain.content
    stats = drafted.stats
    assert stats.used_draft_model_key == MLX_KEY
    assert stats.accepted_draft_tokens_count and stats.total_draft_tokens_count
    assert plain.stats.used_draft_model_key is None


def test_load_time_default_draft(http):
    r = http.post(
        "/api/v1/models/load",
        json={
            "model": MLX_KEY,
            "identifier": "spec-default",
            "draft_model": THINK_MLX_KEY,
            "echo_load_config": True,
        },
    )
    assert r.status_code == 200, r.text
    try:
        assert r.json()["load_config"]["draft_model"] == THINK_MLX_KEY
        plain = v0(http)
        drafted = v0(http, model="spec-default")
        assert drafted["stats"]["draft_model"] == THINK_MLX_KEY
        assert drafted["choices"][0]["message"] == plain["choices"][0]["message"]
    finally:
        http.post("/api/v1/models/unload", json={"instance_id": "spec-default"})
    for model, draft in ((GGUF_KEY, MLX_KEY), (MLX_KEY, GGUF_KEY)):
        r = http.post("/api/v1/models/load", json={"model": model, "draft_model": draft})
        assert r.status_code == 400 and r.json()["error"]["param"] == "draft_model"


def test_v1_chat_draft_and_stats(http):
    body = {
        "model": MLX_KEY,
        "input": "Hi",
        "temperature": 0,
        "max_output_tokens": 10,
        "store": False,
    }
    plain = http.post("/api/v1/chat", json=body).json()
    drafted = http.post("/api/v1/chat", json={**body, "draft_model": MLX_KEY}).json()
    assert drafted["output"] == plain["output"]
    assert drafted["stats"]["draft_model"] == MLX_KEY
    assert drafted["stats"]["accepted_draft_tokens_count"] > 0
    assert "draft_model" not in plain["stats"]


@pytest.mark.parametrize("fmt", ["mlx", "gguf"])
def test_a_draft_with_another_vocabulary_is_refused_naming_both(http, family_models, fmt):
    family_models("llama3.2")  # Llama 3's vocabulary, not Qwen2's
    model = MLX_KEY if fmt == "mlx" else GGUF_KEY
    draft = f"{PUBLISHER}/tiny-llama3.2-{fmt}"
    body = {"model": model, "messages": HELLO, "max_tokens": 2, "draft_model": draft}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "draft_model"
    assert draft in err["message"] and model in err["message"]
    assert "vocabulary" in err["message"]
