"""gpt-oss: OpenAI's harmony format. A reply is a run of messages,
``<|channel|>CHANNEL[ to=RECIPIENT][ <|constrain|>json]<|message|>BODY`` ended by ``<|end|>``
(another message follows, after ``<|start|>assistant``), ``<|call|>`` (a tool call: the turn
ends) or ``<|return|>`` (the final answer). ``analysis`` is reasoning, ``final`` (and
``commentary`` without a recipient) is content, ``to=functions.NAME`` is a call with a JSON body.
The reasoning level is the system message's ``Reasoning: low|medium|high`` (the template's
``reasoning_effort``); it cannot be switched off.

We read the text ourselves rather than with ``openai-harmony`` (OpenAI's reference): its
``StreamableParser`` works on token ids of the o200k_harmony vocabulary only, which it
downloads at first use (no network here, and GGUF and MLX vocabularies must read alike), while
this parser reads the decoded text that both backends produce.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from mlxserve.core.families.base import Family, Lit, OutputEvent, ReasoningOptions
from mlxserve.core.families.calls import arguments_object, new_call_id
from mlxserve.core.grammar import strict_json
from mlxserve.core.textstream import partial_suffix
from mlxserve.core.types import (
    InvalidToolCall,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
)
from mlxserve.errors import InvalidRequest

START, CHANNEL, MESSAGE, END = "<|start|>", "<|channel|>", "<|message|>", "<|end|>"
CALL, RETURN, CONSTRAIN = "<|call|>", "<|return|>", "<|constrain|>"
_BODY_ENDS = (END, CALL, RETURN)
_LEVELS = ("low", "medium", "high")
_RECIPIENT = re.compile(r"to=(\S+?)(?=<\||\s|$)")
_CHANNEL = re.compile(re.escape(CHANNEL) + r"\s*(\w+)")


class Harmony(Family):
    name = "harmony"
    end_tokens = (RETURN, CALL)
    not_end_tokens = (END,)
    markers = (START, CHANNEL, MESSAGE, END, CALL, RETURN, CONSTRAIN, "<|endoftext|>")

    def matches(self, template: str, config: Mapping[str, Any]) -> bool:
        return (CHANNEL in template and MESSAGE in template) or config.get("architecture") in (
            "gpt-oss",
            "gpt_oss",
        )

    def reasoning_options(self, template: str) -> ReasoningOptions:
        return ReasoningOptions(_LEVELS, "medium")

    def reasoning_kwargs(
        self, setting: str | None, template: str, *, constrained: bool
    ) -> dict[str, Any]:
        if setting in _LEVELS:
            return {"reasoning_effort": setting}
        if setting is None or setting == "on":
            return {}
        raise InvalidRequest(
            f"This model does not support reasoning '{setting}'; it always reasons, at "
            "'low', 'medium' or 'high'.",
            param="reasoning",
        )

    def prepare_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The template takes one call per assistant message and names a tool result after
        the call just before it, and takes reasoning as ``thinking``: split multi-call turns
        into call/result pairs."""
        out: list[dict[str, Any]] = []
        i = 0
        while i < len(messages):
            message = _with_thinking(messages[i])
            calls = message.get("tool_calls") or []
            if message.get("role") != "assistant" or len(calls) < 2:
                out.append(message)
                i += 1
                continue
            j = i + 1
            results = []
            while j < len(messages) and messages[j].get("role") == "tool":
                results.append(messages[j])
                j += 1
            by_id = {r.get("tool_call_id"): r for r in results if r.get("tool_call_id")}
            unclaimed = [r for r in results if not r.get("tool_call_id")]
            for n, call in enumerate(calls):
                part = {**message, "tool_calls": [call]}
                if n:
                    part.pop("thinking", None)
                    part["content"] = ""
                out.append(part)
                result = by_id.pop(call.get("id"), None) or (
                    unclaimed.pop(0) if unclaimed else None
                )
                if result is not None:
                    out.append(result)
            out += list(by_id.values()) + unclaimed
            i = j
        return out

    def call_grammar(self, functions: list[dict[str, Any]], parallel: bool, lit: Lit) -> str:
        # One call per turn: <|call|> ends it.
        rules, names = [], []
        for i, function in enumerate(functions):
            params = function.get("parameters") or {"type": "object", "properties": {}}
            header = json.dumps(f"commentary to=functions.{function['name']} ")
            rules.append(
                f'f{i}: {header} {lit(CONSTRAIN)} "json" {lit(MESSAGE)} '
                f"%json {json.dumps(strict_json(params))}"
            )
            names.append(f"f{i}")
        return (
            "\n".join([f"start: {lit(CHANNEL)} ({' | '.join(names)}) {lit(CALL)}", *rules]) + "\n"
        )

    def parser(
        self, functions: list[dict[str, Any]], *, prompt: str, reasoning: bool
    ) -> HarmonyParser:
        return HarmonyParser({f["name"] for f in functions})


def _with_thinking(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = message.get("reasoning_content")
    if message.get("role") != "assistant" or not reasoning:
        return message
    out = {k: v for k, v in message.items() if k != "reasoning_content"}
    out["thinking"] = reasoning
    if out.get("tool_calls") and out.get("content"):
        # The template refuses both on a call turn; the reasoning is what it replays.
        out["content"] = ""
    return out


class HarmonyParser:
    """Streams harmony text into reasoning, content and tool calls."""

    def __init__(self, known: set[str]) -> None:
        self.known = known
        self.calls = 0
        self._pending = ""
        self._header: str | None = ""  # None: inside a message body
        self._channel = ""
        self._recipient: str | None = None
        self._body = ""  # a call's body, read whole when it ends

    @property
    def in_reasoning(self) -> bool:
        return self._header is None and self._channel == "analysis"

    def feed(self, text: str) -> list[OutputEvent]:
        self._pending += text
        out: list[OutputEvent] = []
        while self._pending:
            progressed = self._in_header(out) if self._header is not None else self._in_body(out)
            if not progressed:
                break
        return out

    def finish(self) -> list[OutputEvent]:
        out: list[OutputEvent] = []
        if self._header is None:
            # <|call|> and <|return|> end generation, so they are never seen: the end of the
            # text ends the last message (a cut-off call then fails to parse).
            self._emit(out, self._pending)
            self._close(out)
        else:
            stray = _strip(self._header + self._pending)
            if stray.strip():
                out.append(TextDelta(stray))
        self._pending, self._header = "", ""
        return out

    def _in_header(self, out: list[OutputEvent]) -> bool:
        assert self._header is not None
        self._header += self._pending
        self._pending = ""
        at = self._header.find(MESSAGE)
        if not _header_like(self._header):
            # Text outside harmony's framing (a model that ignores it): plain content.
            self._pending, self._header = self._header, None
            self._channel, self._recipient = "final", None
            return True
        if at < 0:
            if START in self._header:  # a new message: what came before it was no header
                self._header = self._header[self._header.rfind(START) + len(START) :]
            return False
        header, self._pending = self._header[:at], self._header[at + len(MESSAGE) :]
        channel = _CHANNEL.search(header)
        recipient = _RECIPIENT.search(header)
        self._channel = channel.group(1) if channel else ""
        self._recipient = recipient.group(1) if recipient else None
        self._header, self._body = None, ""
        return True

    def _in_body(self, out: list[OutputEvent]) -> bool:
        ends = [(self._pending.find(m), m) for m in _BODY_ENDS]
        found = [(at, m) for at, m in ends if at >= 0]
        if found:
            at, marker = min(found)
            self._emit(out, self._pending[:at])
            self._pending = self._pending[at + len(marker) :]
            self._close(out)
            self._header = ""
            return True
        keep = max(partial_suffix(self._pending, m) for m in _BODY_ENDS)
        self._emit(out, self._pending[: len(self._pending) - keep])
        self._pending = self._pending[len(self._pending) - keep :]
        return False

    def _emit(self, out: list[OutputEvent], text: str) -> None:
        if not text:
            return
        if self._recipient is not None:
            self._body += text
        elif self._channel == "analysis":
            out.append(ReasoningDelta(_strip(text)))
        else:
            out.append(TextDelta(_strip(text)))

    def _close(self, out: list[OutputEvent]) -> None:
        recipient, self._recipient = self._recipient, None
        if recipient is None:
            return
        name = recipient.removeprefix("functions.")
        raw = _strip(self._body)
        if not recipient.startswith("functions.") or name not in self.known:
            out.append(
                InvalidToolCall(
                    raw,
                    reason=f"the model called '{name}', which is not among the tools",
                    unknown_name=name,
                )
            )
            return
        try:
            arguments = arguments_object(json.loads(self._body) if self._body.strip() else {})
        except ValueError as exc:
            out.append(InvalidToolCall(raw, reason=str(exc)))
            return
        out.append(ToolCallStart(self.calls, new_call_id(), name))
        out.append(ToolCallDelta(self.calls, json.dumps(arguments, ensure_ascii=False)))
        out.append(ToolCallEnd(self.calls))
        self.calls += 1


_HEADER_STARTS = (CHANNEL, START, "assistant", "to=", CONSTRAIN)


def _header_like(text: str) -> bool:
    head = text.lstrip()
    return any(head.startswith(s) or s.startswith(head) for s in _HEADER_STARTS)


def _strip(text: str) -> str:
    for marker in Harmony.markers:
        text = text.replace(marker, "")
    return text
