"""Mistral: calls after ``[TOOL_CALLS]``, as a JSON array ``[{"name": ..., "arguments": {...}}]``
(the older models' form), running to the end of the reply."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlxserve.core.families.base import Family, Lit, json_call_grammar
from mlxserve.core.families.calls import BlockSyntax, json_calls


class Mistral(Family):
    name = "mistral"
    markers = ("[TOOL_CALLS]",)

    def matches(self, template: str, config: Mapping[str, Any]) -> bool:
        return "[TOOL_CALLS]" in template

    def call_syntax(self, functions: list[dict[str, Any]]) -> BlockSyntax:
        return BlockSyntax("[TOOL_CALLS]", None, json_calls)

    def call_grammar(self, functions: list[dict[str, Any]], parallel: bool, lit: Lit) -> str:
        grammar = json_call_grammar(
            functions, "arguments", lambda call: call, parallel, separator='", "'
        )
        return grammar.replace("start: ", f'start: {lit("[TOOL_CALLS]")} "[" ', 1).replace(
            "\nblock:", ' "]"\nblock:', 1
        )
