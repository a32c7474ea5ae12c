"""Responses API wire conversions: input items to template messages, the core event stream to
output items and stream events, and bad input as 4xx in OpenAI's envelope (ASGI level)."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.testclient import TestClient

from mlxserve.app import create_app
from mlxserve.core.chatstore import ChatStore, new_response_id
from mlxserve.core.sealed import ReasoningSeal
from mlxserve.core.textstream import TextAssembler
from mlxserve.core.types import (
    Done,
    Idle,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)
from mlxserve.errors import EngineFailure
from mlxserve.protocols.responses import ResponsesRequest
from mlxserve.routes.blocks import Appended, Blocks, Closed, Opened
from mlxserve.routes.responses import ResponseRenderer, _stream
from mlxserve.settings import Settings

SEAL = ReasoningSeal(b"k" * 32)


def request(**kw):
    return ResponsesRequest.model_validate({"model": "m", "input": "hi", **kw})


def renderer(**kw):
    body = request(**kw)
    return ResponseRenderer(body, {"model": "m", **kw}, body.to_core(0.8, []), "m", SEAL)


def test_string_input_is_one_user_message():
    assert request(input="hello").input_messages() == [{"role": "user", "content": "hello"}]


def test_input_items_become_template_messages():
    body = request(
        instructions="be brief",
        input=[
            {"role": "developer", "content": "dev note"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"}]},
            {
                "type": "reasoning",
                "summary": [],
                "content": [{"type": "reasoning_text", "text": "hm"}],
            },
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "b", "annotations": []}],
            },
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"x": 1}'},
            {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "not json"},
            {"type": "function_call_output", "call_id": "c1", "output": "one"},
            {
                "type": "function_call_output",
                "call_id": "c2",
                "output": [{"type": "input_text", "text": "two"}],
            },
        ],
    )
    history = [{"role": "user", "content": "earlier"}]
    core = body.to_core(0.8, history)
    assert list(core.messages) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "earlier"},
        {"role": "system", "content": "dev note"},
        {"role": "user", "content": "a"},
        {
            "role": "assistant",
            "content": "b",
            "reasoning_content": "hm",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}},
                {
                    "id": "c2",
                    "type": "function",
                    "function": {"name": "g", "arguments": "not json"},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
    ]


def test_function_call_without_a_message_opens_an_assistant_turn():
    body = request(
        input=[
            {"role": "user", "content": "q"},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        ]
    )
    assert body.input_messages()[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {}}}
        ],
    }


def test_core_request_fields():
    core = request(
        tools=[{"type": "function", "name": "f", "parameters": {"type": "object"}}],
        tool_choice={"type": "function", "name": "f"},
        parallel_tool_calls=False,
        text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
        reasoning={"effort": "minimal"},
        max_output_tokens=7,
        temperature=0.3,
        top_p=0.5,
    ).to_core(0.8, [])
    assert core.tools == ({"name": "f", "parameters": {"type": "object"}},)
    assert core.tool_choice == {"name": "f"} and core.parallel_tool_calls is False
    assert core.json_schema == {"type": "object"} and core.reasoning == "low"
    assert core.max_tokens == 7 and core.sampling.temperature == 0.3 and core.sampling.top_p == 0.5
    assert request(reasoning={"effort": "none"}).to_core(0.8, []).reasoning == "off"
    assert request(ttl=60).to_core(0.8, []).ttl == 60
    assert request(text={"format": {"type": "json_object"}}).to_core(0.8, []).json_schema == {
        "type": "object"
    }


def test_blocks_hold_whitespace_around_tool_calls():
    blocks = Blocks()
    changes = []
    for event in [
        TextDelta("\n"),
        ToolCallStart(0, "call_1", "f"),
        ToolCallDelta(0, "{}"),
        ToolCallEnd(0, {}),
        TextDelta("\n"),
    ]:
        changes += blocks.feed(event)
    changes += blocks.finish()
    assert [type(c) for c in changes] == [Opened, Appended, Closed]
    assert [b.kind for b in blocks.blocks] == ["tool"]
    # ...but a reply of only whitespace keeps it, and an empty reply gets an empty text block
    blocks = Blocks()
    blocks.feed(TextDelta(" "))
    blocks.finish()
    assert [(b.kind, b.text) for b in blocks.blocks] == [("text", " ")]
    blocks = Blocks()
    blocks.finish()
    assert [(b.kind, b.text) for b in blocks.blocks] == [("text", "")]


def test_blocks_change_kind_in_order():
    blocks = Blocks()
    for event in [
        ReasoningDelta("a"),
        ReasoningDelta("b"),
        TextDelta("c"),
        ToolCallStart(0, "call_1", "f"),
        ToolCallDelta(0, '{"x":'),
        ToolCallDelta(0, "1}"),
        ToolCallEnd(0, {"x": 1}),
    ]:
        blocks.feed(event)
    blocks.finish()
    assert [(b.index, b.kind, b.text) for b in blocks.blocks] == [
        (0, "reasoning", "ab"),
        (1, "text", "c"),
        (2, "tool", '{"x":1}'),
    ]


def done(reason="stop", completion=3, reasoning=0):
    return Done(reason, Usage(5, completion, reasoning))


def test_renderer_event_sequence_and_final_object():
    r = renderer(instructions="sys", metadata={"k": "v"})
    events = r.opening()
    for event in [
        ReasoningDelta("think"),
        TextDelta("Hel"),
        TextDelta("lo"),
        ToolCallStart(0, "call_1", "f"),
        ToolCallDelta(0, "{}"),
        ToolCallEnd(0, {}),
    ]:
        events += r.feed(event)
    events += r.finish(done("tool_calls", 4, 1))
    events.append(r.terminal())
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    created = events[0]["response"]
    assert created["status"] == "in_progress" and created["output"] == []
    assert created["id"].startswith("resp_") and created["usage"] is None
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["instructions"] == "sys"
    assert final["metadata"] == {"k": "v"}
    reasoning, message, call = final["output"]
    assert reasoning["type"] == "reasoning" and reasoning["id"].startswith("rs_")
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "think"}]
    assert message["id"].startswith("msg_") and message["status"] == "completed"
    assert message["content"] == [
        {"type": "output_text", "text": "Hello", "annotations": [], "logprobs": []}
    ]
    assert call == {
        "id": call["id"],
        "type": "function_call",
        "status": "completed",
        "call_id": "call_1",
        "name": "f",
        "arguments": "{}",
    }
    assert final["usage"] == {
        "input_tokens": 5,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 4,
        "output_tokens_details": {"reasoning_tokens": 1},
        "total_tokens": 9,
    }
    delta = events[10]
    assert delta["item_id"] == message["id"] and delta["output_index"] == 1
    assert delta["content_index"] == 0 and delta["logprobs"] == []
    assert events[16]["item_id"] == call["id"] and events[16]["delta"] == "{}"
    assert r.template_output() == [
        {
            "role": "assistant",
            "content": "Hello",
            "reasoning_content": "think",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {}}}
            ],
        }
    ]


def test_renderer_incomplete_on_length():
    r = renderer(max_output_tokens=2)
    r.feed(TextDelta("ab"))
    r.finish(done("length", 2))
    final = r.terminal()
    assert final["type"] == "response.incomplete"
    assert final["response"]["status"] == "incomplete"
    assert final["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["response"]["output"][0]["status"] == "incomplete"


class FailingGeneration:
    """Stands in for a generation whose engine fails after one token."""

    cancelled = False

    async def events(self, idle_seconds=None):
        yield Idle()
        yield TextDelta("x")
        raise EngineFailure("Generation failed: boom")

    def cancel(self):
        self.cancelled = True

    async def close(self):
        self.cancel()


def test_mid_stream_failure_is_response_failed():
    gen = FailingGeneration()

    async def save():
        raise AssertionError("a failed response is not stored")

    async def run():
        return [chunk async for chunk in _stream(gen, renderer(), save, 1.0)]

    chunks = asyncio.run(run())
    assert ": ping\n\n" in chunks
    named = [c for c in chunks if c.startswith("event:")]
    last = named[-1].split("\n")
    assert last[0] == "event: response.failed"
    data = json.loads(last[1].removeprefix("data: "))
    assert data["response"]["status"] == "failed"
    assert data["response"]["error"] == {
        "code": "server_error",
        "message": "Generation failed: boom",
    }
    numbers = [json.loads(c.split("\n")[1][6:])["sequence_number"] for c in named]
    assert numbers == list(range(len(named)))
    assert gen.cancelled


def test_assembler_reports_which_stop_string_ended_the_text():
    pieces = {i: ch.encode() for i, ch in enumerate("abcdefghijklmnopqrstuvwxyz ")}
    asm = TextAssembler(lambda i: pieces[i], ("xyz", "lo w", "wor"))
    out = "".join(asm.add(ord(c) - 97 if c != " " else 26) for c in "hello world")
    assert out == "hel" and asm.stopped and asm.stop_sequence == "lo w"


def test_store_takes_an_id_announced_before_the_turn(tmp_path):
    store = ChatStore(tmp_path / "chats.sqlite3")
    rid = new_response_id()
    assert (
        store.save(
            response_id=rid,
            parent_id=None,
            model="m",
            system=None,
            input=[{"role": "user", "content": "q"}],
            output=[],
        )
        == rid
    )
    assert store.conversation(rid).messages == [{"role": "user", "content": "q"}]
    store.close()


# -- the HTTP edge, without models


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    with TestClient(
        create_app(Settings(home=root, models_dir=root)), raise_server_exceptions=False
    ) as c:
        yield c


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"input": None}, "input"),
        ({"input": []}, "input"),
        ({"input": 5}, "input"),
        ({"input": ["x"]}, "input[0]"),
        ({"input": [{"type": "input_image", "image_url": "x"}]}, "input[0].type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
            "input[0].content[0]",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file"}]}]},
            "input[0].content[0].type",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_text"}]}]},
            "input[0].content[0].text",
        ),
        ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        ({"input": [{"type": "function_call", "name": "f"}]}, "input[0].call_id"),
        ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input[0].output"),
        ({"tools": [{"type": "function", "name": "bad name"}]}, "tools[0].name"),
        ({"tools": [{"type": "function", "name": "f"}] * 2}, "tools"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "name": "g"}}, "tool_choice"),
        ({"text": {"format": {"type": "json_schema"}}}, "text.format"),
        ({"text": {"format": {"type": "xml"}}}, "text.format.type"),
        ({"reasoning": {"effort": "extreme"}}, "reasoning.effort"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"store": "yes"}, "store"),
        ({"stream": 1}, "stream"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"background": True}, "background"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"previous_response_id": ""}, "previous_response_id"),
        ({"model": ""}, "model"),
        ({"ttl": 0}, "ttl"),
    ],
)
def test_bad_fields_are_400_naming_the_field(client, patch, param):
    r = client.post("/v1/responses", json={"model": "acme/none", "input": "hi", **patch})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param


def test_lone_surrogate_is_refused_naming_where(client):
    raw = b'{"model":"acme/none","input":[{"role":"user","content":[{"type":"input_text","text":"a\\ud800"}]}]}'
    r = client.post("/v1/responses", content=raw)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input[0].content[0].text"


@pytest.mark.parametrize("raw", [b"", b"[]", b'{"model":', b"null"])
def test_malformed_bodies(client, raw):
    r = client.post("/v1/responses", content=raw)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_unknown_previous_response_is_404_before_the_model(client):
    body = {"model": "acme/none", "input": "hi", "previous_response_id": "resp_nope"}
    r = client.post("/v1/responses", json=body)
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "previous_response_not_found" and err["param"] == "previous_response_id"


def test_unknown_model_and_ignored_fields(client):
    body = {
        "model": "acme/none",
        "input": "hi",
        "include": ["x"],
        "truncation": "auto",
        "metadata": {"a": "b"},
        "user": "u",
    }
    r = client.post("/v1/responses", json=body)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
