"""Speculative decoding (MLX, mlx-lm's speculative step on its own lane): greedy output is
the same with and without a draft, LM Studio's draft stats, and refusals naming the field."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import GGUF_KEY, MLX_KEY, THINK_MLX_KEY

HELLO = [{"role": "user", "content": "Hello, who are you?"}]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def v0(http, **kw):
    body = {"model": MLX_KEY, "messages": HELLO, "max_tokens": 20, "temperature": 0, **kw}
    r = http.post("/api/v0/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("draft", [MLX_KEY, THINK_MLX_KEY])
def test_greedy_output_is_identical_with_a_draft(http, draft):
    plain = v0(http)
    drafted = v0(http, draft_model=draft, num_draft_tokens=4)
    assert drafted["choices"][0]["message"] == plain["choices"][0]["message"]
    stats = drafted["stats"]
    assert stats["draft_model"] == draft
    total = stats["total_draft_tokens_count"]
    parts = ("accepted", "rejected", "ignored")
    assert total == sum(stats[f"{p}_draft_tokens_count"] for p in parts)
    # The same weights draft for themselves: every proposal is accepted.
    assert stats["accepted_draft_tokens_count"] > 0 and stats["rejected_draft_tokens_count"] == 0
    assert "draft_model" not in plain["stats"]


def test_completions_and_json_schema_with_a_draft_are_identical(http):
    body = {"model": MLX_KEY, "prompt": "Once upon", "max_tokens": 12, "temperature": 0}
    plain = http.post("/v1/completions", json=body).json()
    drafted = http.post("/v1/completions", json={**body, "draft_model": MLX_KEY}).json()
    assert drafted["choices"][0]["text"] == plain["choices"][0]["text"]
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    a = v0(http, response_format=fmt)
    b = v0(http, response_format=fmt, draft_model=MLX_KEY)
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("model", "draft", "status"),
    [
        (MLX_KEY, GGUF_KEY, 400),
        (GGUF_KEY, MLX_KEY, 400),
        (GGUF_KEY, GGUF_KEY, 400),
        (MLX_KEY, "nobody/nothing", 404),
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
    for model, draft in ((GGUF_KEY, GGUF_KEY), (MLX_KEY, GGUF_KEY)):
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
