"""Hermes-style calls, as Qwen2.5, Qwen3, QwQ and Hermes models write them:
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, reasoning in ``<think>``
switched by the template's ``enable_thinking``.

The JSON body is read by our own streaming reader (``calls.py``) rather than mlx-lm's
``json_tools`` (a bare ``json.loads`` of a finished block) so arguments stream as generated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlxserve.core.families.base import Family, Lit, json_call_grammar
from mlxserve.core.families.calls import BlockSyntax, json_calls


class Hermes(Family):
    name = "hermes"
    think = ("<think>", "</think>")
    think_switch = "enable_thinking"
    markers = ("<tool_call>", "</tool_call>", "<|im_end|>", "<|im_start|>")

    def matches(self, template: str, config: Mapping[str, Any]) -> bool:
        return "<tool_call>" in template

    def call_syntax(self, functions: list[dict[str, Any]]) -> BlockSyntax:
        return BlockSyntax("<tool_call>", "</tool_call>", json_calls, json_args_key="arguments")

    def call_grammar(self, functions: list[dict[str, Any]], parallel: bool, lit: Lit) -> str:
        return json_call_grammar(
            functions,
            "arguments",
            lambda call: f'{lit("<tool_call>")} "\\n" {call} "\\n" {lit("</tool_call>")}',
            parallel,
        )
