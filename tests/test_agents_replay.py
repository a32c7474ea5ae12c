"""Multi-turn transcripts in the shape Claude Code and Codex send them (every field they send,
short texts), replayed turn by turn through the official ``anthropic`` and ``openai`` SDKs
against a real server: thinking / reasoning items sealed and sent back, tool calls and their
results, a system message mid-conversation, unknown fields and hosted tools. Each stream is
well formed, and from the second turn on the prompt cache serves the earlier turns."""

from __future__ import annotations

import anthropic
import openai
import pytest

from tests.conftest import THINK_GGUF_KEY, THINK_MLX_KEY

SCHEMA = {
    "type": "object",
    "properties": {"command": {"type": "string", "maxLength": 12}},
    "required": ["command"],
    # Closed, so that a random model's forced call ends at its one key.
    "additionalProperties": False,
}
BETAS = "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27"
# The recorded max_tokens (32000) would run a random model to the end of its context; a
# forced call gets room for its JSON.
MAX_TOKENS, CALL_TOKENS = 12, 100


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key="local", max_retries=0)


@pytest.fixture(scope="module")
def codex(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="local", max_retries=0)


def claude_turn(client, model, messages, max_tokens=MAX_TOKENS, **extra):
    """One streamed Claude Code turn: its events and final message."""
    body = {
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332;"},
            {
                "type": "text",
                "text": "You are a Claude agent.",
                "cache_control": {"type": "ephemeral"},
            },
        ],
        "tools": [
            {"name": "Bash", "description": "Run a command", "input_schema": SCHEMA},
            {"name": "Monitor", "input_schema": SCHEMA, "defer_loading": True},
            {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
        ],
        "metadata": {"user_id": '{"session_id": "s"}'},
        "thinking": {"type": "adaptive", "display": "omitted"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
        **extra,
    }
    with client.messages.stream(
        model=model,
        max_tokens=max_tokens,
        messages=messages,
        extra_body={"temperature": 0, **body},
        extra_headers={"anthropic-beta": BETAS},
        extra_query={"beta": "true"},
    ) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert (
        events.count("content_block_start")
        == events.count("content_block_stop")
        == len(final.content)
    )
    return final


@pytest.mark.parametrize("model", [THINK_MLX_KEY, THINK_GGUF_KEY])
def test_claude_code_transcript(claude, model):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "<system-reminder>Be careful.</system-reminder>"},
                {"type": "text", "text": "List the files.", "cache_control": {"type": "ephemeral"}},
            ],
        },
        {"role": "system", "content": [{"type": "text", "text": "Agents: Explore."}]},
    ]
    first = claude_turn(claude, model, messages)
    thinking = first.content[0]
    assert thinking.type == "thinking" and thinking.thinking == ""  # display: omitted
    assert thinking.signature.startswith("mlxs1.")

    messages += [
        {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {"role": "user", "content": "Use Bash."},
    ]
    second = claude_turn(
        claude, model, messages, CALL_TOKENS, tool_choice={"type": "tool", "name": "Bash"}
    )
    assert second.stop_reason == "tool_use"
    (call,) = [b for b in second.content if b.type == "tool_use"]
    assert call.name == "Bash" and isinstance(call.input["command"], str)
    assert second.usage.cache_read_input_tokens > 0
    u1, u2 = first.usage, second.usage
    assert u2.input_tokens + u2.cache_read_input_tokens + u2.cache_creation_input_tokens > (
        u1.input_tokens + u1.cache_read_input_tokens + u1.cache_creation_input_tokens
    )

    messages += [
        {"role": "assistant", "content": [b.model_dump() for b in second.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "a.txt\nb.txt"}],
        },
        {"role": "system", "content": [{"type": "text", "text": "Reminder: be brief."}]},
    ]
    third = claude_turn(claude, model, messages, thinking={"type": "adaptive"})
    assert third.usage.cache_read_input_tokens >= second.usage.cache_read_input_tokens
    assert third.content[0].type == "thinking" and third.content[0].thinking  # shown this time


def codex_turn(client, model, items, max_tokens=MAX_TOKENS, **extra):
    """One streamed Codex turn: the final response, after checking the events."""
    body = {
        "tools": [
            {
                "type": "function",
                "name": "exec_command",
                "description": "Run",
                "strict": False,
                "parameters": SCHEMA,
            },
            {
                "type": "namespace",
                "name": "multi_agent_v1",
                "description": "Sub-agents",
                "tools": [
                    {
                        "type": "function",
                        "name": "spawn_agent",
                        "description": "Spawn",
                        "strict": False,
                        "parameters": SCHEMA,
                    }
                ],
            },
            {"type": "web_search", "external_web_access": False},
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "reasoning": {"summary": "auto"},
        "store": False,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "thread-1",
        **extra,
    }
    stream = client.responses.create(
        model=model,
        input=items,
        stream=True,
        max_output_tokens=max_tokens,
        temperature=0,
        extra_body={**body, "client_metadata": {"thread_id": "thread-1"}},
        extra_headers={"session-id": "thread-1", "originator": "codex_exec"},
    )
    events = list(stream)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type in (
        "response.completed",
        "response.incomplete",
    )
    return events[-1].response


@pytest.mark.parametrize("model", [THINK_MLX_KEY, THINK_GGUF_KEY])
def test_codex_transcript(codex, model):
    items = [
        {
            "type": "message",
            "role": "developer",
            "content": [{"type": "input_text", "text": "You are Codex."}],
        },
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "<environment_context/>"}],
        },
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
    ]
    first = codex_turn(codex, model, items)
    reasoning = first.output[0]
    assert reasoning.type == "reasoning" and reasoning.encrypted_content.startswith("mlxs1.")

    items += [o.model_dump(exclude_none=True) for o in first.output]
    items.append(
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "Spawn a helper."}],
        }
    )
    second = codex_turn(
        codex,
        model,
        items,
        CALL_TOKENS,
        tool_choice={"type": "function", "name": "spawn_agent", "namespace": "multi_agent_v1"},
    )
    (call,) = [o for o in second.output if o.type == "function_call"]
    assert (call.name, call.namespace) == ("spawn_agent", "multi_agent_v1")
    assert second.usage.input_tokens_details.cached_tokens > 0

    items += [o.model_dump(exclude_none=True) for o in second.output]
    items += [
        {"type": "function_call_output", "call_id": call.call_id, "output": "agent-7"},
        {
            "type": "message",
            "role": "developer",
            "content": [{"type": "input_text", "text": "Approval mode changed."}],
        },
    ]
    third = codex_turn(codex, model, items)
    assert third.usage.input_tokens_details.cached_tokens >= (
        second.usage.input_tokens_details.cached_tokens
    )
