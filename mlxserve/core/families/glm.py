"""GLM-4.5/4.6/4.7: ``<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>``
(4.5/4.6 put each tag on its own line), a string value raw and anything else JSON; reasoning in
``<think>`` switched by ``enable_thinking``.

Blocks are read by mlx-lm's ``glm47`` parser (ported from vLLM's GLM-4 MoE parser), which reads
both layouts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from mlxserve.core.families.base import Family, Lit
from mlxserve.core.families.calls import BlockSyntax, Call, UnreadableCall
from mlxserve.core.families.xmlargs import function_rules


class GLM(Family):
    name = "glm"
    think = ("<think>", "</think>")
    think_switch = "enable_thinking"
    end_tokens = ("<|user|>", "<|observation|>")
    markers = (
        "<tool_call>",
        "</tool_call>",
        "<arg_key>",
        "</arg_key>",
        "<arg_value>",
        "</arg_value>",
        "<|user|>",
        "<|observation|>",
        "<|assistant|>",
    )
    # Between a call's name and its arguments, and between arguments ("" on GLM-4.7).
    sep = "\n"

    def matches(self, template: str, config: Mapping[str, Any]) -> bool:
        return "<arg_key>" in template and "</arg_key>\n<arg_value>" in template

    def call_syntax(self, functions: list[dict[str, Any]]) -> BlockSyntax:
        tools = [{"type": "function", "function": f} for f in functions]

        def parse(body: str) -> list[Call]:
            from mlx_lm.tool_parsers import glm47

            if "<arg_key>" not in body and not body.strip().split("\n")[0].strip():
                raise UnreadableCall("the call has no function name")
            call = glm47.parse_tool_call(body.strip(), tools)
            if "raw" in call["arguments"] and call["name"] not in {f["name"] for f in functions}:
                raise UnreadableCall("the call cannot be read")
            return [(call["name"], call["arguments"])]

        return BlockSyntax("<tool_call>", "</tool_call>", parse)

    def call_grammar(self, functions: list[dict[str, Any]], parallel: bool, lit: Lit) -> str:
        sep = json.dumps(self.sep)
        key_open, key_close, value_open = lit("<arg_key>"), lit("</arg_key>"), lit("<arg_value>")
        rules, names = function_rules(
            functions,
            "</arg_value>",
            lit,
            lambda function, key, value: (
                f"{sep} {key_open} {key} {key_close} {sep} {value_open} {value}"
            ),
            lambda function, seq: f"{json.dumps(function['name'])} {seq} {sep}",
        )
        block = f"{lit('<tool_call>')} ({' | '.join(names)}) {lit('</tool_call>')}"
        body = 'block ("\\n" block)*' if parallel else "block"
        return "\n".join([f"start: {body}", f"block: {block}", *rules]) + "\n"


class GLM47(GLM):
    name = "glm47"
    sep = ""

    def matches(self, template: str, config: Mapping[str, Any]) -> bool:
        return "<arg_key>" in template
