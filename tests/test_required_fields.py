"""Fields the upstream APIs require are required here too, in every dialect: a user message
without content is a 400 naming it, never an empty turn that generates to the end of the
context."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from mlxserve.app import create_app
from mlxserve.settings import Settings


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("required")
    with TestClient(create_app(Settings(home=root, models_dir=root))) as c:
        yield c


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/v0/chat/completions"])
@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "system", "content": "s"}, {"role": "user"}], "messages[1].content"),
        ([{"role": "user", "content": None}], "messages[0].content"),
        ([{"role": "user", "content": "q"}, {"role": "assistant"}], "messages[1].content"),
    ],
)
def test_openai_message_without_content(client, path, messages, param):
    r = client.post(path, json={"model": "m", "messages": messages})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and f"'{param}'" in error["message"]


def test_an_assistant_turn_that_calls_tools_needs_no_content(client):
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c", "content": "r"},
    ]
    r = client.post("/v1/chat/completions", json={"model": "nobody/none", "messages": messages})
    # Past validation: the model is what is missing.
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/messages", {"model": "m", "max_tokens": 8, "messages": [{"role": "user"}]}),
        ("/v1/messages", {"model": "m", "messages": [{"role": "user", "content": "q"}]}),
        ("/v1/responses", {"model": "m", "input": [{"role": "user"}]}),
        ("/v1/responses", {"model": "m"}),
        ("/api/v1/chat", {"model": "m"}),
        ("/v1/completions", {"model": "m"}),
        ("/v1/embeddings", {"model": "m"}),
    ],
)
def test_other_dialects_require_what_upstream_requires(client, path, body):
    assert client.post(path, json=body).status_code == 400
