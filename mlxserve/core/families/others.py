"""Kimi K2, MiniMax M2 and LFM2: each one's own call markers, read by mlx-lm's parser for it.

- Kimi K2: ``<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX
  <|tool_call_argument_begin|>{json}<|tool_call_end|>...<|tool_calls_section_end|>``; the turn
  ends at ``<|im_end|>``.
- MiniMax M2: ``<minimax:tool_call>\\n<invoke name="NAME">\\n<parameter name="K">VALUE
  </parameter>\\n</invoke>\\n</minimax:tool_call>``, values typed by the tool's schema (a string
  raw, anything else JSON); it always thinks, in a ``<think>`` block its template opens.
- LFM2: pythonic calls, ``<|tool_call_start|>[NAME(k=VALUE, ...)]<|tool_call_end|>``.

The forcing grammars are ours, in each family's syntax (mlx-lm only reads these formats).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from typing import Any

from mlxserve.core.families.base import Family, Lit
from mlxserve.core.families.calls import BlockSyntax, Call, UnreadableCall, arguments_object
from mlxserve.core.families.xmlargs import function_rules
from mlxserve.core.grammar import strict_json


def _calls(parsed: Any) -> list[Call]:
    items = parsed if isinstance(parsed, list) else [parsed]
    return [(str(item["name"]), arguments_object(item["arguments"])) for item in items]


def _mlx_lm_syntax(
    begin: str,
    end: str,
    parser: str,
    tools: list[dict[str, Any]] | None,
    errors: tuple[type[Exception], ...] = (ValueError,),
    call_end: str | None = None,
) -> BlockSyntax:
    """Blocks read by ``mlx_lm.tool_parsers.<parser>`` (given ``tools`` unless None), imported
    at the first call read."""

    def parse(body: str) -> list[Call]:
        module = importlib.import_module(f"mlx_lm.tool_parsers.{parser}")
        args = (body,) if tools is None else (body, tools)
        try:
            return _calls(module.parse_tool_call(*args))
        except errors as exc:
            raise UnreadableCall(f"the call cannot be read ({exc})") from exc

    return BlockSyntax(begin, end, parse, call_end=call_end)


def _json_args(function: dict[str, Any]) -> str:
    schema = function.get("parameters") or {"type": "object", "properties": {}}
    return "%json " + json.dumps(strict_json(schema))


SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
KIMI_CALL, KIMI_ARGS, KIMI_END = (
    "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>",
    "<|tool_call_end|>",
)


class KimiK2(Family):
    name = "kimi_k2"
    think = ("<think>", "</think>")
    end_tokens = ("<|im_end|>",)
    markers = (
        SECTION_BEGIN,
        SECTION_END,
        KIMI_CALL,
        KIMI_ARGS,
        KIMI_END,
        "<|im_end|>",
        "<|im_assistant|>",
        "<|im_middle|>",
        "<|im_user|>",
        "<|im_system|>",
    )

    def matches(self, template: str, config: Mapping[str, Any]) -> bool:
        return SECTION_BEGIN in template

    def call_syntax(self, functions: list[dict[str, Any]]) -> BlockSyntax:
        tools = [{"type": "function", "function": f} for f in functions]
        return _mlx_lm_syntax(SECTION_BEGIN, SECTION_END, "kimi_k2", tools, call_end=KIMI_END)

    def call_grammar(self, functions: list[dict[str, Any]], parallel: bool, lit: Lit) -> str:
        calls = [
            f"c{i}: {lit(KIMI_CALL)} {json.dumps('functions.' + f['name'] + ':')} IDX "
            f"{lit(KIMI_ARGS)} {_json_args(f)} {lit(KIMI_END)}"
            for i, f in enumerate(functions)
        ]
        names = " | ".join(f"c{i}" for i in range(len(functions)))
        body = "call+" if parallel else "call"
        return (
            "\n".join(
                [
                    f"start: {lit(SECTION_BEGIN)} {body} {lit(SECTION_END)}",
                    f"call: {names}",
                    *calls,
                    "IDX: /[0-9]{1,3}/",
                ]
            )
            + "\n"
        )


MINIMAX_OPEN, MINIMAX_CLOSE = "<minimax:tool_call>", "</minimax:tool_call>"


class MiniMaxM2(Family):
    name = "minimax_m2"
    think = ("<think>", "</think>")
    markers = (MINIMAX_OPEN, MINIMAX_CLOSE, "]~b]", "]~!b[", "[e~[", "</think>")

    def matches(self, template: str, config: Mapping[str, Any]) -> bool:
        return MINIMAX_OPEN in template

    def call_syntax(self, functions: list[dict[str, Any]]) -> BlockSyntax:
        tools = [{"type": "function", "function": f} for f in functions]
        return _mlx_lm_syntax(
            MINIMAX_OPEN, MINIMAX_CLOSE, "minimax_m2", tools, call_end="</invoke>"
        )

    def call_grammar(self, functions: list[dict[str, Any]], parallel: bool, lit: Lit) -> str:
        # The template opens a thinking block the model cannot skip: a forced reply closes it
        # at once ("</think>" is a marker, so it never reaches content).
        def call(function: dict[str, Any], seq: str) -> str:
            opener = json.dumps(f'<invoke name="{function["name"]}">\n')
            return f'{opener} {seq} "</invoke>\\n"'

        rules, names = function_rules(
            functions,
            "</parameter>\n",
            lit,
            lambda function, key, value: f'"<parameter name=\\"" {key} "\\">" {value}',
            call,
        )
        invokes = f"({' | '.join(names)})" + ("+" if parallel else "")
        start = f'start: {lit("</think>")} {lit(MINIMAX_OPEN)} "\\n" {invokes} {lit(MINIMAX_CLOSE)}'
        return "\n".join([start, *rules]) + "\n"


LFM_OPEN, LFM_CLOSE = "<|tool_call_start|>", "<|tool_call_end|>"


class LFM2(Family):
    name = "lfm2"
    think = ("<think>", "</think>")
    end_tokens = ("<|im_end|>",)
    markers = (LFM_OPEN, LFM_CLOSE, "<|im_end|>", "<|im_start|>")

    def matches(self, template: str, config: Mapping[str, Any]) -> bool:
        return "<|tool_list_start|>" in template or LFM_OPEN in template

    def call_syntax(self, functions: list[dict[str, Any]]) -> BlockSyntax:
        return _mlx_lm_syntax(LFM_OPEN, LFM_CLOSE, "pythonic", None, (ValueError, SyntaxError))

    def call_grammar(self, functions: list[dict[str, Any]], parallel: bool, lit: Lit) -> str:
        # Python keyword arguments with JSON values: mlx-lm's parser reads true/false/null too.
        rules, names = [], []
        for i, function in enumerate(functions):
            params = function.get("parameters") or {}
            props: dict[str, Any] = params.get("properties") or {}
            required = set(params.get("required") or ())
            parts = []
            for j, (key, schema) in enumerate(props.items()):
                value = "%json " + json.dumps(
                    strict_json(schema if isinstance(schema, dict) else {})
                )
                rules.append(f"a{i}_{j}: {json.dumps(key + '=')} {value}")
                parts.append((f"a{i}_{j}", key in required))
            seq = comma_sequence(f"s{i}", parts, rules)
            rules.append(f'f{i}: {json.dumps(function["name"] + "(")} {seq} ")"')
            names.append(f"f{i}")
        calls = f"({' | '.join(names)})"
        body = f'{calls} (", " {calls})*' if parallel else calls
        return "\n".join([f'start: {lit(LFM_OPEN)} "[" {body} "]" {lit(LFM_CLOSE)}', *rules]) + "\n"


def comma_sequence(
    name: str, parts: list[tuple[str, bool]], rules: list[str], separator: str = '", "'
) -> str:
    """A comma-separated sequence of ``parts`` in order, required ones always and optional ones
    maybe; returns its expression and appends the rules it needs."""

    def first_present(i: int) -> tuple[list[str], bool]:
        out = []
        for j in range(i, len(parts)):
            out.append(f"{name}_{j}")
            if parts[j][1]:
                return out, False
        return out, True

    for j, (part, _) in enumerate(parts):
        after, may_end = first_present(j + 1)
        if not after:
            rules.append(f"{name}_{j}: {part}")
            continue
        tail = f"{separator} (" + " | ".join(after) + ")"
        rules.append(f"{name}_{j}: {part} ({tail})" + ("?" if may_end else ""))
    first, may_be_empty = first_present(0)
    if not first:
        return '""'
    return "(" + " | ".join(first + (['""'] if may_be_empty else [])) + ")"
