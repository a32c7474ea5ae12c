"""Llama 3.1/3.2/3.3: a call is JSON ``{"name": ..., "parameters": {...}}``, after
``<|python_tag|>`` or bare at the start of the reply; the turn ends at ``<|eom_id|>`` or
``<|eot_id|>``.

mlx-lm has no parser for this shape (its ``json_tools`` reads Hermes blocks), so the shared JSON
reader in ``calls.py`` reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlxserve.core.families.base import Family, Lit, json_call_grammar
from mlxserve.core.families.calls import BlockSyntax, json_calls


def _llama_calls(body: str) -> list[tuple[str, dict[str, Any]]]:
    # Llama 3.2 may write several calls separated by ";".
    parts = [p for p in body.strip().split(";") if p.strip()] if "};" in body else [body]
    calls = []
    for part in parts:
        calls += json_calls(part, "parameters")
    return calls


class Llama3(Family):
    name = "llama3"
    end_tokens = ("<|eom_id|>", "<|eot_id|>")
    markers = ("<|python_tag|>", "<|eom_id|>", "<|eot_id|>", "<|start_header_id|>")

    def matches(self, template: str, config: Mapping[str, Any]) -> bool:
        return "<|python_tag|>" in template or (
            "<|eot_id|>" in template and "parameters" in template and "tools" in template
        )

    def call_syntax(self, functions: list[dict[str, Any]]) -> BlockSyntax:
        return BlockSyntax("<|python_tag|>", None, _llama_calls, bare_json=True)

    def call_grammar(self, functions: list[dict[str, Any]], parallel: bool, lit: Lit) -> str:
        return json_call_grammar(
            functions, "parameters", lambda call: call, parallel, separator='"; "'
        )
