"""Mistral: calls after ``[TOOL_CALLS]``. Two forms:

- Mistral Small 3.2, Devstral, Magistral/Ministral (tokenizer v11+, templates with ``[ARGS]``):
  ``[TOOL_CALLS]NAME[ARGS]{...}``, repeated for several calls, sometimes with
  ``[CALL_ID]ID`` before ``[ARGS]``.
- Older models (v3, Mistral-Nemo): one JSON array ``[TOOL_CALLS][{"name", "arguments"}, ...]``.

Either way the calls run to the end of the reply. They are read by mlx-lm's ``mistral`` parser,
which reads both forms; we only take out the ``[CALL_ID]ID`` part it does not know.

Magistral and the Ministral reasoning models think in ``[THINK]...[/THINK]``, switched by the
system prompt: the template's default system prompt (used when the conversation has none) tells
the model to think; any other system prompt does not.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any, ClassVar

from mlxserve.core.families.base import Family, Lit, ReasoningOptions, check_setting
from mlxserve.core.families.calls import BlockSyntax, Call, UnreadableCall, arguments_object
from mlxserve.core.grammar import strict_json

TOOL_CALLS, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
THINK, END_THINK = "[THINK]", "[/THINK]"
_CALL_ID = re.compile(re.escape(CALL_ID) + r"\s*\w*\s*(?=\[ARGS\])")
# The template's own thinking instructions (its "default_system_message").
_DEFAULT_SYSTEM = re.compile(r"set\s+default_system_message\s*=\s*'((?:[^'\\]|\\.)*)'")
_MARKERS = (
    TOOL_CALLS,
    ARGS,
    CALL_ID,
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[TOOL_CONTENT]",
    "</s>",
)


def mistral_calls(body: str) -> list[Call]:
    from mlx_lm.tool_parsers import mistral

    # mlx-lm reads "NAME[ARGS]{...}" and the JSON array; a "[CALL_ID]x" would make it take
    # the id for the name.
    text = _CALL_ID.sub("", body).strip()
    try:
        parsed = mistral.parse_tool_call(text)
    except ValueError as exc:
        raise UnreadableCall(
            "the call cannot be read (not NAME[ARGS]{...} or a JSON array)"
        ) from exc
    items = parsed if isinstance(parsed, list) else [parsed]
    return [(item["name"], arguments_object(item["arguments"])) for item in items]


def _args_schema(function: dict[str, Any]) -> str:
    schema = function.get("parameters") or {"type": "object", "properties": {}}
    return "%json " + json.dumps(strict_json(schema))


class Mistral(Family):
    """The older models' JSON-array form."""

    name = "mistral"
    markers: ClassVar[tuple[str, ...]] = _MARKERS

    def matches(self, template: str, config: Mapping[str, Any]) -> bool:
        return TOOL_CALLS in template

    def call_syntax(self, functions: list[dict[str, Any]]) -> BlockSyntax:
        return BlockSyntax(TOOL_CALLS, None, mistral_calls)

    def prepare_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Mistral's templates refuse call ids that are not nine characters long (its own
        tokenizer's ids); ours and most clients' are longer, so each id is replaced by a
        nine-character digest of it, the same in the call and in its result."""
        out = []
        for message in messages:
            calls = message.get("tool_calls")
            if calls:
                message = dict(message)
                message["tool_calls"] = [
                    {**c, "id": _short_id(c["id"])} if isinstance(c, dict) and c.get("id") else c
                    for c in calls
                ]
            elif message.get("role") == "tool" and message.get("tool_call_id"):
                message = {**message, "tool_call_id": _short_id(message["tool_call_id"])}
            out.append(message)
        return out

    def call_grammar(self, functions: list[dict[str, Any]], parallel: bool, lit: Lit) -> str:
        calls = []
        for i, function in enumerate(functions):
            head = json.dumps('{"name": "' + function["name"] + '", "arguments": ')
            calls.append(f"c{i}: {head} {_args_schema(function)} " + '"}"')
        body = 'call (", " call)*' if parallel else "call"
        names = " | ".join(f"c{i}" for i in range(len(functions)))
        return (
            "\n".join([f'start: {lit(TOOL_CALLS)} "[" {body} "]"', f"call: {names}", *calls]) + "\n"
        )


class MistralV11(Mistral):
    """Mistral Small 3.2, Devstral, Magistral and Ministral: ``[TOOL_CALLS]NAME[ARGS]{...}``,
    and ``[THINK]`` reasoning where the template has it."""

    name = "mistral_v11"
    think = (THINK, END_THINK)
    markers: ClassVar[tuple[str, ...]] = (*_MARKERS, THINK, END_THINK)

    def matches(self, template: str, config: Mapping[str, Any]) -> bool:
        return TOOL_CALLS in template and ARGS in template

    def call_grammar(self, functions: list[dict[str, Any]], parallel: bool, lit: Lit) -> str:
        calls = [
            f"c{i}: {lit(TOOL_CALLS)} {json.dumps(f['name'])} {lit(ARGS)} {_args_schema(f)}"
            for i, f in enumerate(functions)
        ]
        names = " | ".join(f"c{i}" for i in range(len(functions)))
        body = "call+" if parallel else "call"
        return "\n".join([f"start: {body}", f"call: {names}", *calls]) + "\n"

    def reasoning_options(self, template: str) -> ReasoningOptions | None:
        if THINK not in template:
            return None
        return ReasoningOptions(("off", "on"), "on" if _default_system(template) else "off")

    def reasoning_kwargs(
        self, setting: str | None, template: str, *, constrained: bool
    ) -> dict[str, Any]:
        if setting is not None:
            check_setting(setting, self.reasoning_options(template))
        return {}

    def reasoning_messages(
        self, messages: list[dict[str, Any]], setting: str | None, template: str
    ) -> list[dict[str, Any]]:
        """The switch is the system prompt: "on" adds the template's thinking instructions to a
        system prompt of the client's own, "off" replaces the default one by an empty one."""
        instructions = _default_system(template)
        if setting is None or instructions is None:
            return messages
        has_system = bool(messages) and messages[0].get("role") == "system"
        if setting == "off":
            return messages if has_system else [{"role": "system", "content": ""}, *messages]
        if not has_system:
            return messages  # the template's default prompt turns thinking on
        first = dict(messages[0])
        content = first.get("content")
        if isinstance(content, str) and THINK not in content:
            first["content"] = f"{instructions}\n\n{content}".strip()
        return [first, *messages[1:]]


def _short_id(call_id: Any) -> str:
    text = str(call_id)
    if len(text) == 9 and text.isalnum():
        return text
    return hashlib.sha256(text.encode()).hexdigest()[:9]


def _default_system(template: str) -> str | None:
    """The template's default system prompt, where it tells the model to think."""
    found = _DEFAULT_SYSTEM.search(template)
    if found is None or THINK not in found.group(1):
        return None
    return found.group(1).replace("\\n", "\n").replace("\\'", "'")
