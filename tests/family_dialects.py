"""Shared legs of the family end-to-end tests: the forced get_weather call on OpenAI chat (both
formats, streamed, and LM Studio's legacy v0 route), and an ``act()`` round with the LM Studio Python SDK over its websocket (the model calls a tool, the
SDK runs it, the next turn renders the result through the family's template)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal, cast

import httpx
import jsonschema
import lmstudio as lms
import openai
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionMessageToolCallParam
from openai.types.shared_params import FunctionDefinition

PARAMS: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Oslo", "Rome"]}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOL: FunctionDefinition = {
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": PARAMS,
}
ASK = "What is the weather in Oslo?"


def key(family: str, fmt: str) -> str:
    return f"mlxserve-test/tiny-{family}-{fmt}"


def forced(oai: openai.OpenAI, model: str, max_tokens: int, **extra: Any) -> Any:
    return oai.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": ASK}],
        tools=[{"type": "function", "function": TOOL}],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=max_tokens,
        temperature=0,
        **extra,
    )


def openai_round_trip(
    url: str, oai: openai.OpenAI, family: str, call_tokens: int, next_tokens: int
) -> None:
    """The forced call parses back on MLX and GGUF alike (the same arguments at temperature 0),
    the next turn with the tool's result renders through the family's template the same on
    both; streamed fragments join to the same call, and LM Studio v0 writes the same."""
    calls = {}
    for fmt in ("mlx", "gguf"):
        reply = forced(oai, key(family, fmt), call_tokens)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", (fmt, choice.message.content)
        assert not choice.message.content
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather"
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, PARAMS)
        calls[fmt] = arguments
        # A fixed id: some templates render it, and the two formats must see the same prompt.
        dumped = cast(
            ChatCompletionMessageToolCallParam, {**call.model_dump(), "id": "call_fixed_1"}
        )
        history: list[ChatCompletionMessageParam] = [
            {"role": "user", "content": ASK},
            {"role": "assistant", "content": None, "tool_calls": [dumped]},
            {"role": "tool", "tool_call_id": dumped["id"], "content": "Sunny, 21 C"},
        ]
        after = oai.chat.completions.create(
            model=key(family, fmt), messages=history, max_tokens=next_tokens, temperature=0
        )
        assert after.choices[0].finish_reason in ("stop", "length")
        calls[fmt + "-next"] = after.choices[0].message.content
    assert calls["mlx"] == calls["gguf"]
    assert calls["mlx-next"] == calls["gguf-next"]
    fragments, names = "", []
    for chunk in forced(oai, key(family, "gguf"), call_tokens, stream=True):
        for delta in chunk.choices[0].delta.tool_calls or () if chunk.choices else ():
            if delta.function and delta.function.name:
                names.append(delta.function.name)
            fragments += (delta.function and delta.function.arguments) or ""
    assert names == ["get_weather"] and json.loads(fragments) == calls["gguf"]
    assert v0_forced_call(url, key(family, "gguf"), ASK, TOOL, call_tokens) == calls["gguf"]


def v0_forced_call(
    url: str, model: str, ask: str, tool: Mapping[str, Any], max_tokens: int
) -> dict:
    """A forced call on ``/api/v0/chat/completions``; returns its parsed arguments."""
    r = httpx.post(
        url + "/api/v0/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": ask}],
            "tools": [{"type": "function", "function": tool}],
            "tool_choice": "required",
            "parallel_tool_calls": False,
            "max_tokens": max_tokens,
            "temperature": 0,
        },
        timeout=120,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice["message"]
    assert not choice["message"].get("content")
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == tool["name"]
    arguments = json.loads(call["function"]["arguments"])
    jsonschema.validate(arguments, tool["parameters"])
    # v0 adds LM Studio's stats and model info to the OpenAI shape.
    assert body["model_info"]["format"] == "gguf" and body["stats"]["tokens_per_second"] >= 0
    return arguments


City = Literal["Oslo", "Rome"]


def act_round(url: str, model: str, ask: str) -> None:
    """``act()`` with one tool, forced (``forced_tool_calls`` fixture): the SDK runs the tool on
    the parsed call and sends its result back for a second round."""
    calls: list[str] = []

    def get_weather(city: City) -> str:
        """Weather in a city."""
        calls.append(city)
        return "Sunny, 21 C"

    messages: list = []
    with lms.Client(url.removeprefix("http://")) as client:
        result = client.llm.model(model).act(
            ask,
            [get_weather],
            max_prediction_rounds=2,
            config={"temperature": 0, "maxTokens": 60},
            on_message=messages.append,
        )
    assert result.rounds == 2, (result.rounds, messages)
    assert calls and all(c in ("Oslo", "Rome") for c in calls), calls
    roles = [m.role for m in messages]
    assert roles[:2] == ["assistant", "tool"] and roles[-1] == "assistant", roles
    requests = [p for p in messages[0].content if p.type == "toolCallRequest"]
    assert requests and requests[0].tool_call_request.name == "get_weather", messages[0]
    results = [p for p in messages[1].content if p.type == "toolCallResult"]
    assert results[0].tool_call_id == requests[0].tool_call_request.id


def v1_mcp_round(url: str, model: str, mcp_url: str) -> None:
    """LM Studio v1 chat with an ephemeral MCP tool (``mcp_url``), forced, then a stateful
    follow-up that replays the tool turn through the family's template."""
    # LM Studio v1: the MCP tool is called, its result fed back, and the model answers.
    r = httpx.post(
        url + "/api/v1/chat",
        json={
            "model": model,
            "input": "Look up red.",
            "integrations": [
                {
                    "type": "ephemeral_mcp",
                    "server_label": "t",
                    "server_url": mcp_url,
                    "allowed_tools": ["lookup"],
                }
            ],
            "tool_choice": "required",
            "max_output_tokens": 60,
            "temperature": 0,
        },
        timeout=120,
    )
    assert r.status_code == 200, r.text
    # A stateful follow-up replays the tool turn through the family's template.
    follow = httpx.post(
        url + "/api/v1/chat",
        json={
            "model": model,
            "input": "Thanks.",
            "max_output_tokens": 4,
            "temperature": 0,
            "previous_response_id": r.json()["response_id"],
        },
        timeout=120,
    )
    assert follow.status_code == 200, follow.text
    types = [o["type"] for o in r.json()["output"]]
    assert "tool_call" in types and "invalid_tool_call" not in types, r.json()["output"]
    (done,) = [o for o in r.json()["output"] if o["type"] == "tool_call"]
    assert done["tool"] == "lookup" and done["arguments"]["color"] in ("red", "green")
