"""End to end: LM Studio's native REST API (v1 and v0), driven with plain httpx as LM Studio's
docs show it, against a real server running both engines."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.conftest import EMBED_GGUF_KEY, GGUF_KEY, MLX_KEY, THINK_GGUF_KEY

MODELS = [MLX_KEY, GGUF_KEY]


@pytest.fixture(scope="module")
def http(server, embedding_models):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def chat(http, **body):
    body.setdefault("temperature", 0)
    body.setdefault("max_output_tokens", 8)
    r = http.post("/api/v1/chat", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def stream_events(http, **body) -> list[tuple[str, dict]]:
    body.setdefault("temperature", 0)
    body.setdefault("max_output_tokens", 8)
    events = []
    with http.stream("POST", "/api/v1/chat", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
                assert data["type"] == name
                events.append((name, data))
    return events


def prompt_tokens(http, model, messages) -> int:
    r = http.post(
        "/v1/chat/completions",
        json={"model": model, "messages": messages, "max_tokens": 1, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens"]


def unload_all(http, key):
    for m in http.get("/api/v1/models").json()["models"]:
        if m["key"] == key:
            for instance in m["loaded_instances"]:
                http.post("/api/v1/models/unload", json={"instance_id": instance["id"]})


def assert_lmstudio_error(r, status, param=None, kind=None):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == (kind or ("model_not_found" if status == 404 else "invalid_request"))
    if param is not None:
        assert error["param"] == param


# --- GET /api/v1/models ---------------------------------------------------------------------


def test_v1_models_have_every_documented_field(http):
    models = {m["key"]: m for m in http.get("/api/v1/models").json()["models"]}
    assert {MLX_KEY, GGUF_KEY, EMBED_GGUF_KEY} <= set(models)
    for key in (MLX_KEY, GGUF_KEY):
        m = models[key]
        assert m["type"] == "llm" and m["publisher"] == "mlxserve-test"
        assert isinstance(m["display_name"], str) and m["architecture"] == "qwen2"
        assert isinstance(m["quantization"]["name"], str)
        assert isinstance(m["quantization"]["bits_per_weight"], (int, float))
        assert isinstance(m["size_bytes"], int) and m["size_bytes"] > 0
        assert isinstance(m["params_string"], str)
        assert isinstance(m["loaded_instances"], list)
        assert m["max_context_length"] == 4096
        assert m["format"] == ("mlx" if key == MLX_KEY else "gguf")
        assert m["capabilities"] == {"vision": False, "trained_for_tool_use": True}
        assert "description" in m
    assert models[THINK_GGUF_KEY]["capabilities"]["reasoning"] == {
        "allowed_options": ["off", "on"],
        "default": "on",
    }
    embedding = models[EMBED_GGUF_KEY]
    assert embedding["type"] == "embedding" and embedding["format"] == "gguf"
    assert not {"architecture", "capabilities", "description"} & set(embedding)


# --- load / unload --------------------------------------------------------------------------


def test_load_gguf_honours_llamacpp_options_and_unload(http):
    r = http.post(
        "/api/v1/models/load",
        json={
            "model": GGUF_KEY,
            "identifier": "lms-test-gguf",
            "context_length": 1024,
            "eval_batch_size": 128,
            "flash_attention": True,
            "offload_kv_cache_to_gpu": False,
            "echo_load_config": True,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["type"] == "llm" and body["status"] == "loaded"
    assert body["instance_id"] == "lms-test-gguf"
    assert isinstance(body["load_time_seconds"], float)
    assert body["load_config"] == {
        "context_length": 1024,
        "eval_batch_size": 128,
        "flash_attention": True,
        "offload_kv_cache_to_gpu": False,
        "parallel": 4,
    }
    listed = {m["key"]: m for m in http.get("/api/v1/models").json()["models"]}[GGUF_KEY]
    (entry,) = [i for i in listed["loaded_instances"] if i["id"] == "lms-test-gguf"]
    assert entry["config"] == body["load_config"]
    assert entry["memory_bytes"] == entry["memory"]["total_bytes"] > 0
    # An instance id is what inference requests may name.
    reply = chat(http, model="lms-test-gguf", input="Hi", store=False)
    assert reply["model_instance_id"] == "lms-test-gguf"
    assert "model_load_time_seconds" not in reply["stats"]
    v0 = http.get(f"/api/v0/models/{GGUF_KEY}").json()
    assert v0["state"] == "loaded"
    r = http.post("/api/v1/models/unload", json={"instance_id": "lms-test-gguf"})
    assert r.status_code == 200 and r.json() == {"instance_id": "lms-test-gguf"}
    listed = {m["key"]: m for m in http.get("/api/v1/models").json()["models"]}[GGUF_KEY]
    assert "lms-test-gguf" not in [i["id"] for i in listed["loaded_instances"]]
    assert_lmstudio_error(
        http.post("/api/v1/chat", json={"model": "lms-test-gguf", "input": "Hi"}), 404, "model"
    )


def test_load_mlx_ignores_llamacpp_options_truthfully(http):
    r = http.post(
        "/api/v1/models/load",
        json={
            "model": MLX_KEY,
            "flash_attention": True,
            "eval_batch_size": 64,
            "echo_load_config": True,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["load_config"] == {"context_length": 4096, "parallel": 8}
    assert (
        http.post("/api/v1/models/unload", json={"instance_id": body["instance_id"]}).status_code
        == 200
    )


def test_second_instance_gets_numbered_id(http):
    ids = [
        http.post("/api/v1/models/load", json={"model": GGUF_KEY}).json()["instance_id"]
        for _ in range(2)
    ]
    assert re.fullmatch(re.escape(GGUF_KEY) + r"(:\d+)?", ids[0])
    assert ids[1] != ids[0] and re.fullmatch(re.escape(GGUF_KEY) + r":\d+", ids[1])
    for instance_id in ids:
        assert (
            http.post("/api/v1/models/unload", json={"instance_id": instance_id}).status_code == 200
        )


def test_embedding_model_loads_with_its_type(http):
    r = http.post(
        "/api/v1/models/load",
        json={
            "model": EMBED_GGUF_KEY,
            "identifier": "lms-embed",
            "flash_attention": True,
            "echo_load_config": True,
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["type"] == "embedding"
    assert r.json()["load_config"] == {"context_length": 512}
    v0 = {m["id"]: m for m in http.get("/api/v0/models").json()["data"]}[EMBED_GGUF_KEY]
    assert v0["type"] == "embeddings" and v0["state"] == "loaded"
    http.post("/api/v1/models/unload", json={"instance_id": "lms-embed"})


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/api/v1/models/unload", {"instance_id": "no/such-instance"}, 404, "instance_id"),
        ("/api/v1/models/unload", {}, 400, "instance_id"),
        ("/api/v1/models/load", {"model": "no/such-model"}, 404, "model"),
        ("/api/v1/models/load", {"model": GGUF_KEY, "contextLength": 10}, 400, "contextLength"),
        (
            "/api/v1/models/load",
            {"model": GGUF_KEY, "flash_attention": "yes"},
            400,
            "flash_attention",
        ),
        ("/api/v1/models/load", {"model": GGUF_KEY, "context_length": 0}, 400, "context_length"),
        ("/api/v1/models/load", {"model": GGUF_KEY, "identifier": "../x"}, 400, "identifier"),
        ("/api/v1/models/load", {"model": GGUF_KEY, "identifier": MLX_KEY}, 400, "identifier"),
        ("/api/v1/chat", {"model": GGUF_KEY}, 400, "input"),
        ("/api/v1/chat", {"model": GGUF_KEY, "input": []}, 400, "input"),
        (
            "/api/v1/chat",
            {"model": GGUF_KEY, "input": [{"type": "message"}]},
            400,
            "input[0].content",
        ),
        ("/api/v1/chat", {"model": GGUF_KEY, "input": [{"type": "video"}]}, 400, "input[0].type"),
        ("/api/v1/chat", {"model": GGUF_KEY, "input": "Hi", "ttl": -1}, 400, "ttl"),
        ("/api/v1/chat", {"model": GGUF_KEY, "input": "Hi", "stream": "yes"}, 400, "stream"),
        ("/api/v1/models/load", {"model": GGUF_KEY, "ttl": 0}, 400, "ttl"),
        ("/api/v1/models/unload", {"instance_id": 5}, 400, "instance_id"),
        ("/api/v1/chat", {"input": "Hi"}, 400, "model"),
        (
            "/api/v1/chat",
            # MCP from mcp.json is off unless enabled (tests/test_mcp_e2e.py).
            {"model": GGUF_KEY, "input": "Hi", "integrations": ["mcp/x"]},
            403,
            "integrations",
        ),
        (
            "/api/v1/chat",
            {"model": GGUF_KEY, "input": [{"type": "image", "data_url": "data:,"}]},
            400,
            "input[0]",
        ),
        ("/api/v1/chat", {"model": GGUF_KEY, "input": "Hi", "reasoning": "on"}, 400, "reasoning"),
        ("/api/v1/chat", {"model": GGUF_KEY, "input": "Hi", "reasoning": "max"}, 400, "reasoning"),
        ("/api/v1/chat", {"model": GGUF_KEY, "input": "Hi", "temperature": -1}, 400, "temperature"),
        (
            "/api/v1/chat",
            {"model": GGUF_KEY, "input": "Hi", "previous_response_id": "x"},
            400,
            "previous_response_id",
        ),
        (
            "/api/v1/chat",
            {"model": GGUF_KEY, "input": "Hi", "previous_response_id": "resp_nope"},
            404,
            "previous_response_id",
        ),
        ("/api/v1/chat", {"model": EMBED_GGUF_KEY, "input": "Hi"}, 400, "model"),
        ("/api/v1/chat", {"model": "no/such-model", "input": "Hi"}, 404, "model"),
    ],
)
def test_bad_input_gets_lmstudio_error(http, path, body, status, param):
    r = http.post(path, json=body)
    kind = (
        "model_not_found"
        if status == 404 and param != "previous_response_id"
        else "invalid_request"
    )
    assert_lmstudio_error(r, status, param, kind)


def test_chat_ignores_unknown_fields(http):
    assert chat(http, model=GGUF_KEY, input="Hi", store=False, some_client_field={"a": 1})["output"]


# --- POST /api/v1/chat ----------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_chat_response_shape(http, model):
    body = chat(http, model=model, input="Hello there", system_prompt="Be brief.")
    assert body["model_instance_id"].startswith(model)
    assert [item["type"] for item in body["output"]] == ["message"]
    assert isinstance(body["output"][0]["content"], str)
    stats = body["stats"]
    assert stats["input_tokens"] == prompt_tokens(
        http,
        model,
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
    )
    assert 1 <= stats["total_output_tokens"] <= 8
    assert stats["reasoning_output_tokens"] == 0
    assert isinstance(stats["tokens_per_second"], float) and stats["tokens_per_second"] >= 0
    assert isinstance(stats["time_to_first_token_seconds"], float)
    assert body["response_id"].startswith("resp_")


def test_same_reply_from_mlx_and_gguf(http):
    replies = [chat(http, model=m, input="Tell me a story", store=False) for m in MODELS]
    assert replies[0]["output"] == replies[1]["output"]
    assert replies[0]["stats"]["input_tokens"] == replies[1]["stats"]["input_tokens"]


def test_store_false_has_no_response_id(http):
    assert "response_id" not in chat(http, model=GGUF_KEY, input="Hi", store=False)


def test_text_items_make_one_user_message(http):
    items = [{"type": "message", "content": "Hello"}, {"type": "text", "content": "there"}]
    body = chat(http, model=GGUF_KEY, input=items, store=False)
    expected = prompt_tokens(http, GGUF_KEY, [{"role": "user", "content": "Hello\nthere"}])
    assert body["stats"]["input_tokens"] == expected


def _message(body) -> dict:
    return {"role": "assistant", "content": body["output"][-1]["content"]}


@pytest.mark.parametrize("model", MODELS)
def test_stateful_conversation_and_branches(http, model):
    system = {"role": "system", "content": "You are terse."}
    u1 = {"role": "user", "content": "My name is Ada."}
    u2 = {"role": "user", "content": "I live in Paris."}
    u3 = {"role": "user", "content": "Where do I live?"}
    u2b = {"role": "user", "content": "I like cats."}
    r1 = chat(http, model=model, input=u1["content"], system_prompt=system["content"])
    r2 = chat(http, model=model, input=u2["content"], previous_response_id=r1["response_id"])
    r3 = chat(http, model=model, input=u3["content"], previous_response_id=r2["response_id"])
    full = [system, u1, _message(r1), u2, _message(r2), u3]
    assert r3["stats"]["input_tokens"] == prompt_tokens(http, model, full)
    assert r1["stats"]["input_tokens"] < r2["stats"]["input_tokens"] < r3["stats"]["input_tokens"]
    # Same history, same greedy reply: the model saw exactly the three turns.
    direct = http.post(
        "/v1/chat/completions",
        json={"model": model, "messages": full, "max_tokens": 8, "temperature": 0},
    ).json()
    assert direct["choices"][0]["message"]["content"] == r3["output"][-1]["content"]
    # A branch from turn one does not see turn two.
    b2 = chat(http, model=model, input=u2b["content"], previous_response_id=r1["response_id"])
    assert b2["stats"]["input_tokens"] == prompt_tokens(
        http, model, [system, u1, _message(r1), u2b]
    )
    assert b2["response_id"] not in (r2["response_id"], r3["response_id"])
    # Continuing the old branch still works after the new one.
    r3_again = chat(http, model=model, input=u3["content"], previous_response_id=r2["response_id"])
    assert r3_again["output"] == r3["output"]


EVENT_ORDER = re.compile(
    r"chat\.start "
    r"(model_load\.start (model_load\.progress )*model_load\.end )?"
    r"prompt_processing\.start (prompt_processing\.progress )*prompt_processing\.end "
    r"(reasoning\.start (reasoning\.delta )+reasoning\.end )?"
    r"message\.start (message\.delta )*message\.end "
    r"chat\.end"
)


@pytest.mark.parametrize("model", MODELS)
def test_stream_event_order_and_final_result(http, model):
    events = stream_events(http, model=model, input="Hello there", store=False)
    names = " ".join(name for name, _ in events)
    assert EVENT_ORDER.fullmatch(names), names
    start, end = events[0][1], events[-1][1]
    text = "".join(d["content"] for n, d in events if n == "message.delta")
    result = end["result"]
    assert start["model_instance_id"] == result["model_instance_id"]
    assert result["output"] == [{"type": "message", "content": text}]
    whole = chat(http, model=model, input="Hello there", store=False)
    assert result["output"] == whole["output"]
    assert result["stats"]["input_tokens"] == whole["stats"]["input_tokens"]
    assert result["stats"]["total_output_tokens"] == whole["stats"]["total_output_tokens"]
    assert "response_id" not in result
    for name, data in events:
        if name.endswith(".progress"):
            assert 0 <= data["progress"] <= 1


def test_streamed_turn_is_stored(http):
    events = stream_events(http, model=GGUF_KEY, input="Remember: blue.")
    result = events[-1][1]["result"]
    follow = chat(
        http, model=GGUF_KEY, input="What colour?", previous_response_id=result["response_id"]
    )
    history = [
        {"role": "user", "content": "Remember: blue."},
        _message(result),
        {"role": "user", "content": "What colour?"},
    ]
    assert follow["stats"]["input_tokens"] == prompt_tokens(http, GGUF_KEY, history)


def test_stream_that_loads_sends_model_load_events(http):
    unload_all(http, THINK_GGUF_KEY)
    events = stream_events(http, model=THINK_GGUF_KEY, input="Hi", store=False)
    names = " ".join(name for name, _ in events)
    assert EVENT_ORDER.fullmatch(names), names
    assert "model_load.start" in names and "reasoning.delta" in names
    load_end = next(d for n, d in events if n == "model_load.end")
    assert load_end["model_instance_id"] == THINK_GGUF_KEY
    assert isinstance(load_end["load_time_seconds"], float)
    stats = events[-1][1]["result"]["stats"]
    assert stats["model_load_time_seconds"] == load_end["load_time_seconds"]
    # Loaded now: no load events, no load time.
    again = stream_events(http, model=THINK_GGUF_KEY, input="Hi", store=False)
    assert not [n for n, _ in again if n.startswith("model_load")]
    assert "model_load_time_seconds" not in again[-1][1]["result"]["stats"]


def test_model_load_time_only_when_the_request_loaded(http):
    unload_all(http, THINK_GGUF_KEY)
    first = chat(http, model=THINK_GGUF_KEY, input="Hi", store=False)
    assert first["stats"]["model_load_time_seconds"] > 0
    second = chat(http, model=THINK_GGUF_KEY, input="Hi", store=False)
    assert "model_load_time_seconds" not in second["stats"]


def test_reasoning_output_items(http):
    body = chat(
        http, model=THINK_GGUF_KEY, input="Think about it", max_output_tokens=12, store=False
    )
    assert body["output"][0]["type"] == "reasoning" and body["output"][0]["content"]
    assert body["output"][-1]["type"] == "message"
    assert 0 < body["stats"]["reasoning_output_tokens"] <= body["stats"]["total_output_tokens"]
    off = chat(http, model=THINK_GGUF_KEY, input="Think about it", reasoning="off", store=False)
    assert [i["type"] for i in off["output"]] == ["message"]
    assert off["stats"]["reasoning_output_tokens"] == 0


def test_error_in_stream_after_start_ends_with_chat_end(http):
    unload_all(http, THINK_GGUF_KEY)
    # The model loads inside the stream; the context check fails after chat.start.
    events = stream_events(http, model=THINK_GGUF_KEY, input="word " * 5000, store=False)
    names = [n for n, _ in events]
    assert names[0] == "chat.start" and names[-2:] == ["error", "chat.end"]
    error = events[-2][1]["error"]
    assert error["type"] == "invalid_request" and error["code"] == "context_length_exceeded"
    assert events[-1][1]["result"]["output"] == []


# --- /api/v0 --------------------------------------------------------------------------------


def test_v0_models(http):
    data = http.get("/api/v0/models").json()
    assert data["object"] == "list"
    models = {m["id"]: m for m in data["data"]}
    m = models[GGUF_KEY]
    assert m["object"] == "model" and m["type"] == "llm" and m["publisher"] == "mlxserve-test"
    assert m["arch"] == "qwen2" and m["compatibility_type"] == "gguf"
    assert isinstance(m["quantization"], str) and m["max_context_length"] == 4096
    assert m["state"] in ("loaded", "not-loaded") and m["capabilities"] == ["tool_use"]
    assert models[MLX_KEY]["compatibility_type"] == "mlx"
    assert http.get(f"/api/v0/models/{MLX_KEY}").json()["id"] == MLX_KEY
    r = http.get("/api/v0/models/no/such-model")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("model", MODELS)
def test_v0_chat_and_text_completions_have_stats(http, model):
    r = http.post(
        "/api/v0/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 6,
            "temperature": 0,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert (
        body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    )
    assert body["usage"]["completion_tokens"] >= 1
    stats = body["stats"]
    assert {"tokens_per_second", "time_to_first_token", "generation_time", "stop_reason"} <= set(
        stats
    )
    assert stats["stop_reason"] in ("eosFound", "maxPredictedTokensReached")
    fmt = "mlx" if model == MLX_KEY else "gguf"
    assert body["model_info"] == {
        "arch": "qwen2",
        "quant": "F32",
        "format": fmt,
        "context_length": 4096,
    }
    assert body["runtime"]["supported_formats"] == [fmt] and body["runtime"]["version"]
    r = http.post(
        "/api/v0/completions",
        json={
            "model": model,
            "prompt": "Once upon",
            "max_tokens": 4,
            "temperature": 0,
            "ignore_eos": True,
        },
    )
    body = r.json()
    assert (
        body["object"] == "text_completion"
        and body["stats"]["stop_reason"] == "maxPredictedTokensReached"
    )
    assert body["usage"]["completion_tokens"] == 4


def test_v0_stream_is_openai_sse(http):
    with http.stream(
        "POST",
        "/api/v0/chat/completions",
        json={
            "model": GGUF_KEY,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4,
            "stream": True,
        },
    ) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0].removeprefix("data: "))["object"] == "chat.completion.chunk"
