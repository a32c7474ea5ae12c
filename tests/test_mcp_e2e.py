"""End to end: MCP tools in LM Studio's /api/v1/chat and the Responses API, against real MCP
servers written with the SDK's server class (tests/mcp_servers.py): one over streamable HTTP
on a loopback port (a per-request server), one over stdio from mcp.json (kept alive).

A random-weight model never calls a tool by itself: the requests force the first round's
call with ``tool_choice``; the loop then runs the call, feeds the result back, and the
model answers in the next round."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from mlxserve.auth import TokenStore
from mlxserve.core.mcp import ServerSpec
from mlxserve.core.mcp_session import Connection
from mlxserve.errors import McpConnectionError
from tests.conftest import GGUF_KEY, MLX_KEY, REPO, Server, free_port

SERVERS = REPO / "tests" / "mcp_servers.py"


def _wait_port(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "MCP test server exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError("MCP test server did not start")


def _serve(transport: str, log: Path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(SERVERS), transport, str(port), str(log)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def mcp_http(tmp_path_factory):
    """The streamable HTTP server: (its URL, its call log)."""
    log = tmp_path_factory.mktemp("mcp-http") / "calls.jsonl"
    for port in _serve("http", log):
        yield f"http://127.0.0.1:{port}/mcp", log


@pytest.fixture(scope="module")
def mcp_server(models_root, tmp_path_factory):
    """mlxserve with both kinds of MCP allowed, auth on, and a stdio server in mcp.json:
    (the server, its bearer token, the stdio server's call log)."""
    home = tmp_path_factory.mktemp("mcp-home")
    log = home / "stdio-calls.jsonl"
    config = {
        "mcpServers": {
            "local": {"command": sys.executable, "args": [str(SERVERS), "stdio", str(log)]}
        }
    }
    (home / "mcp.json").write_text(json.dumps(config))
    _, token = TokenStore(home / "tokens.json").create("mcp-tests")
    with pytest.MonkeyPatch.context() as env:
        # Long enough for every tool but the "sleepy" one, which needs 30 seconds.
        env.setenv("MLXSERVE_MCP_CALL_TIMEOUT", "3")
        srv = Server(
            models_root,
            home,
            "--no-auto-evict",
            "--require-auth",
            "--allow-ephemeral-mcp",
            "--allow-mcp-json",
            "--mcp-allowed-hosts",
            "127.0.0.1",
        )
    yield srv, token, log
    srv.stop()
    # Shutting down closed the kept-alive stdio server.
    for pid in {c["pid"] for c in calls(log)}:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.fixture(scope="module")
def http(mcp_server):
    srv, token, _ = mcp_server
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=srv.url, timeout=120, headers=headers) as client:
        yield client


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def ephemeral(url: str, **extra) -> dict:
    return {"type": "ephemeral_mcp", "server_label": "tester", "server_url": url, **extra}


def sse_events(response: httpx.Response) -> list[tuple[str, dict]]:
    out: list[tuple[str, dict]] = []
    name = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
            assert data["type"] == name
            out.append((data["type"], data))
    return out


def test_ephemeral_http_call_reaches_the_server_mlx(http, mcp_http):
    url, log = mcp_http
    before = len(calls(log))
    r = http.post(
        "/api/v1/chat",
        json={
            "model": MLX_KEY,
            "input": "Code word for red?",
            "temperature": 0,
            "max_output_tokens": 40,
            "tool_choice": "required",
            "store": False,
            "integrations": [ephemeral(url, allowed_tools=["lookup"])],
        },
    )
    assert r.status_code == 200, r.text
    output = r.json()["output"]
    made = calls(log)[before:]
    assert [c["tool"] for c in made] == ["lookup"]
    (call,) = [item for item in output if item["type"] == "tool_call"]
    assert call["tool"] == "lookup" and call["arguments"] == made[0]["arguments"]
    assert call["output"] == made[0]["result"]
    assert call["provider_info"] == {"type": "ephemeral_mcp", "server_label": "tester"}
    # The final answer follows the call (the second round offers tools with "auto").
    assert output[-1]["type"] == "message" and output.index(call) < len(output) - 1
    assert r.json()["stats"]["total_output_tokens"] > 8


def test_allowed_tools_hides_the_others(http, mcp_http):
    url, _ = mcp_http
    r = http.post(
        "/api/v1/chat",
        json={
            "model": MLX_KEY,
            "input": "hi",
            "tool_choice": {"name": "lookup"},
            "integrations": [ephemeral(url, allowed_tools=["roll"])],
        },
    )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "tool_choice" and "lookup" in r.json()["error"]["message"]


def test_stdio_server_from_mcp_json_streamed_gguf_and_kept_alive(http, mcp_server):
    _, _, log = mcp_server
    body = {
        "model": GGUF_KEY,
        "input": "Roll a die",
        "temperature": 0,
        "max_output_tokens": 40,
        "stream": True,
        "tool_choice": {"name": "roll"},
        "store": True,
        "integrations": [{"type": "plugin", "id": "mcp/local", "allowed_tools": ["roll"]}],
    }
    with http.stream("POST", "/api/v1/chat", json=body) as r:
        assert r.status_code == 200
        events = sse_events(r)
    names = [n for n, _ in events]
    assert names[0] == "chat.start" and names[-1] == "chat.end" and "error" not in names
    start = names.index("tool_call.start")
    assert names[start : start + 3] == [
        "tool_call.start",
        "tool_call.arguments",
        "tool_call.success",
    ]
    assert "message.start" in names[start:]
    provider = {"type": "plugin", "plugin_id": "mcp/local"}
    success = events[start + 2][1]
    (made,) = calls(log)
    assert success["tool"] == "roll" and success["output"] == made["result"]
    assert success["provider_info"] == provider == events[start][1]["provider_info"]
    assert events[start + 1][1]["arguments"] == made["arguments"] == success["arguments"]
    result = events[-1][1]["result"]
    (item,) = [i for i in result["output"] if i["type"] == "tool_call"]
    assert item == {
        "type": "tool_call",
        "tool": "roll",
        "arguments": made["arguments"],
        "output": made["result"],
        "provider_info": provider,
    }

    # The stored turn carries the call: the conversation continues from it, and the plugin
    # string form reuses the same kept-alive server process.
    r = http.post(
        "/api/v1/chat",
        json={
            "model": GGUF_KEY,
            "input": "Again",
            "max_output_tokens": 40,
            "tool_choice": {"name": "lookup"},
            "previous_response_id": result["response_id"],
            "integrations": ["mcp/local"],
        },
    )
    assert r.status_code == 200, r.text
    assert len(calls(log)) == 2 and calls(log)[1]["pid"] == made["pid"], r.text


def test_failing_tool_and_huge_result(http, mcp_http):
    url, _ = mcp_http
    base = {
        "model": MLX_KEY,
        "input": "x",
        "temperature": 0,
        "max_output_tokens": 40,
        "integrations": [ephemeral(url)],
        "store": False,
    }
    with http.stream(
        "POST", "/api/v1/chat", json={**base, "stream": True, "tool_choice": {"name": "broken"}}
    ) as r:
        events = sse_events(r)
    names = [n for n, _ in events]
    failure = dict(events)["tool_call.failure"]
    assert "broken" in failure["reason"] and failure["metadata"]["tool_name"] == "broken"
    assert "tool_call.success" not in names and names[-1] == "chat.end"
    assert events[-1][1]["result"]["output"][-1]["type"] == "message"

    r = http.post("/api/v1/chat", json={**base, "tool_choice": {"name": "huge"}})
    assert r.status_code == 200, r.text
    (call,) = [i for i in r.json()["output"] if i["type"] == "tool_call"]
    assert "[Truncated: the tool result was 270000 characters" in call["output"]
    assert len(call["output"]) < 270_000


def test_tool_timeout_mid_stream(http, client, mcp_http):
    """A call that outlasts MLXSERVE_MCP_CALL_TIMEOUT ends the stream with the dialect's
    error, after the failed call."""
    url, _ = mcp_http
    body = {
        "model": MLX_KEY,
        "input": "x",
        "stream": True,
        "store": False,
        "tool_choice": {"name": "sleepy"},
        "integrations": [ephemeral(url)],
    }
    with http.stream("POST", "/api/v1/chat", json=body) as r:
        events = sse_events(r)
    names = [n for n, _ in events]
    assert names[-3:] == ["tool_call.failure", "error", "chat.end"]
    error = events[-2][1]["error"]
    assert error["type"] == "mcp_connection_error" and "3 seconds" in error["message"]

    kw = dict(
        model=GGUF_KEY,
        input="x",
        tools=[mcp_tool(url)],
        tool_choice={"type": "mcp", "server_label": "tester", "name": "sleepy"},
    )
    with client.responses.stream(**kw) as stream:
        streamed = list(stream)
    assert [e.type for e in streamed][-3:] == [
        "response.mcp_call.failed",
        "response.output_item.done",
        "response.failed",
    ]
    (call,) = [i for i in streamed[-1].response.output if i.type == "mcp_call"]
    assert call.status == "failed" and call.error.type == "http_error"


def test_dead_server_is_an_mcp_connection_error(http):
    dead = f"http://127.0.0.1:{free_port()}/mcp"
    for stream in (False, True):
        r = http.post(
            "/api/v1/chat",
            json={
                "model": MLX_KEY,
                "input": "x",
                "stream": stream,
                "integrations": [ephemeral(dead)],
            },
        )
        assert r.status_code == 424
        assert r.json()["error"]["type"] == "mcp_connection_error"


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "http://169.254.169.254/latest/mcp", "http://localhost:9/mcp"]
)
def test_ephemeral_urls_are_checked(http, url):
    r = http.post(
        "/api/v1/chat", json={"model": MLX_KEY, "input": "x", "integrations": [ephemeral(url)]}
    )
    assert r.status_code in (400, 403)
    assert r.json()["error"]["param"] == "server_url"


def test_mcp_is_off_unless_enabled(server):
    body = {"model": MLX_KEY, "input": "x", "integrations": [ephemeral("http://127.0.0.1:9/m")]}
    r = httpx.post(server.url + "/api/v1/chat", json=body, timeout=30)
    assert r.status_code == 403 and "--allow-ephemeral-mcp" in r.json()["error"]["message"]
    body["integrations"] = ["mcp/local"]
    r = httpx.post(server.url + "/api/v1/chat", json=body, timeout=30)
    assert r.status_code == 403 and "--allow-mcp-json" in r.json()["error"]["message"]
    r = httpx.post(
        server.url + "/v1/responses",
        timeout=30,
        json={
            "model": MLX_KEY,
            "input": "x",
            "tools": [{"type": "mcp", "server_label": "a", "server_url": "http://127.0.0.1:9/m"}],
        },
    )
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"


@pytest.fixture(scope="module")
def client(mcp_server):
    srv, token, _ = mcp_server
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=token, max_retries=0)


def mcp_tool(url: str, **extra) -> dict:
    return {
        "type": "mcp",
        "server_label": "tester",
        "server_url": url,
        "require_approval": "never",
        **extra,
    }


def test_responses_mcp_items_mlx(client, mcp_http):
    url, log = mcp_http
    before = len(calls(log))
    r = client.responses.create(
        model=MLX_KEY,
        input="Code word for green?",
        temperature=0,
        max_output_tokens=40,
        tools=[mcp_tool(url, allowed_tools=["lookup"], headers={"X-Secret": "s3"})],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    listing, call, *rest = r.output
    assert listing.type == "mcp_list_tools" and listing.server_label == "tester"
    assert [t.name for t in listing.tools] == ["lookup"]
    (made,) = calls(log)[before:]
    assert call.type == "mcp_call" and call.name == "lookup" and call.status == "completed"
    assert call.output == made["result"] and json.loads(call.arguments) == made["arguments"]
    assert rest and rest[-1].type == "message"
    assert "headers" not in r.tools[0].model_dump(exclude_none=True)

    # The stored conversation continues, with no tools.
    follow = client.responses.create(
        model=MLX_KEY, previous_response_id=r.id, input="thanks", max_output_tokens=3
    )
    assert follow.output[-1].type == "message"


def test_responses_mcp_stream_gguf(client, mcp_http):
    url, log = mcp_http
    before = len(calls(log))
    kw = dict(
        model=GGUF_KEY,
        input="Roll",
        temperature=0,
        max_output_tokens=40,
        tools=[mcp_tool(url, allowed_tools=["roll"])],
        tool_choice={"type": "mcp", "server_label": "tester", "name": "roll"},
    )
    with client.responses.stream(**kw) as stream:
        events = list(stream)
    # The answer round runs until max_output_tokens: the response ends "incomplete".
    final = events[-1].response
    types = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    expected = [
        "response.mcp_list_tools.in_progress",
        "response.mcp_list_tools.completed",
        "response.mcp_call_arguments.delta",
        "response.mcp_call_arguments.done",
        "response.mcp_call.in_progress",
        "response.mcp_call.completed",
    ]
    positions = [types.index(t) for t in expected]
    assert positions == sorted(positions) and types[-1] in (
        "response.completed",
        "response.incomplete",
    )
    (made,) = calls(log)[before:]
    call = final.output[1]
    assert call.type == "mcp_call" and call.output == made["result"]
    assert [e.output_index for e in events if e.type == "response.mcp_call.completed"] == [1]


def test_responses_dead_server(client):
    with pytest.raises(openai.APIStatusError) as e:
        client.responses.create(
            model=MLX_KEY, input="x", tools=[mcp_tool(f"http://127.0.0.1:{free_port()}/mcp")]
        )
    assert e.value.status_code == 424
    assert e.value.body["code"] == "mcp_connection_error"


def test_slow_tool_and_silent_server_time_out(mcp_http):
    """Timeouts end in McpConnectionError, never a hang: a tool slower than the call timeout,
    and a server that accepts the connection but never answers."""
    url, _ = mcp_http

    async def run() -> None:
        spec = ServerSpec("t", (("type", "ephemeral_mcp"),), url=url)
        conn = Connection(spec, connect_timeout=10, call_timeout=0.5)
        await conn.open()
        try:
            with pytest.raises(McpConnectionError, match="no answer within 0.5 seconds"):
                await conn.call("sleepy", {"seconds": 30})
        finally:
            await conn.close()

        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen()
            port = silent.getsockname()[1]
            spec = ServerSpec("s", (("type", "ephemeral_mcp"),), url=f"http://127.0.0.1:{port}/")
            with pytest.raises(McpConnectionError, match="'s'"):
                await Connection(spec, connect_timeout=0.5, call_timeout=0.5).open()

    asyncio.run(run())


def test_older_sse_server_is_reached_through_the_fallback(tmp_path):
    log = tmp_path / "calls.jsonl"

    async def run(port: int) -> None:
        spec = ServerSpec("old", (("type", "ephemeral_mcp"),), url=f"http://127.0.0.1:{port}/sse")
        conn = Connection(spec, connect_timeout=10, call_timeout=10)
        await conn.open()
        try:
            assert "lookup" in [t.name for t in await conn.list_tools()]
            outcome = await conn.call("lookup", {"color": "green"})
        finally:
            await conn.close()
        assert outcome.output == calls(log)[0]["result"] and not outcome.is_error

    for port in _serve("sse", log):
        asyncio.run(run(port))
