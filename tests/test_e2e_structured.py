"""End to end: structured output, tool calls and reasoning on both formats (openai SDK)."""

from __future__ import annotations

import json

import openai
import pytest

from tests.conftest import GGUF_KEY, MLX_KEY, THINK_GGUF_KEY, THINK_MLX_KEY

MODELS = [MLX_KEY, GGUF_KEY]
ASK = [{"role": "user", "content": "Describe a person."}]

# Nested: objects, arrays, enums, required fields; bounded so a random model must finish.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
        "active": {"type": "boolean"},
        "tags": {
            "type": "array",
            "items": {"type": "string", "enum": ["red", "green", "blue"]},
            "minItems": 1,
            "maxItems": 3,
        },
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "role", "active", "tags", "address"],
    "additionalProperties": False,
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "boolean"}, "b": {"type": "boolean"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def validate_person(data):
    assert set(data) == set(PERSON["required"])
    assert isinstance(data["name"], str) and len(data["name"]) <= 12
    assert data["role"] in ("admin", "editor", "viewer")
    assert isinstance(data["active"], bool)
    assert 1 <= len(data["tags"]) <= 3 and set(data["tags"]) <= {"red", "green", "blue"}
    assert set(data["address"]) == {"city", "zip"}
    assert len(data["address"]["zip"]) == 5 and data["address"]["zip"].isdigit()


def schema_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "p", "schema": schema, "strict": True}}


@pytest.mark.parametrize("model", MODELS)
def test_json_schema_streamed_and_not(client, model):
    r = client.chat.completions.create(
        model=model,
        messages=ASK,
        temperature=0,
        max_tokens=300,
        response_format=schema_format(PERSON),
    )
    assert r.choices[0].finish_reason == "stop"
    content = r.choices[0].message.content
    validate_person(json.loads(content))
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=ASK,
            temperature=0,
            max_tokens=300,
            stream=True,
            response_format=schema_format(PERSON),
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == content


def test_json_schema_same_on_both_formats(client):
    out = [
        client.chat.completions.create(
            model=m,
            messages=ASK,
            temperature=0,
            max_tokens=300,
            response_format=schema_format(PERSON),
        )
        .choices[0]
        .message.content
        for m in MODELS
    ]
    assert out[0] == out[1]


@pytest.mark.parametrize("model", MODELS)
def test_json_object_and_completions(client, model):
    r = client.chat.completions.create(
        model=model,
        messages=ASK,
        temperature=0,
        max_tokens=60,
        response_format={"type": "json_object"},
        extra_body={"ignore_eos": False},
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.startswith("{")
    c = client.completions.create(
        model=model,
        prompt="Person:",
        temperature=0,
        max_tokens=300,
        extra_body={"response_format": schema_format(PERSON)},
    )
    validate_person(json.loads(c.choices[0].text))


@pytest.mark.parametrize(
    ("schema", "feature"),
    [
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
        ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, "if"),
        ({"not": {"type": "string"}}, "not"),
    ],
)
@pytest.mark.parametrize("model", MODELS)
def test_unsupported_schema_feature_is_400(client, model, schema, feature):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=model, messages=ASK, max_tokens=10, response_format=schema_format(schema)
        )
    assert feature in e.value.message and e.value.param == "response_format"


def check_weather_call(call):
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert set(args) == {"city", "unit", "days"}
    assert args["unit"] in ("celsius", "fahrenheit") and 1 <= args["days"] <= 7
    return args


@pytest.mark.parametrize("model", MODELS)
def test_named_tool_choice_gives_a_valid_call_streamed_the_same(client, model):
    kw = dict(
        model=model,
        temperature=0,
        max_tokens=120,
        tools=[WEATHER, ADD],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        messages=[{"role": "user", "content": "Weather in Paris for 3 days?"}],
    )
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    args = check_weather_call(call)

    chunks = list(client.chat.completions.create(stream=True, **kw))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    first, rest = deltas[0], deltas[1:]
    assert first.index == 0 and first.id and first.type == "function"
    assert first.function.name == "get_weather" and first.function.arguments == ""
    assert rest and all(d.id is None and d.function.name is None for d in rest)
    assert json.loads("".join(d.function.arguments for d in rest)) == args
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_call_same_on_both_formats(client):
    calls = []
    for model in MODELS:
        r = client.chat.completions.create(
            model=model,
            temperature=0,
            max_tokens=120,
            tools=[WEATHER, ADD],
            tool_choice="required",
            parallel_tool_calls=False,
            messages=[{"role": "user", "content": "What should I do?"}],
        )
        (call,) = r.choices[0].message.tool_calls
        calls.append((call.function.name, json.loads(call.function.arguments)))
    assert calls[0] == calls[1]


@pytest.mark.parametrize("model", MODELS)
def test_tool_results_in_history(client, model):
    history = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Oslo", "unit": "celsius", "days": 1}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": -3}'},
    ]
    r = client.chat.completions.create(
        model=model, messages=history, tools=[WEATHER], temperature=0, max_tokens=8
    )
    assert r.choices[0].finish_reason in ("stop", "length")
    none = client.chat.completions.create(
        model=model,
        messages=history,
        tools=[WEATHER],
        tool_choice="none",
        temperature=0,
        max_tokens=8,
    )
    assert none.choices[0].message.tool_calls is None


@pytest.mark.parametrize("model", [THINK_MLX_KEY, THINK_GGUF_KEY])
def test_reasoning_is_separated(client, model):
    thinking = client.chat.completions.create(
        model=model, messages=ASK, temperature=0, max_tokens=16, extra_body={"ignore_eos": True}
    )
    msg = thinking.choices[0].message
    reasoning = msg.model_extra["reasoning_content"]
    assert reasoning and not msg.content
    details = thinking.usage.completion_tokens_details
    assert details.reasoning_tokens == thinking.usage.completion_tokens == 16

    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=ASK,
            temperature=0,
            max_tokens=16,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    streamed = "".join(
        (c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
        for c in chunks
        if c.choices
    )
    assert streamed == reasoning

    off = client.chat.completions.create(
        model=model,
        messages=ASK,
        temperature=0,
        max_tokens=16,
        reasoning_effort="none",
        extra_body={"ignore_eos": True},
    )
    assert off.choices[0].message.content
    assert not (off.choices[0].message.model_extra or {}).get("reasoning_content")


def test_reasoning_same_on_both_formats(client):
    out = [
        client.chat.completions.create(
            model=m, messages=ASK, temperature=0, max_tokens=16, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .message.model_extra["reasoning_content"]
        for m in (THINK_MLX_KEY, THINK_GGUF_KEY)
    ]
    assert out[0] == out[1]


@pytest.mark.parametrize("model", MODELS)
def test_reasoning_on_a_model_without_it_is_400(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=model, messages=ASK, max_tokens=4, reasoning_effort="high"
        )
    assert e.value.param == "reasoning"
    r = client.chat.completions.create(
        model=model, messages=ASK, max_tokens=2, reasoning_effort="none"
    )
    assert r.choices[0].finish_reason in ("stop", "length")
