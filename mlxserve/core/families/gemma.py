"""Gemma 4: calls as ``<|tool_call>call:NAME{key:VALUE,...}<tool_call|>``, keys bare and strings
between ``<|"|>`` markers (numbers, booleans, lists and nested objects as written in JSON but with
the same bare keys and string markers); reasoning in ``<|channel>thought ... <channel|>``,
switched by the template's ``enable_thinking`` (off by default: the generation prompt then holds
an empty thought). A tool result ends the turn with ``<|tool_response>``.

Blocks are read by mlx-lm's ``gemma4`` parser. The forcing grammar is ours: no library writes
this syntax from a JSON schema.

Gemma 2/3 (``<start_of_turn>`` templates) take no tools: they are served by the LM Studio
fallback family; :class:`GemmaPlain` only folds a system message into the first user turn,
which Gemma 2's template refuses to render on its own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

from mlxserve.core.families.base import (
    Family,
    Lit,
    OutputEvent,
    OutputParser,
    ReasoningOptions,
    StandardParser,
)
from mlxserve.core.families.calls import BlockSyntax, Call, UnreadableCall, arguments_object
from mlxserve.core.families.lmstudio import LMStudio
from mlxserve.core.families.others import comma_sequence
from mlxserve.core.types import ReasoningDelta
from mlxserve.errors import InvalidRequest

CALL_OPEN, CALL_CLOSE, QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'
_SCHEMA_NOTES = {"description", "title", "default", "examples", "$schema"}
_KNOWN = {
    "string": {"type", "enum", "const"},
    "integer": {"type", "enum", "const"},
    "number": {"type"},
    "boolean": {"type"},
    "array": {"type", "items"},
    "object": {"type", "properties", "required", "additionalProperties"},
}


def gemma_calls(body: str) -> list[Call]:
    from mlx_lm.tool_parsers import gemma4

    try:
        parsed = gemma4.parse_tool_call(body)
    except (ValueError, json.JSONDecodeError) as exc:
        raise UnreadableCall("the call cannot be read (not call:NAME{...})") from exc
    items = parsed if isinstance(parsed, list) else [parsed]
    return [(item["name"], arguments_object(item["arguments"])) for item in items]


class _Values:
    """Lark rules for values in Gemma 4's call syntax, from JSON schemas."""

    def __init__(self, where: str, prefix: str, lit: Lit) -> None:
        self.where, self.prefix, self.lit = where, prefix, lit
        self.rules: list[str] = []
        self._count = 0

    def fresh(self, kind: str) -> str:
        self._count += 1
        return f"{self.prefix}{kind}{self._count}"

    def refuse(self, keyword: str) -> InvalidRequest:
        return InvalidRequest(
            f"The tool schema of '{self.where}' uses '{keyword}', which this model's call "
            "format cannot force; remove it or use tool_choice 'auto'.",
            param="tools",
        )

    def string(self, text: str) -> str:
        quote = self.lit(QUOTE)
        return f"{quote} {json.dumps(text)} {quote}"

    def value(self, schema: Any) -> str:
        if not isinstance(schema, dict):
            raise self.refuse("a schema that is not an object")
        kind = schema.get("type", "object" if "properties" in schema else None)
        if kind is None:
            # An untyped enum/const (what Python's Literal becomes) takes its values' type.
            values = schema.get("enum") or ([schema["const"]] if "const" in schema else [])
            if values and all(isinstance(v, str) for v in values):
                kind = "string"
            elif values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                kind = "integer"
        allowed = _KNOWN.get(kind) if isinstance(kind, str) else None
        extra = sorted(set(schema) - (allowed or {"type"}) - _SCHEMA_NOTES)
        if extra:
            raise self.refuse(extra[0])
        if allowed is None:
            raise self.refuse("type")
        options = schema.get("enum") or ([schema["const"]] if "const" in schema else None)
        if options:
            parts = [
                self.string(str(o)) if kind == "string" else json.dumps(json.dumps(o))
                for o in options
            ]
            return "(" + " | ".join(parts) + ")"
        if kind == "string":
            quote = self.lit(QUOTE)
            return f"{quote} GEMMA_TEXT {quote}"
        if kind == "integer":
            return "GEMMA_INT"
        if kind == "number":
            return "GEMMA_NUMBER"
        if kind == "boolean":
            return '("true" | "false")'
        if kind == "array":
            item = self.value(schema.get("items") or {"type": "string"})
            return f'"[" ({item} ("," {item})*)? "]"'
        return self.object(schema)

    def object(self, schema: dict[str, Any]) -> str:
        """Properties in declaration order: required ones always, optional ones maybe."""
        if schema.get("additionalProperties") not in (None, False):
            raise self.refuse("additionalProperties")
        props: dict[str, Any] = schema.get("properties") or {}
        required = set(schema.get("required") or ())
        parts = []
        for key, sub in props.items():
            rule = self.fresh("p")
            value = self.value(sub)
            self.rules.append(f"{rule}: {json.dumps(key + ':')} {value}")
            parts.append((rule, key in required))
        if not parts:
            return '"{}"'
        seq = comma_sequence(self.fresh("o"), parts, self.rules, '","')
        return f'"{{" {seq} "}}"'


class Gemma4(Family):
    name = "gemma4"
    think = ("<|channel>thought", "<channel|>")
    think_switch = "enable_thinking"
    end_tokens = ("<turn|>", "<|tool_response>")
    markers = (
        CALL_OPEN,
        CALL_CLOSE,
        "<|turn>",
        "<turn|>",
        "<|channel>",
        "<channel|>",
        "<|tool_response>",
        "<tool_response|>",
        QUOTE,
    )

    def matches(self, template: str, config: Mapping[str, Any]) -> bool:
        return CALL_OPEN in template and CALL_CLOSE in template

    def reasoning_options(self, template: str) -> ReasoningOptions | None:
        if "enable_thinking" not in template:
            return None
        return ReasoningOptions(("off", "on"), "off")

    def call_syntax(self, functions: list[dict[str, Any]]) -> BlockSyntax:
        return BlockSyntax(CALL_OPEN, CALL_CLOSE, gemma_calls)

    def parser(
        self, functions: list[dict[str, Any]], *, prompt: str, reasoning: bool
    ) -> OutputParser:
        return _ThoughtParser(StandardParser(self, functions, prompt=prompt, reasoning=reasoning))

    def call_grammar(self, functions: list[dict[str, Any]], parallel: bool, lit: Lit) -> str:
        calls, rules = [], []
        for i, function in enumerate(functions):
            values = _Values(function["name"], f"g{i}", lit)
            schema = function.get("parameters") or {"type": "object", "properties": {}}
            args = values.object(schema) if isinstance(schema, dict) else values.value(schema)
            name = json.dumps("call:" + function["name"])
            calls.append(f"c{i}: {lit(CALL_OPEN)} {name} {args} {lit(CALL_CLOSE)}")
            rules += values.rules
        names = " | ".join(f"c{i}" for i in range(len(functions)))
        body = "call+" if parallel else "call"
        terminals = [
            "GEMMA_TEXT: /[^<]*/",
            "GEMMA_INT: /-?(0|[1-9][0-9]{0,15})/",
            "GEMMA_NUMBER: /-?(0|[1-9][0-9]{0,15})(\\.[0-9]{1,15})?/",
        ]
        return "\n".join([f"start: {body}", f"call: {names}", *calls, *rules, *terminals]) + "\n"


class _ThoughtParser:
    """The standard parser, without the newline Gemma 4 writes after ``<|channel>thought``."""

    def __init__(self, inner: StandardParser) -> None:
        self._inner = inner
        self._started = False

    @property
    def in_reasoning(self) -> bool:
        return self._inner.in_reasoning

    @property
    def calls(self) -> int:
        return self._inner.calls

    def feed(self, text: str) -> list[OutputEvent]:
        return self._trim(self._inner.feed(text))

    def finish(self) -> list[OutputEvent]:
        return self._trim(self._inner.finish())

    def _trim(self, events: list[OutputEvent]) -> list[OutputEvent]:
        out: list[OutputEvent] = []
        for event in events:
            if isinstance(event, ReasoningDelta) and not self._started:
                self._started = True
                text = event.text.removeprefix("\n")
                if not text:
                    continue
                event = ReasoningDelta(text)
            out.append(event)
        return out


class GemmaPlain(LMStudio):
    """Gemma 2/3: tools through LM Studio's prompt, a system message folded into the first user
    turn (as Gemma 3's own template does)."""

    name = "gemma"
    markers: ClassVar[tuple[str, ...]] = (*LMStudio.markers, "<start_of_turn>", "<end_of_turn>")
    end_tokens = ("<end_of_turn>",)

    def matches(self, template: str, config: Mapping[str, Any]) -> bool:
        return "<start_of_turn>" in template and "tools" not in template

    def prepare_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        messages = super().prepare_messages(messages)
        if not messages or messages[0].get("role") != "system":
            return messages
        system, rest = messages[0], list(messages[1:])
        text = system.get("content")
        if not isinstance(text, str) or not rest or rest[0].get("role") != "user":
            return messages
        first = dict(rest[0])
        content = first.get("content")
        if isinstance(content, str):
            first["content"] = f"{text}\n\n{content}" if text else content
        elif isinstance(content, list):
            first["content"] = [{"type": "text", "text": text + "\n\n"}, *content]
        else:
            return messages
        return [first, *rest[1:]]
