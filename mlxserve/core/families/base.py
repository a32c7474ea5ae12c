"""What a model family is: the base class every family module subclasses, and the standard
output parser (reasoning tags, then tool-call blocks, then control markers stripped)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from mlxserve.core.families.calls import BlockCallParser, BlockSyntax, ToolEvent
from mlxserve.core.grammar import strict_json
from mlxserve.core.reasoning import ReasoningSplitter, prompt_opens_thinking
from mlxserve.core.textstream import partial_suffix
from mlxserve.core.types import InvalidToolCall, ReasoningDelta, TextDelta
from mlxserve.errors import InvalidRequest

OutputEvent = ToolEvent | ReasoningDelta

# A marker (a special token's text) as a Lark expression: the token itself where the vocabulary
# has it as one token, else the literal text.
Lit = Callable[[str], str]


def plain_lit(text: str) -> str:
    return json.dumps(text)


@dataclass(frozen=True)
class ReasoningOptions:
    """LM Studio's ``capabilities.reasoning``: the settings a model takes, and its default."""

    allowed: tuple[str, ...]
    default: str


class OutputParser(Protocol):
    """Turns one reply's text, fed in pieces, into content, reasoning and tool-call events."""

    @property
    def in_reasoning(self) -> bool: ...

    @property
    def calls(self) -> int: ...

    def feed(self, text: str) -> list[OutputEvent]: ...

    def finish(self) -> list[OutputEvent]: ...


class MarkerFilter:
    """Removes control markers from streamed text, holding back a marker split across pieces."""

    def __init__(self, markers: tuple[str, ...]) -> None:
        self.markers = tuple(m for m in markers if m)
        self._pending = ""

    def strip(self, text: str) -> str:
        for marker in self.markers:
            text = text.replace(marker, "")
        return text

    def feed(self, text: str) -> str:
        if not self.markers:
            return text
        self._pending = self.strip(self._pending + text)
        keep = max(partial_suffix(self._pending, m) for m in self.markers)
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep :]
        return out

    def finish(self) -> str:
        out, self._pending = self._pending, ""
        return out


class Family:
    """One model family. Subclasses set the class attributes and override what differs; the
    defaults describe a model with no tool or reasoning syntax of its own."""

    # Short id, shown in logs and in the README table.
    name: ClassVar[str] = ""
    # Reasoning tags (start, end), when the family writes its reasoning between tags.
    think: ClassVar[tuple[str, str] | None] = None
    # Template variable that turns thinking on and off ({"enable_thinking": bool}).
    think_switch: ClassVar[str | None] = None
    # Tokens that end the model's turn, beyond the tokenizer's own end-of-sequence ids.
    end_tokens: ClassVar[tuple[str, ...]] = ()
    # Tokens that some tokenizer configs list as end-of-sequence but that do not end the turn.
    not_end_tokens: ClassVar[tuple[str, ...]] = ()
    # Control markers the parser reads (shown to it even where the vocabulary marks them
    # special) and that never reach content.
    markers: ClassVar[tuple[str, ...]] = ()

    # -- detection

    def matches(self, template: str, config: Mapping[str, Any]) -> bool:
        """Whether a model with this chat template (and config facts) is of this family."""
        return False

    # -- prompt side

    def takes_tools(self, template: str) -> bool:
        """Whether the template renders the request's tools itself (its ``tools`` variable)."""
        return "tools" in template

    def trained_for_tools(self, template: str) -> bool:
        """LM Studio's ``trained_for_tool_use``: the model has a tool-call format of its own."""
        return self.takes_tools(template)

    def tool_prompt(self, functions: list[dict[str, Any]]) -> str | None:
        """System text that teaches the tools when the template does not take them."""
        return None

    def prepare_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The conversation in the shape this family's template expects."""
        return messages

    def reasoning_options(self, template: str) -> ReasoningOptions | None:
        """The reasoning settings the model takes (None: it does not reason)."""
        switch = bool(self.think_switch and self.think_switch in template)
        tags = self.think is not None and any(tag in template for tag in self.think)
        if not (tags or switch):
            return None
        if switch:
            return ReasoningOptions(("off", "on"), "on")
        return ReasoningOptions(("on",), "on")

    def reasoning_kwargs(
        self, setting: str | None, template: str, *, constrained: bool
    ) -> dict[str, Any]:
        """Template arguments for a reasoning setting (None: the model's default). A setting the
        model cannot honour is refused. Under a grammar the reply must start with the forced
        syntax, so thinking is switched off where the template can."""
        options = self.reasoning_options(template)
        switch = self.think_switch if self.think_switch and self.think_switch in template else None
        if setting is not None:
            check_setting(setting, options)
        if constrained and switch:
            return {switch: False}
        if setting is None or switch is None:
            return {}
        return {switch: setting != "off"}

    def reasoning_messages(
        self, messages: list[dict[str, Any]], setting: str | None, template: str
    ) -> list[dict[str, Any]]:
        """The conversation with a reasoning setting applied, for families whose switch is in
        the messages (Magistral's system prompt) rather than a template argument."""
        return messages

    # -- output side

    def call_syntax(self, functions: list[dict[str, Any]]) -> BlockSyntax | None:
        """How this family's tool calls are delimited and read (None: no tool syntax)."""
        return None

    def call_grammar(self, functions: list[dict[str, Any]], parallel: bool, lit: Lit) -> str:
        """A Lark grammar (llguidance dialect) for a reply that is nothing but calls to
        ``functions`` in this family's syntax; several when ``parallel``."""
        raise InvalidRequest(
            f"Tool calls cannot be forced on this model (family '{self.name}').",
            param="tool_choice",
        )

    def parser(
        self, functions: list[dict[str, Any]], *, prompt: str, reasoning: bool
    ) -> OutputParser:
        """A parser for one reply to ``prompt`` (the rendered prompt text)."""
        return StandardParser(self, functions, prompt=prompt, reasoning=reasoning)


def check_setting(setting: str, options: ReasoningOptions | None) -> None:
    if options is None:
        if setting in ("off", "none"):
            return
        raise InvalidRequest(
            "This model does not support reasoning; leave the reasoning setting out or set it "
            "to 'off'.",
            param="reasoning",
        )
    levels = ("low", "medium", "high")
    allowed = set(options.allowed)
    if "on" in allowed:
        allowed |= set(levels)  # a model with no levels reasons at its one level
    if setting not in allowed:
        raise InvalidRequest(
            f"This model does not support reasoning '{setting}'; it takes "
            f"{', '.join(repr(o) for o in options.allowed)}.",
            param="reasoning",
        )


def json_call_grammar(
    functions: list[dict[str, Any]],
    args_key: str,
    block: Callable[[str], str],
    parallel: bool,
    *,
    separator: str = '"\\n"',
) -> str:
    """A forcing grammar for calls written as JSON ``{"name", ARGS_KEY}`` inside blocks:
    ``block(call)`` wraps the ``call`` rule in the family's markers."""
    schemas = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f["name"]},
                args_key: f.get("parameters") or {"type": "object", "properties": {}},
            },
            "required": ["name", args_key],
            "additionalProperties": False,
        }
        for f in functions
    ]
    one = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    body = f"block ({separator} block)*" if parallel else "block"
    return f"start: {body}\nblock: {block('call')}\ncall: %json {json.dumps(strict_json(one))}\n"


class StandardParser:
    """Reasoning between the family's tags, then tool-call blocks in the family's syntax, and
    every control marker removed from what is left."""

    def __init__(
        self, family: Family, functions: list[dict[str, Any]], *, prompt: str, reasoning: bool
    ) -> None:
        self._content = MarkerFilter(family.markers)
        self._reasoning = MarkerFilter(family.markers)
        self._splitter: ReasoningSplitter | None = None
        if reasoning and family.think is not None:
            start, end = family.think
            self._splitter = ReasoningSplitter(
                in_reasoning=prompt_opens_thinking(prompt, start), start=start, end=end
            )
        syntax = family.call_syntax(functions) if functions else None
        self._calls = (
            BlockCallParser(syntax, {f["name"] for f in functions}, self._content.strip)
            if syntax is not None
            else None
        )

    @property
    def in_reasoning(self) -> bool:
        return self._splitter is not None and self._splitter.in_reasoning

    @property
    def calls(self) -> int:
        return self._calls.calls if self._calls is not None else 0

    def feed(self, text: str) -> list[OutputEvent]:
        pieces = self._splitter.feed(text) if self._splitter else [(False, text)]
        return self._route(pieces, final=False)

    def finish(self) -> list[OutputEvent]:
        return self._route(self._splitter.finish() if self._splitter else [], final=True)

    def _route(self, pieces: list[tuple[bool, str]], *, final: bool) -> list[OutputEvent]:
        raw: list[OutputEvent] = []
        for reasoning, piece in pieces:
            if reasoning:
                raw.append(ReasoningDelta(piece))
            elif self._calls is not None:
                raw += self._calls.feed(piece)
            else:
                raw.append(TextDelta(piece))
        if final and self._calls is not None:
            raw += self._calls.finish()
        out: list[OutputEvent] = []
        for event in raw:
            if isinstance(event, InvalidToolCall):
                out.append(event)
            elif isinstance(event, ReasoningDelta):
                _add(out, ReasoningDelta, self._reasoning.feed(event.text))
            elif isinstance(event, TextDelta):
                _add(out, TextDelta, self._content.feed(event.text))
            else:
                _add(out, TextDelta, self._content.finish())
                out.append(event)
        if final:
            _add(out, ReasoningDelta, self._reasoning.finish())
            _add(out, TextDelta, self._content.finish())
        return out


def _add(out: list[OutputEvent], kind: type[TextDelta] | type[ReasoningDelta], text: str) -> None:
    if text:
        out.append(kind(text))
