"""The OpenAPI document: every route is in it, its schemas are valid JSON Schema, and the
request schemas are the wire models' own."""

from __future__ import annotations

import jsonschema
import pytest
import schemathesis
from starlette.routing import Route
from starlette.testclient import TestClient

from mlxserve.app import create_app
from mlxserve.openapi import OPERATIONS, openapi_path
from mlxserve.protocols.openai import ChatCompletionRequest
from mlxserve.settings import Settings


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("openapi")
    return create_app(Settings(home=root, models_dir=root, require_auth=True))


@pytest.fixture(scope="module")
def document(app):
    with TestClient(app, base_url="http://127.0.0.1") as client:
        r = client.get("/openapi.json")  # open even when tokens are required
        assert r.status_code == 200
        return r.json()


def test_every_http_route_is_documented(app, document):
    for route in app.routes:
        # Left out on purpose: the web app's pages (include_in_schema=False).
        if isinstance(route, Route) and route.include_in_schema:
            path = openapi_path(route.path)
            for method in route.methods - {"HEAD"}:
                assert method.lower() in document["paths"][path], (method, path)


def test_every_listed_operation_is_a_real_route(app):
    real = {
        (m, openapi_path(r.path)) for r in app.routes if isinstance(r, Route) for m in r.methods
    }
    for op in OPERATIONS:
        assert (op.method, openapi_path(op.path)) in real, op


def test_schemas_are_valid_json_schema(document):
    assert document["openapi"].startswith("3.1")
    for name, schema in document["components"]["schemas"].items():
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            pytest.fail(f"{name}: {exc.message}")


def test_schemathesis_reads_every_operation(document):
    schema = schemathesis.openapi.from_dict(document)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= len(OPERATIONS)


def test_request_schema_is_the_wire_model(document):
    chat = document["paths"]["/v1/chat/completions"]["post"]
    ref = chat["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert set(ChatCompletionRequest.model_fields) <= set(schema["properties"])
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    error = chat["responses"]["401"]["content"]["application/json"]["schema"]["$ref"]
    assert error.endswith("/OpenAIError")
    messages = document["paths"]["/v1/messages"]["post"]["responses"]["400"]
    assert messages["content"]["application/json"]["schema"]["$ref"].endswith("/AnthropicError")
    assert chat["security"] == [{"bearer": []}]
    assert "401" not in document["paths"]["/health"]["get"]["responses"]


def test_path_parameters(document):
    op = document["paths"]["/v1/models/{model}"]["get"]
    assert op["parameters"] == [
        {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
    ]


def test_the_log_stream_is_documented_as_an_event_stream(document):
    ok = document["paths"]["/api/v1/logs/stream"]["get"]["responses"]["200"]["content"]
    assert list(ok) == ["text/event-stream"]
