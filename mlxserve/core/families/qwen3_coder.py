"""Qwen3-Coder and Qwen3.5/3.6: XML calls,
``<tool_call>\\n<function=NAME>\\n<parameter=K>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>``,
each value typed by the tool's JSON schema (a string raw, anything else JSON); Qwen3.5 reasons
in ``<think>`` switched by ``enable_thinking``.

Blocks are read by mlx-lm's ``qwen3_coder`` parser (the one Qwen published, kept by mlx-lm), so
MLX and GGUF replies are read alike.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from mlxserve.core.families.base import Family, Lit
from mlxserve.core.families.calls import BlockSyntax, Call, UnreadableCall
from mlxserve.core.families.xmlargs import function_rules


class Qwen3Coder(Family):
    name = "qwen3_coder"
    think = ("<think>", "</think>")
    think_switch = "enable_thinking"
    markers = ("<tool_call>", "</tool_call>", "<|im_end|>", "<|im_start|>")

    def matches(self, template: str, config: Mapping[str, Any]) -> bool:
        return "<function=" in template and "<parameter=" in template

    def call_syntax(self, functions: list[dict[str, Any]]) -> BlockSyntax:
        tools = [{"type": "function", "function": f} for f in functions]

        def parse(body: str) -> list[Call]:
            from mlx_lm.tool_parsers import qwen3_coder

            try:
                call = qwen3_coder.parse_tool_call(body.strip(), tools)
            except (ValueError, SyntaxError) as exc:
                raise UnreadableCall(f"the call cannot be read ({exc})") from exc
            return [(call["name"], call["arguments"])]

        return BlockSyntax("<tool_call>", "</tool_call>", parse)

    def call_grammar(self, functions: list[dict[str, Any]], parallel: bool, lit: Lit) -> str:
        def call(function: dict[str, Any], seq: str) -> str:
            opener = json.dumps(f"<function={function['name']}>\n")
            return f'{opener} {seq} "</function>"'

        rules, names = function_rules(
            functions,
            "\n</parameter>\n",
            lit,
            lambda function, key, value: f'"<parameter=" {key} ">\\n" {value}',
            call,
        )
        block = f'{lit("<tool_call>")} "\\n" ({" | ".join(names)}) "\\n" {lit("</tool_call>")}'
        body = 'block ("\\n" block)*' if parallel else "block"
        return "\n".join([f"start: {body}", f"block: {block}", *rules]) + "\n"
