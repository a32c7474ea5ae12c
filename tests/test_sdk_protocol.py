"""The SDK websocket protocol at the ASGI level: handshake, framing, errors for what is not
served, and the KV config and history conversions (no model work here; the SDK end-to-end
tests in test_sdk_python.py / test_sdk_js.py drive real models)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from mlxserve.app import create_app
from mlxserve.protocols.sdk import history_messages
from mlxserve.sdk.kvconfig import P, collapse, load_request, prediction
from mlxserve.sdk.transport import SdkError
from mlxserve.settings import Settings

GUEST = {"authVersion": 1, "clientIdentifier": "guest:abc", "clientPasskey": "xyz"}


def make_client(tmp_path: Path, models: Path | None = None, **settings) -> TestClient:
    root = models or tmp_path / "models"
    root.mkdir(exist_ok=True)
    app = create_app(Settings(home=tmp_path / "home", models_dir=root, **settings))
    return TestClient(app, base_url="http://127.0.0.1:1234")


@pytest.fixture
def client(tmp_path):
    with make_client(tmp_path) as c:
        yield c


def connect(client: TestClient, namespace: str, hello=GUEST):
    ws = client.websocket_connect(f"ws://127.0.0.1:1234/{namespace}")
    session = ws.__enter__()
    session.send_json(hello)
    return ws, session


def test_greeting_and_status(client):
    assert client.get("/lmstudio-greeting").json() == {"lmstudio": True}
    assert set(client.get("/lms-status").json()) == {"package", "version"}


@pytest.mark.parametrize(
    "namespace",
    ["llm", "embedding", "system", "files", "repository", "diagnostics", "plugins", "runtime"],
)
def test_every_namespace_authenticates_and_answers(client, namespace):
    ws, s = connect(client, namespace)
    try:
        assert s.receive_json() == {"success": True}
        s.send_json({"type": "rpcCall", "endpoint": "noSuchThing", "callId": 0})
        reply = s.receive_json()
        assert reply["type"] == "rpcError" and reply["callId"] == 0
        assert "noSuchThing" in reply["error"]["title"]
        assert reply["error"]["rootTitle"] == reply["error"]["title"]
        s.send_json(
            {"type": "channelCreate", "endpoint": "nope", "channelId": 0, "creationParameter": {}}
        )
        reply = s.receive_json()
        assert reply == {"type": "channelError", "channelId": 0, "error": reply["error"]}
        s.send_json(
            {"type": "signalSubscribe", "endpoint": "x", "subscribeId": 3, "creationParameter": {}}
        )
        assert s.receive_json()["type"] == "signalError"
        s.send_json({"type": "keepAlive"})
        assert s.receive_json() == {"type": "keepAliveAck"}
    finally:
        ws.__exit__(None, None, None)


def test_malformed_frames_are_answered(client):
    ws, s = connect(client, "system")
    try:
        assert s.receive_json()["success"]
        s.send_text("not json")
        assert s.receive_json()["type"] == "communicationWarning"
        s.send_bytes(b'{"type": "rpcCall", "endpoint": "version", "callId": 5}')
        assert s.receive_json()["callId"] == 5
    finally:
        ws.__exit__(None, None, None)


def test_system_rpcs(client):
    ws, s = connect(client, "system")
    try:
        assert s.receive_json()["success"]
        s.send_json({"type": "rpcCall", "endpoint": "listDownloadedModels", "callId": 1})
        assert s.receive_json() == {"type": "rpcResult", "callId": 1, "result": []}
        s.send_json({"type": "rpcCall", "endpoint": "version", "callId": 2})
        assert set(s.receive_json()["result"]) == {"version", "build"}
    finally:
        ws.__exit__(None, None, None)


def test_llm_errors_for_unknown_models(client):
    ws, s = connect(client, "llm")
    try:
        assert s.receive_json()["success"]
        spec = {"type": "query", "query": {"identifier": "nope"}}
        s.send_json(
            {
                "type": "rpcCall",
                "endpoint": "tokenize",
                "callId": 1,
                "parameter": {"specifier": spec, "inputString": "x"},
            }
        )
        error = s.receive_json()["error"]
        assert error["displayData"]["code"] == "generic.noModelMatchingQuery"
        assert error["displayData"]["query"] == {"identifier": "nope"}
        # Not found and not asked to throw: the result is left out (the clients reject null).
        s.send_json(
            {
                "type": "rpcCall",
                "endpoint": "getModelInfo",
                "callId": 2,
                "parameter": {"specifier": spec, "throwIfNotFound": False},
            }
        )
        assert s.receive_json() == {"type": "rpcResult", "callId": 2}
        s.send_json({"type": "rpcCall", "endpoint": "listLoaded", "callId": 3})
        assert s.receive_json() == {"type": "rpcResult", "callId": 3, "result": []}
        s.send_json(
            {
                "type": "rpcCall",
                "endpoint": "unloadModel",
                "callId": 4,
                "parameter": {"identifier": "No such model"},
            }
        )
        assert s.receive_json()["error"]["displayData"]["code"] == "generic.noModelMatchingQuery"
        s.send_json(
            {
                "type": "channelCreate",
                "endpoint": "getOrLoad",
                "channelId": 1,
                "creationParameter": {"identifier": "no/such", "loadConfigStack": {"layers": []}},
            }
        )
        reply = s.receive_json()
        assert reply["type"] == "channelError"
        assert reply["error"]["displayData"]["code"] == "generic.noModelMatchingQuery"
        s.send_json(
            {
                "type": "channelCreate",
                "endpoint": "predict",
                "channelId": 2,
                "creationParameter": "bad",
            }
        )
        assert s.receive_json()["type"] == "channelError"
    finally:
        ws.__exit__(None, None, None)


def test_bad_first_frame_is_refused(client):
    ws, s = connect(client, "llm", hello={"hello": 1})
    reply = s.receive_json()
    assert reply["success"] is False and isinstance(reply["error"], str)
    with pytest.raises(WebSocketDisconnect):
        s.receive_json()
    ws.__exit__(None, None, None)


def test_auth_required(tmp_path):
    with make_client(tmp_path, require_auth=True) as client:
        _, token = client.app.state.mlxserve.tokens.create("sdk")
        identifier, passkey = token.removeprefix("sk-lm-").split(":")
        ws, s = connect(client, "system")
        reply = s.receive_json()
        assert reply["success"] is False and "token" in reply["error"]
        ws.__exit__(None, None, None)
        ws, s = connect(
            client, "system", {**GUEST, "clientIdentifier": identifier, "clientPasskey": passkey}
        )
        assert s.receive_json() == {"success": True}
        s.send_json({"type": "rpcCall", "endpoint": "listDownloadedModels", "callId": 0})
        assert s.receive_json()["type"] == "rpcResult"
        ws.__exit__(None, None, None)
        # The greeting stays open: the SDKs probe it before they authenticate.
        assert client.get("/lmstudio-greeting").status_code == 200


# --- conversions -----------------------------------------------------------------------


def layer(name: str, **fields):
    return {
        "layerName": name,
        "config": {"fields": [{"key": k, "value": v} for k, v in fields.items()]},
    }


def test_collapse_later_layers_win():
    stack = {"layers": [layer("instance", a=1, b=2), layer("apiOverride", b=3)]}
    assert collapse(stack) == ({"a": 1, "b": 3}, {"instance", "apiOverride"})
    with pytest.raises(SdkError):
        collapse({"layers": [{"layerName": "x"}]})


def test_prediction_keys():
    p = "llm.prediction."
    pred = prediction(
        {
            "layers": [
                layer(
                    "apiOverride",
                    **{
                        p + "temperature": 0.2,
                        p + "maxPredictedTokens": {"checked": True, "value": 7},
                        p + "topKSampling": 5,
                        p + "topPSampling": {"checked": True, "value": 0.5},
                        p + "minPSampling": {"checked": False, "value": 0.1},
                        p + "repeatPenalty": {"checked": True, "value": False},
                        p + "stopStrings": ["x", ""],
                        p + "structured": {"type": "json", "jsonSchema": {"type": "object"}},
                        p + "toolChoice": {"type": "generic", "mode": "required"},
                        p + "tools": {
                            "type": "toolArray",
                            "tools": [{"type": "function", "function": {"name": "f"}}],
                        },
                    },
                )
            ]
        }
    )
    assert (pred.temperature, pred.max_tokens, pred.top_k, pred.top_p) == (0.2, 7, 5, 0.5)
    assert pred.min_p is None and pred.repeat_penalty is None
    assert pred.stops == ("x",) and pred.json_schema == {"type": "object"}
    assert pred.tool_choice == "required"
    closed = {"type": "object", "properties": {}, "additionalProperties": False}
    assert pred.tools == ({"name": "f", "parameters": closed},)
    assert not pred.raw
    # JS sends maxTokens: false as an unchecked box: no limit.
    assert (
        prediction(
            {"layers": [layer("a", **{p + "maxPredictedTokens": {"checked": False, "value": 1}})]}
        ).max_tokens
        is None
    )
    assert prediction({"layers": [layer("completeModeFormatting")]}).raw
    for bad in (
        {p + "temperature": "hot"},
        {p + "maxPredictedTokens": 5},
        {p + "structured": {"type": "gbnf", "gbnfGrammar": "root ::= x"}},
        {p + "toolChoice": {"type": "specific"}},
    ):
        with pytest.raises(SdkError):
            prediction({"layers": [layer("apiOverride", **bad)]})


def test_load_request():
    stack = {"layers": [layer("apiOverride", **{"llm.load.contextLength": 1024})]}
    request = load_request(stack, identifier="x", ttl_ms=1500)
    assert (request.context_length, request.identifier, request.ttl) == (1024, "x", 1.5)
    stack = {"layers": [layer("apiOverride", **{"embedding.load.contextLength": 128})]}
    assert load_request(stack, embedding=True).context_length == 128
    with pytest.raises(SdkError):
        load_request(None, ttl_ms=0)


def test_history_to_template_messages():
    history = {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "S"}]},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "toolCallRequest",
                        "toolCallRequest": {
                            "type": "function",
                            "id": "c1",
                            "name": "f",
                            "arguments": {"x": 1},
                        },
                    }
                ],
            },
            {
                "role": "tool",
                "content": [{"type": "toolCallResult", "content": "2", "toolCallId": "c1"}],
            },
        ]
    }
    assert history_messages(history) == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "ab"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
            ],
        },
        {"role": "tool", "content": "2", "tool_call_id": "c1"},
    ]
    with pytest.raises(SdkError, match="File"):
        history_messages(
            {"messages": [{"role": "user", "content": [{"type": "file", "name": "x"}]}]}
        )
    with pytest.raises(SdkError):
        history_messages({"messages": [{"role": "robot", "content": []}]})


def test_calls_and_channels_per_connection_are_capped(tmp_path, monkeypatch):
    from mlxserve.sdk import models as sdk_models
    from mlxserve.sdk import routes as sdk_routes
    from mlxserve.sdk import transport

    monkeypatch.setattr(transport, "MAX_CALLS_PER_CONNECTION", 3)
    monkeypatch.setattr(transport, "MAX_CHANNELS_PER_CONNECTION", 2)

    async def never(ctx, parameter):
        await asyncio.Event().wait()

    async def never_ends(ctx, channel, parameter):
        await asyncio.Event().wait()

    monkeypatch.setattr(sdk_routes, "list_downloaded", never)
    monkeypatch.setattr(sdk_models, "get_or_load", never_ends)
    with make_client(tmp_path) as client:
        ws, s = connect(client, "system")
        try:
            assert s.receive_json() == {"success": True}
            for call_id in range(4):
                s.send_json(
                    {"type": "rpcCall", "endpoint": "listDownloadedModels", "callId": call_id}
                )
            refused = s.receive_json()
            assert refused["type"] == "rpcError" and refused["callId"] == 3
            assert "Too many calls" in refused["error"]["title"]
        finally:
            ws.__exit__(None, None, None)
        ws, s = connect(client, "llm")
        try:
            assert s.receive_json() == {"success": True}
            for channel_id in range(3):
                create = {"type": "channelCreate", "endpoint": "getOrLoad", "channelId": channel_id}
                s.send_json(create)
            refused = s.receive_json()
            assert refused["type"] == "channelError" and refused["channelId"] == 2
            assert "Too many channels" in refused["error"]["title"]
        finally:
            ws.__exit__(None, None, None)


def test_calls_and_channels_per_token_are_capped_across_connections(tmp_path, monkeypatch):
    from mlxserve.sdk import models as sdk_models
    from mlxserve.sdk import routes as sdk_routes
    from mlxserve.sdk import transport

    monkeypatch.setattr(transport, "MAX_CALLS_PER_TOKEN", 3)
    monkeypatch.setattr(transport, "MAX_CHANNELS_PER_TOKEN", 2)
    release = asyncio.Event()

    async def held(ctx, parameter):
        await release.wait()

    async def never_ends(ctx, channel, parameter):
        await asyncio.Event().wait()

    monkeypatch.setattr(sdk_routes, "list_downloaded", held)
    monkeypatch.setattr(sdk_models, "get_or_load", never_ends)
    with make_client(tmp_path, require_auth=True) as client:
        tokens = client.app.state.mlxserve.tokens
        hellos = []
        for name in ("a", "b"):
            identifier, passkey = tokens.create(name)[1].removeprefix("sk-lm-").split(":")
            hellos.append({**GUEST, "clientIdentifier": identifier, "clientPasskey": passkey})
        opened = [connect(client, "system", hellos[0]) for _ in range(2)]
        other = connect(client, "system", hellos[1])
        channels = [connect(client, "llm", hellos[0]) for _ in range(2)]
        try:
            for _, s in [*opened, other, *channels]:
                assert s.receive_json() == {"success": True}
            call = {"type": "rpcCall", "endpoint": "listDownloadedModels"}
            # Token a: two calls on the first connection, two on the second; the fourth is
            # refused though each connection is far below its own cap.
            for call_id in range(2):
                opened[0][1].send_json({**call, "callId": call_id})
            for call_id in range(2):
                opened[1][1].send_json({**call, "callId": call_id})
            refused = opened[1][1].receive_json()
            assert refused["type"] == "rpcError" and refused["callId"] == 1
            assert "for this API token" in refused["error"]["title"]
            # Token b has its own share.
            other[1].send_json({**call, "callId": 7})
            create = {"type": "channelCreate", "endpoint": "getOrLoad"}
            channels[0][1].send_json({**create, "channelId": 0})
            channels[1][1].send_json({**create, "channelId": 0})
            channels[1][1].send_json({**create, "channelId": 1})
            refused = channels[1][1].receive_json()
            assert refused["type"] == "channelError" and refused["channelId"] == 1
            assert "for this API token" in refused["error"]["title"]
            # Finished calls give their share back.
            client.portal.call(release.set)
            answered = sorted(opened[0][1].receive_json()["callId"] for _ in range(2))
            assert answered == [0, 1] and opened[1][1].receive_json()["callId"] == 0
            assert other[1].receive_json() == {"type": "rpcResult", "callId": 7}
            release.clear()
            opened[0][1].send_json({**call, "callId": 9})
            client.portal.call(release.set)
            assert opened[0][1].receive_json() == {"type": "rpcResult", "callId": 9}
        finally:
            for ws, _ in [*opened, other, *channels]:
                ws.__exit__(None, None, None)


def test_parameters_are_models_with_to_core():
    from mlxserve.protocols.sdk import (
        ApplyPromptTemplateParameter,
        PredictParameter,
        parse_parameter,
    )

    history = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    stack = {"layers": [layer("apiOverride", **{P + "temperature": 0.3, P + "topKSampling": 20})]}
    body = parse_parameter(
        PredictParameter, {"modelSpecifier": {}, "history": history, "predictionConfigStack": stack}
    )
    request, pred = body.to_core("m:1", 0.8, None)
    assert (request.model, request.sampling.temperature, request.sampling.top_k) == ("m:1", 0.3, 20)
    assert request.messages == ({"role": "user", "content": "hi"},) and pred.temperature == 0.3
    assert request.parallel_tool_calls is False
    # The server's default temperature when the config gives none.
    request, _ = parse_parameter(PredictParameter, {"history": history}).to_core("m", 0.8, None)
    assert request.sampling.temperature == 0.8
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    body = parse_parameter(
        ApplyPromptTemplateParameter, {"history": history, "opts": {"toolDefinitions": [tool]}}
    )
    request, _ = body.to_core("m", 0.8, None)
    assert [t["name"] for t in request.tools] == ["f"]
    with pytest.raises(SdkError, match="opts.omitBosToken"):
        parse_parameter(ApplyPromptTemplateParameter, {"opts": {"omitBosToken": [1]}})
    with pytest.raises(SdkError, match="fuzzyPresetIdentifier"):
        parse_parameter(PredictParameter, {"fuzzyPresetIdentifier": {"a": 1}})
    with pytest.raises(SdkError, match="must be an object"):
        parse_parameter(PredictParameter, [])
