"""End to end: the official openai SDK's Responses API against a real server, on MLX and GGUF."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import GGUF_KEY, MLX_KEY, THINK_GGUF_KEY, THINK_MLX_KEY

MODELS = [MLX_KEY, GGUF_KEY]
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 12},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "days"],
        "additionalProperties": False,
    },
}
COLOR = {
    "type": "object",
    "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]}},
    "required": ["color"],
    "additionalProperties": False,
}
FIXED = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def check_order(events):
    """The event sequence Codex parses, with contiguous sequence numbers."""
    assert [e.sequence_number for e in events] == list(range(len(events)))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] in ("response.completed", "response.incomplete")
    assert (
        len(
            {
                e.response.id
                for e in events
                if e.type.startswith("response.") and hasattr(e, "response")
            }
        )
        == 1
    )
    return types


@pytest.mark.parametrize("model", MODELS)
def test_response_streamed_and_not(client, model):
    r = client.responses.create(model=model, input="Hello!", max_output_tokens=12, **FIXED)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == model
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    (message,) = r.output
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "output_text" and r.output_text
    assert r.usage.output_tokens == 12 and r.usage.input_tokens > 5
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.error is None and r.previous_response_id is None

    events = list(
        client.responses.create(
            model=model, input="Hello!", max_output_tokens=12, stream=True, **FIXED
        )
    )
    types = check_order(events)
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * len(deltas),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert "".join(d.delta for d in deltas) == r.output_text
    assert all(d.item_id == events[2].item.id and d.output_index == 0 for d in deltas)
    final = events[-1].response
    assert final.output_text == r.output_text and final.usage.output_tokens == 12


def test_same_response_on_both_formats(client):
    out = [
        client.responses.create(model=m, input="Hi", max_output_tokens=10, **FIXED) for m in MODELS
    ]
    assert out[0].output_text == out[1].output_text
    assert out[0].usage.input_tokens == out[1].usage.input_tokens


@pytest.mark.parametrize("model", MODELS)
def test_previous_response_id_continues_streamed_and_not(client, model):
    first = client.responses.create(
        model=model, input="My name is Ada.", instructions="Be brief.", max_output_tokens=6, **FIXED
    )
    second = client.responses.create(
        model=model,
        input="What is my name?",
        previous_response_id=first.id,
        max_output_tokens=6,
        **FIXED,
    )
    assert second.previous_response_id == first.id
    # The stored history is what the model saw: the same turns sent whole give the same reply.
    whole = client.chat.completions.create(
        model=model,
        temperature=0,
        max_tokens=6,
        extra_body={"ignore_eos": True},
        messages=[
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "What is my name?"},
        ],
    )
    assert second.output_text == whole.choices[0].message.content
    assert second.usage.input_tokens == whole.usage.prompt_tokens

    events = list(
        client.responses.create(
            model=model,
            input="What is my name?",
            previous_response_id=first.id,
            max_output_tokens=6,
            stream=True,
            **FIXED,
        )
    )
    check_order(events)
    assert events[-1].response.output_text == second.output_text
    # ...and a streamed response is stored too
    third = client.responses.create(
        model=model,
        input="Again?",
        max_output_tokens=2,
        previous_response_id=events[-1].response.id,
        **FIXED,
    )
    assert third.usage.input_tokens > second.usage.input_tokens


def test_conversations_are_shared_with_lmstudio_chat(server, client):
    first = client.responses.create(
        model=GGUF_KEY, input="My name is Ada.", max_output_tokens=4, **FIXED
    )
    r = httpx.post(
        server.url + "/api/v1/chat",
        timeout=60,
        json={
            "model": GGUF_KEY,
            "input": "And yours?",
            "previous_response_id": first.id,
            "max_output_tokens": 4,
            "temperature": 0,
        },
    )
    assert r.status_code == 200, r.text
    middle = r.json()["response_id"]
    last = client.responses.create(
        model=GGUF_KEY, input="Bye.", previous_response_id=middle, max_output_tokens=2, **FIXED
    )
    whole = client.chat.completions.create(
        model=GGUF_KEY,
        max_tokens=2,
        temperature=0,
        extra_body={"ignore_eos": True},
        messages=[
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "And yours?"},
            {"role": "assistant", "content": r.json()["output"][-1]["content"]},
            {"role": "user", "content": "Bye."},
        ],
    )
    assert last.usage.input_tokens == whole.usage.prompt_tokens


def test_store_false_and_unknown_previous_response(client):
    r = client.responses.create(
        model=MLX_KEY, input="Hi", store=False, max_output_tokens=2, **FIXED
    )
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(
            model=MLX_KEY, input="Hi", previous_response_id=r.id, max_output_tokens=2
        )
    assert e.value.code == "previous_response_not_found"
    assert e.value.param == "previous_response_id"


@pytest.mark.parametrize("model", MODELS)
def test_forced_function_call_and_its_output(client, model):
    kw = dict(
        model=model,
        input="Weather in Paris?",
        tools=[WEATHER],
        temperature=0,
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=100,
    )
    r = client.responses.create(**kw)
    assert r.status == "completed"
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    args = json.loads(call.arguments)
    assert set(args) == {"city", "days"} and 1 <= args["days"] <= 7

    # The SDK's stream helper accumulates the events into the same response.
    with client.responses.stream(**kw) as stream:
        types = [e.type for e in stream]
        streamed = stream.get_final_response()
    assert types[2:] == [
        "response.output_item.added",
        *["response.function_call_arguments.delta"] * (len(types) - 6),
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    (scall,) = streamed.output
    assert (scall.name, scall.arguments) == (call.name, call.arguments)

    # The tool's result continues the stored conversation.
    follow = client.responses.create(
        model=model,
        previous_response_id=streamed.id,
        tools=[WEATHER],
        max_output_tokens=4,
        input=[{"type": "function_call_output", "call_id": scall.call_id, "output": "sunny"}],
        **FIXED,
    )
    assert follow.status == "incomplete" and follow.output[0].type == "message"
    # ...and the same turns sent as input items (stateless, as Codex does) give the same reply.
    stateless = client.responses.create(
        model=model,
        tools=[WEATHER],
        max_output_tokens=4,
        store=False,
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "type": "function_call",
                "call_id": scall.call_id,
                "name": scall.name,
                "arguments": scall.arguments,
            },
            {"type": "function_call_output", "call_id": scall.call_id, "output": "sunny"},
        ],
        **FIXED,
    )
    assert stateless.output_text == follow.output_text


@pytest.mark.parametrize("model", MODELS)
def test_json_schema_text_format(client, model):
    fmt = {"format": {"type": "json_schema", "name": "c", "schema": COLOR, "strict": True}}
    with client.responses.stream(
        model=model, input="Pick a color", text=fmt, temperature=0, max_output_tokens=50
    ) as stream:
        final = stream.get_final_response()
    assert final.status == "completed"
    assert json.loads(final.output_text)["color"] in ("red", "green", "blue")


@pytest.mark.parametrize("model", [THINK_MLX_KEY, THINK_GGUF_KEY])
def test_reasoning_items(client, model):
    events = list(
        client.responses.create(
            model=model, input="Think", max_output_tokens=8, stream=True, **FIXED
        )
    )
    check_order(events)
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    (item,) = events[-1].response.output
    assert item.type == "reasoning" and item.content[0].text == reasoning and reasoning
    assert events[-1].response.usage.output_tokens_details.reasoning_tokens == 8
    off = client.responses.create(
        model=model, input="Think", max_output_tokens=8, reasoning={"effort": "none"}, **FIXED
    )
    assert [o.type for o in off.output] == ["message"]


def test_bad_requests(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MLX_KEY, input="x", reasoning={"effort": "high"})
    assert e.value.param == "reasoning"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(
            model=MLX_KEY,
            input="x",
            text={
                "format": {
                    "type": "json_schema",
                    "name": "n",
                    "schema": {"not": {"type": "string"}},
                }
            },
        )
    assert e.value.param == "text.format"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MLX_KEY, input="hello " * 5000)
    assert e.value.param == "input" and e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope/nope", input="x")
    r = httpx.post(server.url + "/v1/responses", content=b"{", timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
