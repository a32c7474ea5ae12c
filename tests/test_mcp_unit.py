"""MCP pieces without a model: request parsing, settings gates, URL checks, mcp.json."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from types import SimpleNamespace

import pytest

from mlxserve.core.mcp import (
    Requested,
    Toolset,
    check_url,
    config_spec,
    load_config,
    specs_for,
)
from mlxserve.core.mcp_spec import CallOutcome, McpTool, ServerSpec
from mlxserve.core.toolloop import ToolLoop, ToolResult, _Call, with_tools
from mlxserve.core.types import CoreRequest, Done, SamplingParams, Usage
from mlxserve.errors import InvalidRequest, PermissionDenied
from mlxserve.protocols.lmstudio import ChatRequest
from mlxserve.protocols.responses import ResponsesRequest
from mlxserve.routes.common import parse
from mlxserve.settings import Settings

EPHEMERAL = {
    "type": "ephemeral_mcp",
    "server_label": "hf",
    "server_url": "https://example.com/mcp",
    "allowed_tools": ["search"],
    "headers": {"Authorization": "Bearer x"},
}


def test_lmstudio_integrations_in_every_documented_form():
    body = parse(
        ChatRequest,
        {
            "model": "m",
            "input": "hi",
            "integrations": [
                "mcp/playwright",
                {"type": "plugin", "id": "mcp/fs", "allowed_tools": ["read"]},
                EPHEMERAL,
            ],
        },
    )
    assert body.requested_servers() == [
        Requested("plugin", "playwright"),
        Requested("plugin", "fs", allowed_tools=frozenset({"read"})),
        Requested(
            "ephemeral",
            "hf",
            "https://example.com/mcp",
            (("Authorization", "Bearer x"),),
            frozenset({"search"}),
        ),
    ]
    # One integration on its own is taken as a list of one.
    single = parse(ChatRequest, {"model": "m", "input": "hi", "integrations": EPHEMERAL})
    assert [r.label for r in single.requested_servers()] == ["hf"]


@pytest.mark.parametrize(
    "integrations",
    [
        ["playwright"],  # not an mcp/ plugin id
        [{"type": "plugin", "id": "lmstudio/js-code-sandbox"}],
        [{"type": "ephemeral_mcp", "server_label": "a b", "server_url": "https://x"}],
        [{"type": "ephemeral_mcp", "server_label": "a"}],
    ],
)
def test_bad_integrations_are_400(integrations):
    with pytest.raises(InvalidRequest) as e:
        parse(ChatRequest, {"model": "m", "input": "hi", "integrations": integrations})
    assert (e.value.param or "").startswith("integrations")


def test_lmstudio_tool_choice_needs_integrations():
    body = parse(ChatRequest, {"model": "m", "input": "hi", "tool_choice": "required"})
    with pytest.raises(InvalidRequest) as e:
        body.check_supported()
    assert e.value.param == "tool_choice"


def mcp_tool(**extra):
    return {"type": "mcp", "server_label": "s", "server_url": "https://example.com/mcp", **extra}


def test_responses_mcp_tool():
    body = parse(
        ResponsesRequest,
        {
            "model": "m",
            "input": "hi",
            "tools": [mcp_tool(allowed_tools={"tool_names": ["a"]}, authorization="tok")],
            "tool_choice": {"type": "mcp", "server_label": "s", "name": "a"},
        },
    )
    (requested,) = body.requested_servers()
    assert requested.allowed_tools == frozenset({"a"})
    assert ("Authorization", "Bearer tok") in requested.headers
    assert body.to_core(0.8, []).tool_choice == {"name": "a"}


@pytest.mark.parametrize(
    "tool",
    [
        mcp_tool(require_approval="always"),
        mcp_tool(require_approval={"always": {"tool_names": ["a"]}}),
        {"type": "mcp", "server_label": "s", "connector_id": "connector_gmail"},
    ],
)
def test_responses_mcp_refusals(tool):
    with pytest.raises(InvalidRequest) as e:
        parse(ResponsesRequest, {"model": "m", "input": "hi", "tools": [tool]})
    assert (e.value.param or "").startswith("tools")


def test_responses_mcp_items_as_input():
    body = parse(
        ResponsesRequest,
        {
            "model": "m",
            "input": [
                {"role": "user", "content": "roll"},
                {"type": "mcp_list_tools", "id": "mcpl_1", "server_label": "s", "tools": []},
                {
                    "type": "mcp_call",
                    "id": "mcp_1",
                    "name": "roll",
                    "arguments": "{}",
                    "server_label": "s",
                    "output": "4",
                },
            ],
        },
    )
    messages = body.input_messages()
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert messages[1]["tool_calls"][0]["function"]["name"] == "roll"
    assert messages[2] == {"role": "tool", "tool_call_id": "mcp_1", "content": "4"}


def test_check_url():
    check_url("https://93.184.215.14/mcp", [])  # a public address
    with pytest.raises(InvalidRequest):
        check_url("file:///etc/passwd", [])
    with pytest.raises(InvalidRequest):
        check_url("ftp://example.com/", [])
    for private in (
        "http://127.0.0.1:8000/mcp",
        "http://169.254.169.254/",
        "http://10.0.0.1/",
        "http://[::1]:80/",
        "http://localhost:9/",
    ):
        with pytest.raises(PermissionDenied):
            check_url(private, [])
    check_url("http://127.0.0.1:8000/mcp", ["127.0.0.1"])
    check_url("http://127.0.0.1:8000/mcp", ["127.0.0.1:8000"])
    with pytest.raises(PermissionDenied):
        check_url("http://127.0.0.1:8001/mcp", ["127.0.0.1:8000"])


def settings(tmp_path, **kw) -> Settings:
    return Settings(home=tmp_path, **kw)


def test_specs_for_gates(tmp_path):
    ephemeral = Requested("ephemeral", "a", "http://127.0.0.1:1/mcp")
    plugin = Requested("plugin", "local")
    run = asyncio.run
    with pytest.raises(PermissionDenied, match="--allow-ephemeral-mcp"):
        run(specs_for(settings(tmp_path), [ephemeral]))
    with pytest.raises(PermissionDenied, match="--allow-mcp-json"):
        run(specs_for(settings(tmp_path), [plugin]))
    with pytest.raises(PermissionDenied, match="--require-auth"):
        run(specs_for(settings(tmp_path, allow_mcp_json=True), [plugin]))
    on = settings(
        tmp_path,
        allow_mcp_json=True,
        require_auth=True,
        allow_ephemeral_mcp=True,
        mcp_allowed_hosts="127.0.0.1",
    )
    with pytest.raises(InvalidRequest, match="no server named 'local'"):
        run(specs_for(on, [plugin]))
    (tmp_path / "mcp.json").write_text(json.dumps({"mcpServers": {"local": {"command": "x"}}}))
    specs = run(specs_for(on, [ephemeral, plugin]))
    assert [s.provider for s in specs] == [
        {"type": "ephemeral_mcp", "server_label": "a"},
        {"type": "plugin", "plugin_id": "mcp/local"},
    ]
    with pytest.raises(InvalidRequest, match="own label"):
        run(specs_for(on, [ephemeral, ephemeral]))


def test_mcp_json_entries(tmp_path):
    assert load_config(tmp_path / "absent.json") == {}
    path = tmp_path / "mcp.json"
    path.write_text("{not json")
    with pytest.raises(InvalidRequest):
        load_config(path)
    stdio = config_spec("fs", {"command": "npx", "args": ["-y", "srv"], "env": {"A": "1"}}, None)
    assert (stdio.command, stdio.args, stdio.env) == ("npx", ("-y", "srv"), (("A", "1"),))
    remote = config_spec("r", {"url": "https://x/mcp", "headers": {"K": "v"}}, frozenset({"t"}))
    assert (remote.url, remote.headers, remote.allowed_tools) == (
        "https://x/mcp",
        (("K", "v"),),
        frozenset({"t"}),
    )
    with pytest.raises(InvalidRequest):
        config_spec("bad", {"args": []}, None)


def test_toolset_names_and_schemas():
    a = ServerSpec("a", (("type", "ephemeral_mcp"), ("server_label", "a")))
    b = ServerSpec("b", (("type", "ephemeral_mcp"), ("server_label", "b")))
    schema = {"type": "object", "properties": {"q": {"type": "string"}}}
    toolset = Toolset()
    toolset.add(a, None, [McpTool(a, "search", "Search", schema)])
    (function,) = toolset.functions()
    assert function["parameters"]["additionalProperties"] is False
    assert schema.get("additionalProperties") is None
    assert toolset.provider("search") == {"type": "ephemeral_mcp", "server_label": "a"}
    with pytest.raises(InvalidRequest, match="both offer"):
        toolset.add(b, None, [McpTool(b, "search", None, schema)])


class FakeConnection:
    def __init__(self):
        self.calls = []

    async def call(self, name, arguments):
        self.calls.append((name, arguments))
        return CallOutcome(f"{name} ok", False)


def loop_with(tool_schema):
    spec = ServerSpec("s", (("type", "plugin"), ("plugin_id", "mcp/s")))
    conn = FakeConnection()
    toolset = Toolset()
    toolset.add(spec, conn, [McpTool(spec, "pick", None, tool_schema)])
    request = CoreRequest(model="m", sampling=SamplingParams(temperature=0.0), messages=())
    return ToolLoop(None, with_tools(request, toolset), None, toolset, 4), conn


def test_loop_runs_calls_and_reports_invalid_ones():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    loop, conn = loop_with(schema)
    run = asyncio.run
    ok = run(loop._run(_Call("c1", "pick", '{"n": 3}', {"n": 3})))
    assert (ok.status, ok.output, ok.provider) == (
        "success",
        "pick ok",
        {"type": "plugin", "plugin_id": "mcp/s"},
    )
    assert conn.calls == [("pick", {"n": 3})]
    bad = run(loop._run(_Call("c2", "pick", '{"n": "three"}', {"n": "three"})))
    assert bad.status == "invalid_arguments" and "'three' is not of type 'integer'" in bad.reason
    assert run(loop._run(_Call("c3", "pick", "[1]"))).status == "invalid_arguments"
    unknown = run(loop._run(_Call("c4", "other", "{}", {})))
    assert unknown.status == "invalid_name" and unknown.provider is None
    assert len(conn.calls) == 1


def test_results_are_fitted_to_the_context():
    loop, _ = loop_with({"type": "object"})
    # One token per character, a 4000-token context of which 600 are used: the two results
    # share what is left after the room kept for the answer.
    engine = SimpleNamespace(tokenize=lambda text: list(range(len(text))))
    loop.gen = SimpleNamespace(instance=SimpleNamespace(context_length=4000, engine=engine))
    done = Done("tool_calls", Usage(500, 100))
    room = (4000 - 600 - 256) // 2
    small = ToolResult("c", "pick", "{}", None, "success", "fits")
    big = replace(small, output="y" * 5000)
    fitted = asyncio.run(loop._fit([small, big], done))
    assert fitted[0] == small
    assert fitted[1].output.startswith("y" * 1000) and room - 5 <= len(fitted[1].output) <= room
    kept = len(fitted[1].output.split("\n[")[0])
    assert f"[Truncated: the tool result was 5000 characters; only the first {kept} fit" in (
        fitted[1].output
    )
    # No room at all: the result is left out, saying so.
    (gone,) = asyncio.run(loop._fit([big], Done("tool_calls", Usage(3500, 300))))
    assert gone.output.startswith("[The tool result (5000 characters) was left out")
