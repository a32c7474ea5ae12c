"""DeepSeek V3.1 and the R1 distills:
``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{json}<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>``
(R1 writes ``function<｜tool▁sep｜>NAME\\n```json\\n{...}\\n```​`` inside a call); reasoning in
``<think>``, switched by the template's ``thinking`` (V3.1) or ``enable_thinking``; the R1
distills always think. V3.1's template does not render tools, so they are taught in the system
message in DeepSeek's published tool format.

DeepSeek V3.2 writes DSML instead: ``<｜DSML｜function_calls>`` blocks of
``<｜DSML｜invoke name="NAME">`` with ``<｜DSML｜parameter name="K" string="true|false">``.

mlx-lm has no parser for either, so these are our own (the layouts above are read by regular
expressions over the finished block).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, ClassVar

from mlxserve.core.families.base import Family, Lit, ReasoningOptions, check_setting
from mlxserve.core.families.calls import BlockSyntax, Call, UnreadableCall, arguments_object
from mlxserve.core.families.xmlargs import function_rules, is_string
from mlxserve.core.grammar import strict_json

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
EOS = "<｜end▁of▁sentence｜>"
_CALL = re.compile(re.escape(CALL_BEGIN) + r"(.*?)" + re.escape(CALL_END), re.DOTALL)
_FENCED = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


def _v3_calls(body: str) -> list[Call]:
    calls: list[Call] = []
    for inner in _CALL.findall(body):
        name, sep, args = inner.partition(SEP)
        if not sep:
            raise UnreadableCall("a call has no separator between its name and arguments")
        if name.strip() == "function" and "\n" in args:  # R1: function<sep>NAME\n```json...```
            name, _, args = args.partition("\n")
        fenced = _FENCED.match(args)
        if fenced:
            args = fenced.group(1)
        try:
            calls.append((name.strip(), arguments_object(json.loads(args))))
        except json.JSONDecodeError as exc:
            raise UnreadableCall(f"the arguments are not valid JSON ({exc.msg})") from exc
    if not calls and body.strip():
        raise UnreadableCall("the block holds no complete call")
    return calls


class DeepSeek(Family):
    name = "deepseek"
    think = ("<think>", "</think>")
    end_tokens = (EOS,)
    markers: ClassVar[tuple[str, ...]] = (
        CALLS_BEGIN,
        CALLS_END,
        CALL_BEGIN,
        CALL_END,
        SEP,
        EOS,
        "<｜Assistant｜>",
        "<｜User｜>",
        "<｜tool▁output▁begin｜>",
        "<｜tool▁output▁end｜>",
    )

    def matches(self, template: str, config: Mapping[str, Any]) -> bool:
        return CALLS_BEGIN in template

    def reasoning_options(self, template: str) -> ReasoningOptions | None:
        # V3.1 and V3.2 switch with ``thinking`` (llama.cpp's copies of the distills' templates
        # with ``enable_thinking``), and both default to not thinking; the original distill
        # templates open <think> themselves, always.
        if "thinking" in template.replace("<think>", ""):
            return ReasoningOptions(("off", "on"), "off")
        return ReasoningOptions(("on",), "on") if "<think>" in template else None

    def reasoning_kwargs(
        self, setting: str | None, template: str, *, constrained: bool
    ) -> dict[str, Any]:
        options = self.reasoning_options(template)
        if setting is not None:
            check_setting(setting, options)
        if options is None or len(options.allowed) < 2:
            return {}
        if constrained:
            on = False
        elif setting is None:
            return {}
        else:
            on = setting != "off"
        return {"thinking": on, "enable_thinking": on}

    def trained_for_tools(self, template: str) -> bool:
        return True

    def tool_prompt(self, functions: list[dict[str, Any]]) -> str:
        listing = "\n\n".join(
            f"### {f['name']}\nDescription: {f.get('description') or ''}\n\n"
            f"Parameters: {json.dumps(f.get('parameters') or {}, ensure_ascii=False)}"
            for f in functions
        )
        return (
            "## Tools\nYou have access to the following tools:\n\n"
            f"{listing}\n\n"
            "IMPORTANT: ALWAYS adhere to this exact format for tool use:\n"
            f"{CALLS_BEGIN}{CALL_BEGIN}tool_call_name{SEP}tool_call_arguments{CALL_END}"
            "{{additional_tool_calls}}"
            f"{CALLS_END}\n\n"
            "Where:\n- `tool_call_name` must be an exact match to one of the available tools\n"
            "- `tool_call_arguments` must be valid JSON that strictly follows the tool's "
            "Parameters Schema\n- For multiple tool calls, chain them directly without "
            "separators or spaces"
        )

    def call_syntax(self, functions: list[dict[str, Any]]) -> BlockSyntax:
        return BlockSyntax(CALLS_BEGIN, CALLS_END, _v3_calls)

    def call_grammar(self, functions: list[dict[str, Any]], parallel: bool, lit: Lit) -> str:
        # One call is a name and its JSON arguments: the shared JSON-call grammar's object is
        # not this shape, so the rules are written here.
        rules, names = [], []
        for i, function in enumerate(functions):
            params = function.get("parameters") or {"type": "object", "properties": {}}
            rules.append(
                f"f{i}: {lit(CALL_BEGIN)} {json.dumps(function['name'])} {lit(SEP)} "
                f"%json {json.dumps(strict_json(params))} {lit(CALL_END)}"
            )
            names.append(f"f{i}")
        calls = "call+" if parallel else "call"
        return (
            "\n".join(
                [
                    f"start: {lit(CALLS_BEGIN)} {calls} {lit(CALLS_END)}",
                    f"call: {' | '.join(names)}",
                    *rules,
                ]
            )
            + "\n"
        )


DSML = "｜DSML｜"
OPEN, CLOSE = f"<{DSML}function_calls>", f"</{DSML}function_calls>"
_INVOKE = re.compile(r'<｜DSML｜invoke name="([^"]*)">(.*?)</｜DSML｜invoke>', re.DOTALL)
_PARAM = re.compile(
    r'<｜DSML｜parameter name="([^"]*)" string="(true|false)">(.*?)</｜DSML｜parameter>', re.DOTALL
)


def _dsml_calls(body: str) -> list[Call]:
    calls: list[Call] = []
    for name, inner in _INVOKE.findall(body):
        args: dict[str, Any] = {}
        for key, is_str, value in _PARAM.findall(inner):
            if is_str == "true":
                args[key] = value
                continue
            try:
                args[key] = json.loads(value)
            except json.JSONDecodeError as exc:
                raise UnreadableCall(f"argument '{key}' is not valid JSON ({exc.msg})") from exc
        calls.append((name, args))
    if not calls:
        raise UnreadableCall("the block holds no complete invoke")
    return calls


class DeepSeekV32(DeepSeek):
    name = "deepseek_v32"
    markers = (
        f"<{DSML}function_calls>",
        f"</{DSML}function_calls>",
        EOS,
        "<｜Assistant｜>",
        "<｜User｜>",
    )

    def matches(self, template: str, config: Mapping[str, Any]) -> bool:
        return DSML in template

    def call_syntax(self, functions: list[dict[str, Any]]) -> BlockSyntax:
        return BlockSyntax(f"<{DSML}function_calls>", f"</{DSML}function_calls>", _dsml_calls)

    def call_grammar(self, functions: list[dict[str, Any]], parallel: bool, lit: Lit) -> str:
        def one(function: dict[str, Any], key: str, value: str) -> str:
            props = (function.get("parameters") or {}).get("properties") or {}
            flag = "true" if is_string(props.get(json.loads(key)) or {}) else "false"
            return f'"<{DSML}parameter name=\\"" {key} "\\" string=\\"{flag}\\">" {value}'

        def call(function: dict[str, Any], seq: str) -> str:
            opener = json.dumps(f'<{DSML}invoke name="{function["name"]}">\n')
            return f'{opener} {seq} "</{DSML}invoke>\\n"'

        rules, names = function_rules(functions, f"</{DSML}parameter>\n", lit, one, call)
        invokes = "invoke+" if parallel else "invoke"
        return (
            "\n".join(
                [
                    f'start: {lit(OPEN)} "\\n" {invokes} {lit(CLOSE)}',
                    f"invoke: {' | '.join(names)}",
                    *rules,
                ]
            )
            + "\n"
        )
