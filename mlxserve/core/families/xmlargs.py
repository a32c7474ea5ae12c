"""Forcing grammars for families that write each argument on its own, outside JSON (Qwen3-Coder
and Qwen3.5's ``<parameter=K>``, GLM's ``<arg_key>``, DeepSeek V3.2's DSML): a string argument
is written raw, any other as JSON, as each family's template renders them."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from mlxserve.core.families.base import Lit
from mlxserve.core.grammar import strict_json
from mlxserve.errors import InvalidRequest

# What a raw string argument may say about itself and still be forced.
_STRING_KEYWORDS = {"type", "description", "title", "enum", "const", "default", "examples"}


def text_value(name: str, close: str, lit: Lit) -> tuple[str, str, str]:
    """(terminal rule, value expression, close expression) for raw text ended by ``close``.
    A ``close`` that is one token in the vocabulary is its own lexeme after text that never
    holds it; a textual ``close`` goes into the text's terminal, so the lexer cannot take the
    start of ``close`` as text."""
    marker = lit(close)
    escaped = "".join("\\" + c if c in "/\\.|()[]{}*+?^$" else c for c in close)
    escaped = escaped.replace("\n", "\\n")
    if marker.startswith("<["):
        rule = f"{name}: /(.|\\n)*/ & ~/(.|\\n)*{escaped}(.|\\n)*/\n"
        return rule, f"{name} {marker}", marker
    rule = f"{name}: /(.|\\n)*{escaped}/ & ~/(.|\\n)*{escaped}(.|\\n)+/\n"
    return rule, name, marker


def is_string(schema: dict[str, Any]) -> bool:
    """A string argument, written raw. An untyped enum/const of strings (what the lmstudio SDK
    makes of ``Literal["a", "b"]``) is one too: the templates write a string value raw, and
    mlx-lm's Qwen3-Coder parser keeps an untyped value's text as is, so a JSON-quoted value
    came back with its quotes."""
    if "type" in schema:
        return schema["type"] == "string"
    values = schema.get("enum") or ([schema["const"]] if "const" in schema else [])
    return bool(values) and all(isinstance(v, str) for v in values)


def value_rule(schema: dict[str, Any], where: str, text: str, close: str) -> str:
    """The Lark expression for one argument's value and the ``close`` after it (``text`` and
    ``close`` as :func:`text_value` gives them)."""
    if not is_string(schema):
        return "%json " + json.dumps(strict_json(schema or {})) + " " + close
    extra = sorted(set(schema) - _STRING_KEYWORDS)
    if extra:
        raise InvalidRequest(
            f"The tool schema of '{where}' uses '{extra[0]}' on a string argument, which this "
            "model's call format writes raw and cannot force; remove it or use "
            "tool_choice 'auto'.",
            param="tools",
        )
    options = schema.get("enum") or ([schema["const"]] if "const" in schema else None)
    if options:
        alternatives = " | ".join(json.dumps(str(o)) for o in options)
        return f"({alternatives}) {close}"
    return text


def arguments_rules(
    function: dict[str, Any],
    prefix: str,
    one_argument: Callable[[str, str], str],
    text: str,
    close: str,
) -> tuple[str, list[str]]:
    """(sequence expression, extra rules) for a function's arguments in declaration order:
    required ones always, optional ones maybe. ``one_argument(key_literal, value_expr)``
    renders one argument in the family's syntax; the value expression ends with ``close``."""
    params = function.get("parameters") or {}
    props: dict[str, Any] = params.get("properties") or {}
    required = set(params.get("required") or ())
    parts, rules = [], []
    for i, (key, schema) in enumerate(props.items()):
        rule = f"{prefix}_{i}"
        value = value_rule(
            schema if isinstance(schema, dict) else {}, function["name"], text, close
        )
        rules.append(f"{rule}: {one_argument(json.dumps(key), value)}")
        parts.append(rule if key in required else f"{rule}?")
    return (" ".join(parts) if parts else '""'), rules


def function_rules(
    functions: list[dict[str, Any]],
    close: str,
    lit: Lit,
    one_argument: Callable[[dict[str, Any], str, str], str],
    call: Callable[[dict[str, Any], str], str],
) -> tuple[list[str], list[str]]:
    """(rules, rule names) for one rule per function, ``f<i>: call(function, arguments)``, and
    the raw-text terminal its string values share (they end with ``close``).
    ``one_argument(function, key_literal, value_expr)`` renders one argument of ``function``."""
    rule, text, value_close = text_value("TEXT", close, lit)
    rules, names = [rule], []
    for i, function in enumerate(functions):

        def one(key: str, value: str, function: dict[str, Any] = function) -> str:
            return one_argument(function, key, value)

        seq, arg_rules = arguments_rules(function, f"a{i}", one, text, value_close)
        rules += [f"f{i}: {call(function, seq)}", *arg_rules]
        names.append(f"f{i}")
    return rules, names
