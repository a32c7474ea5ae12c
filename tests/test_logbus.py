"""The live log tap (``mlxserve log stream``): credentials masked, refused requests unseen."""

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx

from mlxserve.app import create_app
from mlxserve.core.logbus import redact
from mlxserve.settings import Settings

SECRET = "sk-lm-abc123:supersecret"


async def _published(app: Any, requests: list[tuple[str, dict[str, Any], dict[str, str]]]):
    bus = app.state.mlxserve.logbus
    transport = httpx.ASGITransport(app=app)
    async with (
        bus.subscribe() as queue,
        httpx.AsyncClient(transport=transport, base_url="http://localhost") as client,
    ):
        for path, body, headers in requests:
            await client.post(path, json=body, headers=headers)
        events = []
        while not queue.empty():
            events.append(queue.get_nowait())
    return events


def _app(tmp_path: Path, **settings: Any) -> Any:
    root = tmp_path / "models"
    root.mkdir(exist_ok=True)
    return create_app(Settings(home=tmp_path / "home", models_dir=root, **settings))


def test_log_stream_masks_mcp_credentials(tmp_path):
    app = _app(tmp_path)
    chat = {
        "model": "nope",
        "input": f"my key is {SECRET}",
        "integrations": [
            {
                "type": "ephemeral_mcp",
                "server_url": "http://127.0.0.1:1/mcp",
                "headers": {"Authorization": "Bearer hunter2", "X-Api-Key": "hunter3"},
            }
        ],
    }
    responses = {
        "model": "nope",
        "input": "hi",
        "tools": [
            {
                "type": "mcp",
                "server_label": "x",
                "server_url": "http://127.0.0.1:1/mcp",
                "headers": {"X-Token": "hunter4"},
                "authorization": "hunter5",
            }
        ],
    }
    events = asyncio.run(
        _published(app, [("/api/v1/chat", chat, {}), ("/v1/responses", responses, {})])
    )
    requests = [e for e in events if e["type"] == "request"]
    assert [e["path"] for e in requests] == ["/api/v1/chat", "/v1/responses"]
    text = json.dumps(events)
    for secret in (SECRET, "hunter2", "hunter3", "hunter4", "hunter5"):
        assert secret not in text
    assert requests[0]["body"]["integrations"][0]["headers"] == "***"
    assert requests[0]["body"]["integrations"][0]["server_url"] == "http://127.0.0.1:1/mcp"
    assert requests[1]["body"]["tools"][0]["authorization"] == "***"


def test_log_stream_masks_secrets_in_cut_bodies():
    # A body over the preview limit is not JSON any more: the masking is textual.
    from mlxserve.core.logbus import BODY_LIMIT, preview

    raw = json.dumps({"headers": {"Authorization": "Bearer hunter2"}, "pad": "x" * BODY_LIMIT})
    shown = preview([raw.encode()], len(raw))
    assert isinstance(shown, str) and "hunter2" not in shown
    assert redact({"api_key": "k", "nested": [{"password": "p"}], "n": 1}) == {
        "api_key": "***",
        "nested": [{"password": "***"}],
        "n": 1,
    }


def test_refused_requests_are_not_published(tmp_path):
    app = _app(tmp_path, require_auth=True)
    body = {"model": "nope", "messages": []}
    events = asyncio.run(
        _published(
            app,
            [
                ("/v1/chat/completions", body, {}),  # no token: 401
                ("/v1/chat/completions", body, {"Host": "evil.example"}),  # host guard: 403
            ],
        )
    )
    assert events == []
