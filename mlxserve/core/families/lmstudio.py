"""Models without tool training of their own: tools are taught by LM Studio's system prompt and
called as ``[TOOL_REQUEST]{"name": ..., "arguments": {...}}[END_TOOL_REQUEST]``. Also the
family of a model whose template matches no other family (reasoning in ``<think>`` if its
template has the tags)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from typing import Any, ClassVar

from mlxserve.core.families.base import Family, Lit, json_call_grammar
from mlxserve.core.families.calls import BlockSyntax, json_calls


class LMStudio(Family):
    name = "lmstudio"
    think = ("<think>", "</think>")
    think_switch = "enable_thinking"
    markers: ClassVar[tuple[str, ...]] = ("[TOOL_REQUEST]", "[END_TOOL_REQUEST]")

    def matches(self, template: str, config: Mapping[str, Any]) -> bool:
        return True

    def takes_tools(self, template: str) -> bool:
        return False

    def prepare_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A template without tools has no place for calls or results either (Gemma's raises
        on a ``tool`` role, Phi's drops it): calls become the assistant's text in the syntax
        the tool prompt taught, results a user turn."""
        out: list[dict[str, Any]] = []
        for message in messages:
            role = message.get("role")
            if role == "assistant" and message.get("tool_calls"):
                content = message.get("content")
                text = content if isinstance(content, str) else ""
                for call in message["tool_calls"]:
                    fn = call.get("function", call) if isinstance(call, dict) else {}
                    args = fn.get("arguments", {})
                    if isinstance(args, str):
                        with contextlib.suppress(json.JSONDecodeError):
                            args = json.loads(args)
                    body = json.dumps(
                        {"name": fn.get("name"), "arguments": args}, ensure_ascii=False
                    )
                    text += f"[TOOL_REQUEST]{body}[END_TOOL_REQUEST]"
                message = {"role": "assistant", "content": text}
            elif role == "tool":
                content = message.get("content")
                if not isinstance(content, str):
                    content = json.dumps(content, ensure_ascii=False)
                message = {"role": "user", "content": f"Tool result:\n{content}"}
            previous = out[-1] if out else None
            if (
                previous is not None
                and previous.get("role") == message.get("role") == "user"
                and isinstance(previous.get("content"), str)
                and isinstance(message.get("content"), str)
            ):
                out[-1] = {**previous, "content": f"{previous['content']}\n\n{message['content']}"}
                continue
            out.append(message)
        return out

    def tool_prompt(self, functions: list[dict[str, Any]]) -> str:
        listing = "\n".join(json.dumps(f, ensure_ascii=False) for f in functions)
        return (
            "You can call these tools (JSON Schema function definitions):\n"
            f"{listing}\n\n"
            "To call a tool, answer with exactly this and nothing else:\n"
            '[TOOL_REQUEST]{"name": "<tool name>", "arguments": {<arguments as JSON>}}'
            "[END_TOOL_REQUEST]\n"
            "Call a tool only when it helps to answer; otherwise answer normally."
        )

    def call_syntax(self, functions: list[dict[str, Any]]) -> BlockSyntax:
        return BlockSyntax(
            "[TOOL_REQUEST]", "[END_TOOL_REQUEST]", json_calls, json_args_key="arguments"
        )

    def call_grammar(self, functions: list[dict[str, Any]], parallel: bool, lit: Lit) -> str:
        return json_call_grammar(
            functions,
            "arguments",
            lambda call: f"{lit('[TOOL_REQUEST]')} {call} {lit('[END_TOOL_REQUEST]')}",
            parallel,
        )
