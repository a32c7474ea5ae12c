"""Grammars for constrained decoding: JSON schemas and tool-call formats, compiled by llguidance
and checked before any model work, so an unenforceable request is refused with a 400."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from llguidance import LLMatcher

from mlxserve.errors import InvalidRequest

# Strict-mode JSON: no free whitespace (a model could otherwise pad forever) and compact
# separators, as OpenAI's structured outputs produce.
JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


def strict_json(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with our JSON formatting options attached (for %json inside Lark)."""
    return {**schema, "x-guidance": JSON_OPTIONS}


def _check(grammar: str, param: str) -> str:
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise InvalidRequest(
            f"This schema cannot be enforced: {'; '.join(messages)}. "
            "Remove or rewrite the unsupported part.",
            param=param,
        )
    return grammar


@lru_cache(maxsize=256)
def _schema_grammar(schema_json: str, param: str) -> str:
    grammar = LLMatcher.grammar_from_json_schema(schema_json, overrides=JSON_OPTIONS)  # type: ignore[arg-type]
    return _check(grammar, param)


def json_schema_grammar(schema: dict[str, Any], param: str) -> str:
    """The grammar for JSON output matching ``schema`` (cached by schema)."""
    try:
        text = json.dumps(schema)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"The schema is not valid JSON: {exc}", param=param) from exc
    try:
        return _schema_grammar(text, param)
    except ValueError as exc:
        raise InvalidRequest(f"The schema is not valid: {exc}", param=param) from exc


@lru_cache(maxsize=256)
def lark_grammar(lark: str, param: str) -> str:
    """The grammar for a Lark description (the tool-call forcing grammars)."""
    return _check(LLMatcher.grammar_from_lark(lark), param)
