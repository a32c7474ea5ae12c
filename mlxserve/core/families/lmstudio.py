"""Models without tool training of their own: tools are taught by LM Studio's system prompt and
called as ``[TOOL_REQUEST]{"name": ..., "arguments": {...}}[END_TOOL_REQUEST]``. Also the
family of a model whose template matches no other family (reasoning in ``<think>`` if its
template has the tags)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from mlxserve.core.families.base import Family, Lit, json_call_grammar
from mlxserve.core.families.calls import BlockSyntax, json_calls


class LMStudio(Family):
    name = "lmstudio"
    think = ("<think>", "</think>")
    think_switch = "enable_thinking"
    markers = ("[TOOL_REQUEST]", "[END_TOOL_REQUEST]")

    def matches(self, template: str, config: Mapping[str, Any]) -> bool:
        return True

    def takes_tools(self, template: str) -> bool:
        return False

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
