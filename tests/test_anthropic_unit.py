"""Anthropic Messages wire conversions: content blocks to template messages, the core event
stream to content blocks and stream events, and bad input as 4xx in Anthropic's envelope."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.testclient import TestClient

from mlxserve.app import create_app
from mlxserve.core.sealed import ReasoningSeal
from mlxserve.core.types import (
    Done,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)
from mlxserve.errors import EngineFailure
from mlxserve.protocols.anthropic import CountTokensRequest, MessagesRequest
from mlxserve.routes.anthropic import MessageRenderer, _stream, stop_reason
from mlxserve.settings import Settings

SEAL = ReasoningSeal(b"k" * 32)

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}


def request(**kw):
    body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}], **kw}
    return MessagesRequest.model_validate(body)


def test_blocks_become_template_messages():
    body = request(
        system=[
            {"type": "text", "text": "one", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "two"},
        ],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hm", "signature": "s"},
                    {"type": "text", "text": "Let me look."},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "get_weather",
                        "input": {"city": "Oslo"},
                    },
                    {
                        "type": "tool_use",
                        "id": "toolu_2",
                        "name": "get_weather",
                        "input": {"city": "Rome"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "cold"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_2",
                        "is_error": True,
                        "content": [{"type": "text", "text": "no data"}],
                    },
                    {"type": "text", "text": "And tomorrow?"},
                ],
            },
            {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "x"}]},
        ],
    )
    assert list(body.to_core(0.8).messages) == [
        {"role": "system", "content": "one\ntwo"},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "reasoning_content": "hm",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
                },
                {
                    "id": "toolu_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Rome"}},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "cold"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: no data"},
        {"role": "user", "content": "And tomorrow?"},
        {"role": "assistant", "content": ""},
    ]


BILLING = "x-anthropic-billing-header: cc_version=2.1.37.3a3; cc_entrypoint=cli; cch=eb6c6;"


def test_claude_code_billing_header_is_dropped():
    """Its nonce changes on every request: left in, it would miss the prompt cache each turn."""

    def system(value):
        return request(system=value).to_core(0.0).messages[0]["content"]

    agent = {"type": "text", "text": "You are Claude Code."}
    assert system([{"type": "text", "text": BILLING}, agent]) == "You are Claude Code."
    assert system([{"type": "text", "text": BILLING + "\nYou are here."}]) == "You are here."
    assert system(BILLING + "\nYou are here.") == "You are here."
    assert request(system=BILLING).to_core(0.0).messages[0]["role"] == "user"
    count = CountTokensRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "system": BILLING}
    )
    assert count.template_messages()[0]["role"] == "user"
    # Only the header line at the very start of the first block is Claude Code's.
    kept = [agent, {"type": "text", "text": BILLING}]
    assert system(kept) == "You are Claude Code.\n" + BILLING
    assert system("Quote: " + BILLING) == "Quote: " + BILLING
    assert system([{"type": "text", "text": " " + BILLING}]) == " " + BILLING


def test_core_request_fields():
    core = request(
        tools=[
            {"name": "f", "description": "d", "input_schema": SCHEMA},
            {"type": "custom", "name": "g", "input_schema": SCHEMA},
        ],
        tool_choice={"type": "tool", "name": "g", "disable_parallel_tool_use": True},
        thinking={"type": "enabled", "budget_tokens": 2048},
        stop_sequences=["END"],
        temperature=0.2,
        top_p=0.9,
        top_k=40,
        output_config={"format": {"type": "json_schema", "schema": SCHEMA}, "effort": "high"},
    ).to_core(0.8)
    assert core.tools == (
        {"name": "f", "parameters": SCHEMA, "description": "d"},
        {"name": "g", "parameters": SCHEMA},
    )
    assert core.tool_choice == {"name": "g"} and core.parallel_tool_calls is False
    assert core.reasoning == "high" and not core.reasoning_optional
    assert core.stops == ("END",) and core.max_tokens == 8
    assert (core.sampling.temperature, core.sampling.top_p, core.sampling.top_k) == (0.2, 0.9, 40)
    assert core.json_schema == SCHEMA
    tools = [{"name": "f", "input_schema": SCHEMA}]
    assert request(tools=tools, tool_choice={"type": "any"}).to_core(0.8).tool_choice == "required"
    assert request(tools=tools, tool_choice={"type": "none"}).to_core(0.8).tool_choice == "none"
    assert request(tools=tools).to_core(0.8).tool_choice == "auto"
    assert request(thinking={"type": "disabled"}).to_core(0.8).reasoning == "off"
    assert request().to_core(0.8).reasoning is None
    assert request(ttl=60).to_core(0.8).ttl == 60


def test_count_tokens_request_needs_no_max_tokens():
    body = CountTokensRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "system": "s"}
    )
    assert body.to_core(0.8).messages == (
        {"role": "system", "content": "s"},
        {"role": "user", "content": "hi"},
    )


def done(reason="stop", completion=3, stop=None):
    return Done(reason, Usage(5, completion), stop)


def test_stop_reasons():
    assert stop_reason(done("stop")) == "end_turn"
    assert stop_reason(done("stop", stop="END")) == "stop_sequence"
    assert stop_reason(done("length")) == "max_tokens"
    assert stop_reason(done("tool_calls")) == "tool_use"


def test_renderer_event_sequence_and_message():
    r = MessageRenderer("m", 5, SEAL)
    events = [r.start()]
    for event in [
        ReasoningDelta("think"),
        TextDelta("Hel"),
        TextDelta("lo"),
        ToolCallStart(0, "call_abc", "f"),
        ToolCallDelta(0, '{"city":'),
        ToolCallDelta(0, '"Oslo"}'),
        ToolCallEnd(0, {"city": "Oslo"}),
    ]:
        events += r.feed(event)
    events += r.finish(done("tool_calls", 9))
    names = [n for n, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(data["type"] == name for name, data in events)
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == 5 and start["usage"]["output_tokens"] == 0
    assert events[1][1]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert events[3][1]["delta"] == {"type": "thinking_delta", "thinking": "think"}
    assert events[4][1]["delta"] == {"type": "signature_delta", "signature": SEAL.seal("think")}
    assert events[7][1] == {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "text_delta", "text": "Hel"},
    }
    assert events[10][1]["content_block"] == {
        "type": "tool_use",
        "id": "toolu_abc",
        "name": "f",
        "input": {},
    }
    assert events[11][1]["delta"] == {"type": "input_json_delta", "partial_json": '{"city":'}
    assert events[14][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {
            "input_tokens": 5,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 9,
        },
    }
    message = r.message()
    assert message["id"].startswith("msg_") and message["type"] == "message"
    assert message["content"] == [
        {"type": "thinking", "thinking": "think", "signature": SEAL.seal("think")},
        {"type": "text", "text": "Hello"},
        {"type": "tool_use", "id": "toolu_abc", "name": "f", "input": {"city": "Oslo"}},
    ]
    assert message["stop_reason"] == "tool_use" and message["usage"]["output_tokens"] == 9


def test_a_call_cut_off_by_max_tokens_has_empty_input():
    r = MessageRenderer("m", 5, SEAL)
    for event in [ToolCallStart(0, "call_1", "f"), ToolCallDelta(0, '{"ci'), ToolCallEnd(0)]:
        r.feed(event)
    r.finish(done("length"))
    assert r.message()["content"][0]["input"] == {}
    assert r.message()["stop_reason"] == "max_tokens"


class FailingGeneration:
    async def events(self, idle_seconds=None):
        yield TextDelta("x")
        raise EngineFailure("Generation failed: boom")

    def cancel(self):
        pass


def test_mid_stream_failure_is_an_error_event():
    async def run():
        return [c async for c in _stream(FailingGeneration(), MessageRenderer("m", 1, SEAL), 1.0)]

    chunks = asyncio.run(run())
    assert chunks[0].startswith("event: message_start\n")
    name, data = chunks[-1].strip().split("\n")
    assert name == "event: error"
    assert json.loads(data[6:]) == {
        "type": "error",
        "error": {"type": "api_error", "message": "Generation failed: boom"},
    }
    assert not any("message_stop" in c for c in chunks)


# -- the HTTP edge, without models


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    with TestClient(
        create_app(Settings(home=root, models_dir=root)), raise_server_exceptions=False
    ) as c:
        yield c


def assert_anthropic_error(r, status, kind="invalid_request_error"):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"type", "error"} and body["type"] == "error"
    assert body["error"]["type"] == kind and body["error"]["message"]
    return body["error"]["message"]


USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            "messages[0].content[0].source.type",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
            "messages[0].content[0].type",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]},
            "messages[0].content[0].tool_use_id",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}],
                    }
                ]
            },
            "messages",
        ),
        ({"system": [{"type": "image"}]}, "system[0].type"),
        ({"temperature": 1.5}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"stop_sequences": [""]}, "stop_sequences[0]"),
        ({"stop_sequences": ["x"] * 100}, "stop_sequences"),
        ({"tools": [{"name": "f"}]}, "tools[0].input_schema"),
        ({"tools": [{"name": "f", "input_schema": {}}] * 2}, "tools"),
        ({"tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
        ({"tool_choice": {"type": "any"}}, "tool_choice"),
        (
            {"tool_choice": {"type": "tool"}, "tools": [{"name": "f", "input_schema": {}}]},
            "tool_choice.name",
        ),
        (
            {
                "tool_choice": {"type": "tool", "name": "g"},
                "tools": [{"name": "f", "input_schema": {}}],
            },
            "tool_choice.name",
        ),
        ({"thinking": {"type": "on"}}, "thinking.type"),
        ({"stream": "yes"}, "stream"),
    ],
)
def test_bad_fields_are_400_in_anthropic_envelope(client, patch, field):
    body = {"model": "acme/none", "max_tokens": 4, "messages": USER, **patch}
    message = assert_anthropic_error(client.post("/v1/messages", json=body), 400)
    assert field in message


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
def test_lone_surrogate_is_refused_naming_where(client, path):
    raw = b'{"model":"acme/none","max_tokens":4,"system":"ok","messages":[{"role":"user","content":"a\\ud800"}]}'
    assert "messages[0].content" in assert_anthropic_error(client.post(path, content=raw), 400)


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
@pytest.mark.parametrize("raw", [b"", b"[]", b'{"model":', b"null"])
def test_malformed_bodies(client, path, raw):
    assert_anthropic_error(client.post(path, content=raw), 400)


def test_unknown_model_is_404_and_headers_are_accepted(client):
    headers = {
        "x-api-key": "k",
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "whatever",
        "authorization": "Bearer k",
    }
    body = {"model": "acme/none", "max_tokens": 4, "messages": USER, "metadata": {"user_id": "u"}}
    r = client.post("/v1/messages", json=body, headers=headers)
    assert "acme/none" in assert_anthropic_error(r, 404, "not_found_error")
    r = client.post("/v1/messages/count_tokens", json={"model": "acme/none", "messages": USER})
    assert_anthropic_error(r, 404, "not_found_error")
    assert_anthropic_error(client.get("/v1/messages"), 405)
