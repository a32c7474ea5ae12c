"""End to end: the official anthropic SDK against a real server, on MLX and GGUF."""

from __future__ import annotations

import anthropic
import httpx
import pytest

from tests.conftest import GGUF_KEY, MLX_KEY, THINK_GGUF_KEY, THINK_MLX_KEY

MODELS = [MLX_KEY, GGUF_KEY]
HELLO = [{"role": "user", "content": "Hello, who are you?"}]
WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 12},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "days"],
        "additionalProperties": False,
    },
}
# This SDK no longer sends sampling fields itself; the server still takes them.
FIXED = {"extra_body": {"temperature": 0, "ignore_eos": True}}


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)


@pytest.mark.parametrize("model", MODELS)
def test_message_streamed_and_not(server, client, model):
    m = client.messages.create(model=model, max_tokens=12, messages=HELLO, **FIXED)
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant"
    assert m.model == model and m.stop_reason == "max_tokens" and m.stop_sequence is None
    (block,) = m.content
    assert block.type == "text" and block.text
    # The session's server may already hold this prompt from another test's request.
    u = m.usage
    prompt_tokens = (
        u.input_tokens + (u.cache_read_input_tokens or 0) + (u.cache_creation_input_tokens or 0)
    )
    assert m.usage.output_tokens == 12 and prompt_tokens > 5

    with client.messages.stream(model=model, max_tokens=12, messages=HELLO, **FIXED) as stream:
        events = list(stream)
        final = stream.get_final_message()
    raw = [
        e.type
        for e in events
        if e.type
        in (
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        )
    ]
    deltas = raw.count("content_block_delta")
    assert raw == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * deltas,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert final.content[0].text == block.text and final.stop_reason == "max_tokens"
    # The same prompt again: Anthropic counts the part read from the prompt cache apart.
    usage = final.usage
    read, written = usage.cache_read_input_tokens, usage.cache_creation_input_tokens
    assert usage.input_tokens + read + written == prompt_tokens
    assert usage.cache_read_input_tokens > 0 and usage.output_tokens == 12

    # The raw stream has the ping after the first block opens, as Anthropic sends it.
    body = {"model": model, "max_tokens": 3, "messages": HELLO, "stream": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/messages", json=body, timeout=30) as r:
        names = [line[7:] for line in r.iter_lines() if line.startswith("event: ")]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-2:] == ["message_delta", "message_stop"]


@pytest.mark.parametrize("model", MODELS)
def test_claude_code_billing_header_keeps_the_prompt_cache(client, model):
    """Claude Code sends a new ``cch`` nonce in its first system block on every request."""

    def turn(nonce):
        header = (
            f"x-anthropic-billing-header: cc_version=2.1.37.3a3; cc_entrypoint=cli; cch={nonce};"
        )
        system = [
            {"type": "text", "text": header},
            {"type": "text", "text": f"Billing test for {model}. You are a coding agent."},
        ]
        return client.messages.create(
            model=model, max_tokens=8, system=system, messages=HELLO, **FIXED
        )

    def prompt(usage):
        return (
            usage.input_tokens + usage.cache_creation_input_tokens + usage.cache_read_input_tokens
        )

    cold = turn("eb6c6")
    warm = turn("0a1f3")
    assert warm.usage.cache_read_input_tokens >= prompt(warm.usage) - 1
    assert prompt(warm.usage) == prompt(cold.usage)
    assert cold.usage.cache_read_input_tokens < 8  # no earlier request had this system prompt
    assert warm.content[0].text == cold.content[0].text


def test_same_message_on_both_formats(client):
    out = [client.messages.create(model=m, max_tokens=10, messages=HELLO, **FIXED) for m in MODELS]
    assert out[0].content[0].text == out[1].content[0].text
    assert out[0].usage == out[1].usage


@pytest.mark.parametrize("model", MODELS)
def test_stop_sequence(client, model):
    full = client.messages.create(model=model, max_tokens=30, messages=HELLO, **FIXED)
    text = full.content[0].text
    stop = next((text[i : i + 3] for i in range(4, len(text) - 3) if text[i : i + 3].strip()), None)
    if stop is None:
        pytest.skip("the model's output has no usable substring")
    m = client.messages.create(
        model=model, max_tokens=30, messages=HELLO, stop_sequences=["never-there", stop], **FIXED
    )
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    assert m.content[0].text == text[: text.index(stop)]
    with client.messages.stream(
        model=model, max_tokens=30, messages=HELLO, stop_sequences=[stop], **FIXED
    ) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", stop)


@pytest.mark.parametrize("model", MODELS)
def test_forced_tool_use_and_its_result(client, model):
    kw = dict(
        model=model,
        max_tokens=100,
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        extra_body={"temperature": 0},
    )
    m = client.messages.create(**kw)
    assert m.stop_reason == "tool_use"
    (use,) = m.content
    assert use.type == "tool_use" and use.name == "get_weather" and use.id.startswith("toolu_")
    assert set(use.input) == {"city", "days"} and 1 <= use.input["days"] <= 7

    with client.messages.stream(**kw) as stream:
        types = [e.type for e in stream]
        final = stream.get_final_message()
    assert "input_json" in types  # the SDK's own event for input_json_delta
    assert final.content[0].input == use.input and final.stop_reason == "tool_use"

    follow = client.messages.create(
        model=model,
        max_tokens=4,
        tools=[WEATHER],
        **FIXED,
        messages=[
            *kw["messages"],
            {"role": "assistant", "content": [use.model_dump(exclude_none=True)]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "-3 C"}],
            },
        ],
    )
    assert follow.stop_reason == "max_tokens" and follow.content[0].type == "text"
    # "any" forces some tool; "none" forbids them
    anyone = client.messages.create(
        **{**kw, "tool_choice": {"type": "any", "disable_parallel_tool_use": True}}
    )
    assert anyone.stop_reason == "tool_use"
    none = client.messages.create(**{**kw, "tool_choice": {"type": "none"}, "max_tokens": 8})
    assert all(b.type == "text" for b in none.content) and none.stop_reason != "tool_use"


@pytest.mark.parametrize("model", MODELS)
def test_count_tokens_matches_usage(client, model):
    kw = dict(
        model=model,
        system="You are terse.",
        tools=[WEATHER],
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
    )
    count = client.messages.count_tokens(**kw)
    m = client.messages.create(max_tokens=1, **kw, **FIXED)
    u = m.usage
    assert count.input_tokens == (
        u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens
    )
    plain = client.messages.count_tokens(model=model, messages=kw["messages"])
    assert plain.input_tokens < count.input_tokens


@pytest.mark.parametrize("model", [THINK_MLX_KEY, THINK_GGUF_KEY])
def test_thinking_blocks(client, model):
    kw = dict(model=model, max_tokens=8, messages=HELLO, **FIXED)
    with client.messages.stream(
        thinking={"type": "enabled", "budget_tokens": 1024}, **kw
    ) as stream:
        thinking = "".join(e.thinking for e in stream if e.type == "thinking")
        final = stream.get_final_message()
    (block,) = final.content
    assert block.type == "thinking" and block.thinking == thinking and thinking
    off = client.messages.create(thinking={"type": "disabled"}, **kw)
    assert [b.type for b in off.content] == ["text"]


def test_errors_in_anthropic_envelope(server, client):
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="nope/nope", max_tokens=4, messages=HELLO)
    assert e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(
            model=MLX_KEY,
            max_tokens=4,
            messages=HELLO,
            thinking={"type": "enabled", "budget_tokens": 1024},
        )
    assert e.value.body["error"]["message"].startswith("Invalid value for 'thinking'")
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(
            model=GGUF_KEY,
            max_tokens=4,
            messages=HELLO,
            output_config={
                "format": {"type": "json_schema", "schema": {"not": {"type": "string"}}}
            },
        )
    assert e.value.body["error"]["message"].startswith("Invalid value for 'output_config.format'")
    count = client.messages.count_tokens(
        model=GGUF_KEY, messages=[{"role": "user", "content": "hello " * 5000}]
    )
    assert count.input_tokens > 4096  # counting is not refused for size
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(
            model=MLX_KEY,
            max_tokens=4,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"},
                        }
                    ],
                }
            ],
        )
    # Either auth header is accepted (auth is off by default); anthropic-version is ignored.
    r = httpx.post(
        server.url + "/v1/messages",
        timeout=30,
        headers={"Authorization": "Bearer x", "anthropic-version": "2023-06-01"},
        json={"model": MLX_KEY, "max_tokens": 2, "messages": HELLO},
    )
    assert r.status_code == 200 and r.json()["type"] == "message"
