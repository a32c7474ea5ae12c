"""What Claude Code and Codex send, read as they mean it: sealed reasoning, system messages
placed per template, adaptive thinking, deferred and server tools, namespace tools."""

from __future__ import annotations

from mlxserve.core.families.base import ReasoningOptions
from mlxserve.core.generate import _wished
from mlxserve.core.sealed import ReasoningSeal
from mlxserve.core.system_messages import arrange_system, renders_system_in_place
from mlxserve.core.templates import ChatTemplate
from mlxserve.protocols.anthropic import MessagesRequest
from mlxserve.protocols.responses import ResponsesRequest

SEAL = ReasoningSeal(b"k" * 32)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Only messages[0] may be the system prompt; later ones are silently dropped.
FIRST_ONLY = (
    "{% if messages[0].role == 'system' %}[SYS]{{ messages[0].content }}[/SYS]{% endif %}"
    "{% for m in messages if m.role != 'system' %}[{{ m.role }}]{{ m.content }}{% endfor %}"
)
# Refuses any system message but the first.
STRICT = (
    "{% for m in messages %}{% if m.role == 'system' and not loop.first %}"
    "{{ raise_exception('system only first') }}{% endif %}[{{ m.role }}]{{ m.content }}"
    "{% endfor %}"
)
SCHEMA = {"type": "object", "properties": {"command": {"type": "string"}}}


def test_seal_round_trip_and_refusals(tmp_path):
    sealed = SEAL.seal("I should list the files first. é")
    assert sealed.startswith("mlxs1.") and "list the files" not in sealed
    assert SEAL.open(sealed) == "I should list the files first. é"
    assert ReasoningSeal(b"o" * 32).open(sealed) is None  # another server's key
    body, tag = sealed.split(".")[1:]
    assert SEAL.open(f"mlxs1.{body}x.{tag}") is None  # tampered
    assert SEAL.open("EqQBCkgIARABGAIiQ...") is None  # a real Claude signature
    assert SEAL.open("mlxs1.ü.ü") is None and SEAL.open(None) is None
    first = ReasoningSeal.from_home(tmp_path)
    assert ReasoningSeal.from_home(tmp_path).open(first.seal("x")) == "x"  # survives restarts
    assert (tmp_path / "reasoning.key").stat().st_mode & 0o777 == 0o600


def test_system_messages_in_place_or_merged():
    messages = [
        {"role": "system", "content": "You are Codex."},
        {"role": "system", "content": "Skills: none."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "system", "content": "Reminder: be brief."},
        {"role": "user", "content": "bye"},
    ]
    chatml = ChatTemplate(CHATML)
    assert renders_system_in_place(chatml)
    assert arrange_system(chatml, messages) == [
        {"role": "system", "content": "You are Codex.\n\nSkills: none."},
        *messages[2:],
    ]
    for source in (FIRST_ONLY, STRICT):
        template = ChatTemplate(source)
        assert not renders_system_in_place(template)
        arranged = arrange_system(template, messages)
        assert arranged[0] == {
            "role": "system",
            "content": "You are Codex.\n\nSkills: none.\n\nReminder: be brief.",
        }
        assert [m["role"] for m in arranged] == ["system", "user", "assistant", "user"]
        assert "Reminder" in template.render(arranged)
    only_later = [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]
    assert arrange_system(ChatTemplate(FIRST_ONLY), only_later) == [
        {"role": "system", "content": "late"},
        {"role": "user", "content": "hi"},
    ]
    plain = [{"role": "user", "content": "hi"}]
    assert arrange_system(chatml, plain) is plain


def claude_request(**extra):
    """The shape of Claude Code 2.1's requests, with short texts."""
    return {
        "model": "m",
        "max_tokens": 32000,
        "stream": True,
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332;"},
            {
                "type": "text",
                "text": "You are a Claude agent.",
                "cache_control": {"type": "ephemeral"},
            },
        ],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "<system-reminder>hi</system-reminder>"},
                    {"type": "text", "text": "say hi", "cache_control": {"type": "ephemeral"}},
                ],
            },
            {"role": "system", "content": [{"type": "text", "text": "Agents: Explore."}]},
        ],
        "tools": [
            {"name": "Bash", "description": "Run", "input_schema": SCHEMA},
            {
                "name": "Monitor",
                "description": "Watch",
                "input_schema": SCHEMA,
                "defer_loading": True,
            },
            {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
        ],
        "metadata": {"user_id": '{"session_id": "s"}'},
        "thinking": {"type": "adaptive", "display": "omitted"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
        **extra,
    }


def test_claude_code_request_to_core():
    core = MessagesRequest.model_validate(claude_request()).to_core(0.8, SEAL)
    assert [m["role"] for m in core.messages] == ["system", "user", "system"]
    assert core.messages[2]["content"] == "Agents: Explore."
    assert [t["name"] for t in core.tools] == ["Bash"]  # deferred and server tools left out
    forced = claude_request(tool_choice={"type": "tool", "name": "Monitor"})
    core = MessagesRequest.model_validate(forced).to_core(0.8, SEAL)
    assert [t["name"] for t in core.tools] == ["Bash", "Monitor"]
    assert core.reasoning == "high" and core.reasoning_optional
    assert core.max_tokens == 32000


def test_claude_code_replay_restores_sealed_thinking_and_deferred_tools():
    history = [
        {"role": "user", "content": "watch the build"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "", "signature": SEAL.seal("Use ToolSearch.")},
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "ToolSearch",
                    "input": {"query": "x"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": [{"type": "tool_reference", "tool_name": "Monitor"}],
                }
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "plain text", "signature": "EqQBforeign"},
                {"type": "text", "text": "ok"},
            ],
        },
        {"role": "user", "content": "go"},
    ]
    body = claude_request(
        messages=history,
        tools=[*claude_request()["tools"], {"name": "ToolSearch", "input_schema": SCHEMA}],
    )
    core = MessagesRequest.model_validate(body).to_core(0.8, SEAL)
    assistant = [m for m in core.messages if m["role"] == "assistant"]
    assert assistant[0]["reasoning_content"] == "Use ToolSearch."
    assert assistant[1]["reasoning_content"] == "plain text"
    assert core.messages[3] == {
        "role": "tool",
        "tool_call_id": "toolu_1",
        "content": "Tool Monitor is now available.",
    }
    assert {t["name"] for t in core.tools} == {"Bash", "Monitor", "ToolSearch"}


def test_thinking_settings():
    def core(**kw):
        body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}
        return MessagesRequest.model_validate({**body, **kw}).to_core(0.8)

    assert (core().reasoning, core().reasoning_optional) == (None, True)
    adaptive = core(thinking={"type": "adaptive"})
    assert (adaptive.reasoning, adaptive.reasoning_optional) == ("on", True)
    assert core(thinking={"type": "enabled", "budget_tokens": 1024}).reasoning == "low"
    assert core(thinking={"type": "enabled", "budget_tokens": 10000}).reasoning == "medium"
    enabled = core(thinking={"type": "enabled", "budget_tokens": 32000})
    assert (enabled.reasoning, enabled.reasoning_optional) == ("high", False)
    assert core(output_config={"effort": "max"}).reasoning == "high"
    assert core(thinking={"type": "disabled"}, output_config={"effort": "low"}).reasoning == "off"


def test_a_wish_for_reasoning_takes_what_the_model_has():
    assert _wished("high", None, "m") is None
    assert _wished("on", ReasoningOptions(("low", "medium", "high"), "medium"), "m") == "medium"
    assert _wished("high", ReasoningOptions(("off", "on"), "on"), "m") == "high"


def codex_request(**extra):
    """The shape of Codex 0.171's requests, with short texts."""
    return {
        "model": "m",
        "stream": True,
        "input": [
            {
                "type": "message",
                "id": "msg_1",
                "role": "developer",
                "content": [{"type": "input_text", "text": "You are Codex."}],
            },
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        ],
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
                "description": "Agents",
                "tools": [
                    {
                        "type": "function",
                        "name": "spawn_agent",
                        "description": "Spawn",
                        "strict": False,
                        "parameters": SCHEMA,
                    },
                    {"type": "custom", "name": "apply_patch", "format": {"type": "text"}},
                ],
            },
            {"type": "web_search", "external_web_access": False},
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "reasoning": {"summary": "auto"},
        "store": False,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "01a2",
        "client_metadata": {"thread_id": "01a2"},
        **extra,
    }


def test_codex_request_to_core():
    body = ResponsesRequest.model_validate(codex_request())
    core = body.to_core(0.8, [], SEAL)
    assert [t["name"] for t in core.tools] == ["exec_command", "multi_agent_v1__spawn_agent"]
    assert body.dropped_tools() == ["web_search", "custom"]
    assert body.namespaced() == {"multi_agent_v1__spawn_agent": ("multi_agent_v1", "spawn_agent")}
    assert body.wants_encrypted_reasoning()
    assert core.messages[0] == {"role": "system", "content": "You are Codex."}
    forced = ResponsesRequest.model_validate(
        codex_request(
            tool_choice={"type": "function", "name": "spawn_agent", "namespace": "multi_agent_v1"}
        )
    )
    assert forced.to_core(0.8, []).tool_choice == {"name": "multi_agent_v1__spawn_agent"}


def test_codex_replay_restores_reasoning_and_namespaced_calls():
    replay = [
        *codex_request()["input"],
        {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [],
            "content": None,
            "encrypted_content": SEAL.seal("Spawn a helper."),
        },
        {
            "type": "function_call",
            "id": "fc_1",
            "call_id": "call_1",
            "name": "spawn_agent",
            "namespace": "multi_agent_v1",
            "arguments": '{"command": "ls"}',
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "agent-7"},
        {
            "type": "message",
            "role": "developer",
            "content": [{"type": "input_text", "text": "Approval mode changed."}],
        },
    ]
    core = ResponsesRequest.model_validate(codex_request(input=replay)).to_core(0.8, [], SEAL)
    assistant = core.messages[2]
    assert assistant["reasoning_content"] == "Spawn a helper."
    assert assistant["tool_calls"][0]["function"] == {
        "name": "multi_agent_v1__spawn_agent",
        "arguments": {"command": "ls"},
    }
    assert core.messages[-1] == {"role": "system", "content": "Approval mode changed."}
