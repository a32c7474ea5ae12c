"""End to end, per model family (gpt-oss, Qwen3, Qwen3-Coder, Qwen3.5, GLM-4.6/4.7, DeepSeek
V3.1/R1): a forced call in the family's own syntax parses back on MLX and GGUF alike (streamed
and not), and the next turn with the tool's result renders through the family's template, on
OpenAI chat, Responses, Anthropic and LM Studio v1 (through an MCP tool), with the official
SDKs. The models are tiny random-weight ones with each family's real template and special
tokens (``family_models``): a call is forced, never chosen, and answers are noise, so the
checks are on structure, not on words.

Cost: one server (``family_server``, shared with tests/test_e2e_families_more.py) holding every
family model (MLX and GGUF), short replies; the MLX loads dominate.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import openai
import pytest

from tests.family_dialects import (
    ASK,
    PARAMS,
    TOOL,
    act_round,
    key,
    openai_round_trip,
    v1_mcp_round,
)

FAMILIES = [
    "gpt-oss",
    "qwen3",
    "qwen3-coder",
    "qwen3.5",
    "glm-4.6",
    "glm-4.7",
    "deepseek-v3.1",
    "deepseek-r1",
]
# Room for a forced call however oddly a random model splits it into tokens.
CALL_TOKENS = 100


@pytest.fixture(scope="module")
def fam_server(family_server, family_models):
    for family in FAMILIES:
        family_models(family)
    yield family_server
    family_server.unload_all()


@pytest.fixture(scope="module")
def oai(fam_server):
    return openai.OpenAI(base_url=fam_server.url + "/v1", api_key="x", max_retries=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_forced_call_round_trip_openai_both_formats(fam_server, oai, family):
    openai_round_trip(fam_server.url, oai, family, CALL_TOKENS, 4)


# The SDK parses the call, runs the tool, and the next turn renders.
@pytest.mark.parametrize("family", ["gpt-oss", "glm-4.7", "deepseek-v3.1", "qwen3", "qwen3-coder"])
def test_sdk_act(fam_server, forced_tool_calls, family):
    act_round(fam_server.url, key(family, "gguf"), ASK)


@pytest.mark.parametrize("family", FAMILIES)
def test_forced_call_round_trip_responses_anthropic_v1(fam_server, oai, mcp_url, family):
    model = key(family, "gguf")
    # Responses: function_call item, then function_call_output.
    first = oai.responses.create(
        model=model,
        input=ASK,
        tools=[{"type": "function", "strict": True, **TOOL}],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=CALL_TOKENS,
        temperature=0,
    )
    (item,) = [o for o in first.output if o.type == "function_call"]
    jsonschema.validate(json.loads(item.arguments), PARAMS)
    # The stored call is replayed from previous_response_id.
    second = oai.responses.create(
        model=model,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": item.call_id, "output": "Sunny"}],
        max_output_tokens=4,
        temperature=0,
    )
    assert second.status in ("completed", "incomplete")
    # Anthropic: tool_use, then tool_result.
    claude = anthropic.Anthropic(base_url=fam_server.url, api_key="x", max_retries=0)
    tools = [{"name": TOOL["name"], "description": TOOL["description"], "input_schema": PARAMS}]
    message = claude.messages.create(
        model=model,
        max_tokens=CALL_TOKENS,
        extra_body={"temperature": 0},
        tools=tools,
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        messages=[{"role": "user", "content": ASK}],
    )
    assert message.stop_reason == "tool_use"
    (use,) = [b for b in message.content if b.type == "tool_use"]
    jsonschema.validate(use.input, PARAMS)
    reply = claude.messages.create(
        model=model,
        max_tokens=4,
        extra_body={"temperature": 0},
        tools=tools,
        messages=[
            {"role": "user", "content": ASK},
            {"role": "assistant", "content": [use.model_dump()]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny"}],
            },
        ],
    )
    assert reply.stop_reason in ("end_turn", "max_tokens")
    v1_mcp_round(fam_server.url, model, mcp_url)


def test_reasoning_settings_and_capabilities(fam_server, oai):
    models = httpx.get(fam_server.url + "/api/v1/models", timeout=30).json()["models"]
    caps = {m["key"]: m["capabilities"] for m in models if "tiny-" in m["key"]}
    reasoning = {k: c.get("reasoning") for k, c in caps.items()}
    # DeepSeek V3.1's template renders no tools, but the model was trained on its call format.
    assert caps[key("deepseek-v3.1", "gguf")]["trained_for_tool_use"]
    assert reasoning[key("gpt-oss", "mlx")] == {
        "allowed_options": ["low", "medium", "high"],
        "default": "medium",
    }
    assert reasoning[key("gpt-oss", "gguf")] == reasoning[key("gpt-oss", "mlx")]
    assert reasoning[key("qwen3", "gguf")] == {"allowed_options": ["off", "on"], "default": "on"}
    assert reasoning[key("deepseek-v3.1", "gguf")]["default"] == "off"
    assert reasoning[key("qwen3-coder", "gguf")] is None
    ask = [{"role": "user", "content": ASK}]
    # gpt-oss reasons at a level and cannot stop; Qwen3-Coder does not reason.
    for model, effort in ((key("gpt-oss", "gguf"), "none"), (key("qwen3-coder", "gguf"), "high")):
        with pytest.raises(openai.BadRequestError) as err:
            oai.chat.completions.create(model=model, messages=ask, reasoning_effort=effort)
        assert err.value.body["param"] == "reasoning"
    level = oai.chat.completions.create(
        model=key("gpt-oss", "gguf"), messages=ask, reasoning_effort="high", max_tokens=2
    )
    assert level.choices[0].finish_reason == "length"
    # DeepSeek V3.1's switch opens <think> in the prompt: the reply is reasoning.
    for fmt in ("mlx", "gguf"):
        r = httpx.post(
            fam_server.url + "/v1/chat/completions",
            json={
                "model": key("deepseek-v3.1", fmt),
                "messages": ask,
                "max_tokens": 6,
                "temperature": 0,
                "reasoning_effort": "high",
            },
            timeout=120,
        ).json()
        message = r["choices"][0]["message"]
        assert message["reasoning_content"] and not message["content"]
        assert r["usage"]["completion_tokens_details"]["reasoning_tokens"] == 6


def test_bad_input_is_a_400_in_each_dialect(fam_server, oai):
    model = key("qwen3-coder", "gguf")
    pattern = {**PARAMS, "properties": {"city": {"type": "string", "pattern": "^[A-Z]"}}}
    with pytest.raises(openai.BadRequestError, match="'pattern'"):
        oai.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": ASK}],
            tools=[{"type": "function", "function": {**TOOL, "parameters": pattern}}],
            tool_choice="required",
        )
    stray = [
        {"role": "user", "content": ASK},
        {"role": "tool", "tool_call_id": "call_nobody", "content": "Sunny"},
    ]
    with pytest.raises(openai.BadRequestError, match="call_nobody"):
        oai.chat.completions.create(model=model, messages=stray)
    with pytest.raises(openai.BadRequestError, match="call_nobody"):
        oai.responses.create(
            model=model,
            input=[
                {"role": "user", "content": ASK},
                {"type": "function_call_output", "call_id": "call_nobody", "output": "x"},
            ],
        )
    claude = anthropic.Anthropic(base_url=fam_server.url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.BadRequestError, match="toolu_nobody"):
        claude.messages.create(
            model=model,
            max_tokens=4,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_nobody", "content": "x"}
                    ],
                }
            ],
        )
    # A template that raises: Qwen3.5's wants a user message.
    with pytest.raises(openai.BadRequestError, match="No user query found in messages"):
        oai.chat.completions.create(
            model=key("qwen3.5", "gguf"), messages=[{"role": "system", "content": "Be brief."}]
        )
