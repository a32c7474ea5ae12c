"""End to end for Mistral Small 3.2 / Devstral / Ministral reasoning, Gemma 4 and plain Gemma,
Llama 3.x, Kimi K2, MiniMax M2, Granite 4, SmolLM3, LFM2 and Phi-3.5: a forced call in each
family's own syntax parses back on MLX and GGUF alike (the same arguments at temperature 0), and
the next turn with the tool's result renders through the family's template; streamed fragments
join to the same call, and LM Studio v0 writes the same; Responses, Anthropic and LM Studio v1
(an MCP tool) carry the call round trip, and the lmstudio SDK's act() runs it; LM Studio's list
reports each family's reasoning options. Models: tiny random-weight ones with each family's real
template and special tokens (``family_models``); a call is forced, never chosen.

Cost: the server of tests/test_e2e_families.py (``family_server``: every model stays loaded),
replies of a few tokens.
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

# One family per call syntax, then the other families of each (template and tokens differ).
BOTH_FORMATS = ["mistral-small-3.2", "gemma4", "llama3.1", "kimi-k2", "minimax-m2", "lfm2"]
MORE = ["devstral", "ministral-reasoning", "gemma2", "granite-4.0", "smollm3", "phi-3.5"]
FAMILIES = BOTH_FORMATS + MORE
# One family per kind of syntax also goes through Responses, Anthropic and LM Studio v1.
OTHER_DIALECTS = BOTH_FORMATS
CALL_TOKENS = 60


@pytest.fixture(scope="module")
def srv(family_server, family_models):
    for family in FAMILIES:
        family_models(family)
    yield family_server
    family_server.unload_all()


@pytest.fixture(scope="module")
def oai(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_forced_call_round_trip(srv, oai, family):
    openai_round_trip(srv.url, oai, family, CALL_TOKENS, 3)


# The SDK parses the call, runs the tool, and the next turn renders. Kimi K2, MiniMax M2, LFM2
# and Gemma 4 need the SDK's forced call to be a single call (the SDK has no parallel switch).
@pytest.mark.parametrize("family", BOTH_FORMATS)
def test_sdk_act(srv, forced_tool_calls, family):
    act_round(srv.url, key(family, "gguf"), ASK)


@pytest.mark.parametrize("family", OTHER_DIALECTS)
def test_forced_call_responses_anthropic_v1(srv, oai, mcp_url, family):
    model = key(family, "gguf")
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
    call_id = item.call_id
    second = oai.responses.create(
        model=model,
        input=[
            {"role": "user", "content": ASK},
            {
                "type": "function_call",
                "call_id": call_id,
                "name": item.name,
                "arguments": item.arguments,
            },
            {"type": "function_call_output", "call_id": call_id, "output": "Sunny"},
        ],
        max_output_tokens=3,
        temperature=0,
    )
    assert second.status in ("completed", "incomplete")
    claude = anthropic.Anthropic(base_url=srv.url, api_key="x", max_retries=0)
    tools = [{"name": TOOL["name"], "description": TOOL["description"], "input_schema": PARAMS}]
    message = claude.messages.create(
        model=model,
        max_tokens=CALL_TOKENS,
        tools=tools,
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": ASK}],
    )
    assert message.stop_reason == "tool_use"
    (use,) = [b for b in message.content if b.type == "tool_use"]
    jsonschema.validate(use.input, PARAMS)
    use_id = use.id
    reply = claude.messages.create(
        model=model,
        max_tokens=3,
        tools=tools,
        messages=[
            {"role": "user", "content": ASK},
            {"role": "assistant", "content": [use.model_dump()]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": use_id, "content": "Sunny"}],
            },
        ],
    )
    assert reply.stop_reason in ("end_turn", "max_tokens")
    v1_mcp_round(srv.url, model, mcp_url)


@pytest.mark.parametrize("family", ["kimi-k2", "minimax-m2"])
def test_parallel_section_cut_off_keeps_its_complete_calls(srv, oai, family):
    """With parallel calls a random model calls until max_tokens: the section is cut off, and
    the calls it completed before the cut are calls on every route, not text."""
    budget = 48
    calls = {}
    for fmt in ("mlx", "gguf"):
        reply = oai.chat.completions.create(
            model=key(family, fmt),
            messages=[{"role": "user", "content": ASK}],
            tools=[{"type": "function", "function": TOOL}],
            tool_choice="required",
            max_tokens=budget,
            temperature=0,
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "length"
        assert choice.message.tool_calls, choice.message.content
        calls[fmt] = [json.loads(c.function.arguments) for c in choice.message.tool_calls]
        for arguments in calls[fmt]:
            jsonschema.validate(arguments, PARAMS)
    assert calls["mlx"] == calls["gguf"]
    model = key(family, "gguf")
    response = oai.responses.create(
        model=model,
        input=ASK,
        tools=[{"type": "function", "strict": True, **TOOL}],
        tool_choice="required",
        max_output_tokens=budget,
        temperature=0,
    )
    assert response.status == "incomplete"
    items = [o for o in response.output if o.type == "function_call"]
    assert [json.loads(i.arguments) for i in items] == calls["gguf"]
    claude = anthropic.Anthropic(base_url=srv.url, api_key="x", max_retries=0)
    message = claude.messages.create(
        model=model,
        max_tokens=budget,
        tools=[{"name": TOOL["name"], "description": TOOL["description"], "input_schema": PARAMS}],
        tool_choice={"type": "any"},
        messages=[{"role": "user", "content": ASK}],
        extra_body={"temperature": 0},
    )
    assert message.stop_reason == "max_tokens"
    assert [b.input for b in message.content if b.type == "tool_use"] == calls["gguf"]


def test_reasoning_options_and_switches(srv, oai):
    listed = httpx.get(srv.url + "/api/v1/models", timeout=30).json()["models"]
    caps = {m["key"]: m.get("capabilities", {}).get("reasoning") for m in listed}
    assert caps[key("ministral-reasoning", "gguf")] == {
        "allowed_options": ["off", "on"],
        "default": "on",
    }
    assert caps[key("gemma4", "mlx")] == {"allowed_options": ["off", "on"], "default": "off"}
    assert caps[key("minimax-m2", "gguf")] == {"allowed_options": ["on"], "default": "on"}
    assert caps[key("mistral-small-3.2", "gguf")] is None
    # A setting the model cannot honour is a 400 in the client's dialect.
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(
            model=key("minimax-m2", "gguf"),
            messages=[{"role": "user", "content": "hi"}],
            reasoning_effort="none",
            max_tokens=2,
        )
    for setting in ("none", "high"):
        r = oai.chat.completions.create(
            model=key("ministral-reasoning", "gguf"),
            messages=[{"role": "user", "content": "hi"}],
            reasoning_effort=setting,
            max_tokens=2,
            temperature=0,
        )
        assert r.choices[0].finish_reason in ("stop", "length")
