"""Bad input on the OpenAI routes, at the ASGI level: every case is a 4xx in OpenAI's envelope."""

import pytest
from starlette.testclient import TestClient

from mlxserve.app import create_app
from mlxserve.settings import Settings


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    app = create_app(Settings(home=root, models_dir=root))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def assert_openai_error(r, status, param=None, code=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize(
    "raw", [b"", b"   ", b'{"model":', b"[]", b'"x"', b"null", b"42", b"\xff\xfe{}"]
)
def test_malformed_bodies(client, path, raw):
    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert_openai_error(r, 400, code="invalid_json")


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 2}, "top_p"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"n": 0}, "n"),
        ({"n": 2}, "n"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"frequency_penalty": 9}, "frequency_penalty"),
        ({"repeat_penalty": 0}, "repeat_penalty"),
        ({"seed": "abc"}, "seed"),
        ({"stream": "yes"}, "stream"),
        ({"stop": ["x"] * 100}, "stop"),
        ({"stop": 5}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": ""}, "model"),
        ({"model": 7}, "model"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
            "tools[0].function.name",
        ),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tool_choice": "required"}, None),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            None,
        ),
        ({"tools": [{"type": "function", "function": {"name": "f"}}] * 2}, None),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ],
)
def test_invalid_chat_fields_name_the_param(client, patch, param):
    body = {"model": "acme/none", "messages": MSG, **patch}
    err = assert_openai_error(client.post("/v1/chat/completions", json=body), 400)
    if param:
        assert err["param"] == param
        assert param.split("[")[0].split(".")[0] in err["message"]


def test_lone_surrogate_is_refused(client):
    raw = b'{"model":"acme/none","messages":[{"role":"user","content":"a\\ud800b"}]}'
    r = client.post("/v1/chat/completions", content=raw)
    assert_openai_error(r, 400, param="messages[0].content")


def test_missing_model_field(client):
    r = client.post("/v1/chat/completions", json={"messages": MSG})
    assert_openai_error(r, 400, param="model")


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"echo": True}, None),
        ({"suffix": "x"}, None),
        ({"best_of": 3}, "best_of"),
    ],
)
def test_invalid_completion_fields(client, patch, param):
    body = {"model": "acme/none", "prompt": "hi", **patch}
    err = assert_openai_error(client.post("/v1/completions", json=body), 400)
    if param:
        assert err["param"] == param


@pytest.mark.parametrize("model", ["acme/none", "none", "../../etc/passwd", "/etc/passwd", "a/b/c"])
def test_unknown_model_is_404(client, model):
    r = client.post("/v1/chat/completions", json={"model": model, "messages": MSG})
    err = assert_openai_error(r, 404, param="model", code="model_not_found")
    assert "/etc" not in err["message"]


def test_overlong_model_name_is_400(client):
    r = client.post("/v1/chat/completions", json={"model": "a" * 600, "messages": MSG})
    assert_openai_error(r, 400, param="model")


def test_unknown_fields_are_ignored(client):
    body = {"model": "acme/none", "messages": MSG, "foo": 1, "extra_body": {"x": 1}, "user": "u"}
    assert_openai_error(client.post("/v1/chat/completions", json=body), 404)


def test_unknown_route_and_method(client):
    assert_openai_error(client.get("/v1/nope"), 404)
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_models_list_empty_and_missing_model(client):
    assert client.get("/v1/models").json() == {"object": "list", "data": []}
    assert_openai_error(client.get("/v1/models/acme/none"), 404)
    assert client.get("/health").json()["status"] == "ok"


def test_error_envelopes_follow_the_dialect_of_the_path():
    from mlxserve.errors import InvalidRequest, ModelNotFound
    from mlxserve.http.errors import error_body_for

    bad = InvalidRequest("nope", param="x")
    assert error_body_for("/v1/messages", bad) == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "nope"},
    }
    assert error_body_for("/api/v1/chat", ModelNotFound("a/b"))["error"]["type"] == (
        "model_not_found"
    )
    assert error_body_for("/api/v1/chat", bad) == {
        "error": {
            "type": "invalid_request",
            "message": "nope",
            "code": "invalid_request",
            "param": "x",
        }
    }
    assert error_body_for("/v1/chat/completions", bad)["error"]["param"] == "x"


def test_deeply_nested_json_is_400(client):
    raw = b'{"model": "a/b", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    r = client.post("/v1/chat/completions", content=raw)
    assert_openai_error(r, 400, code="invalid_json")
