"""The streaming reader of tool-call blocks, shared by every family whose calls are delimited by
an opening and a closing marker (or run to the end of the output).

What a block holds is the family's business (:class:`BlockSyntax.parse`); this module finds the
blocks in the text stream, streams JSON arguments as they are generated where the body is a
``{"name": ..., "arguments": ...}`` object, and gives back a block it cannot read as an
:class:`InvalidToolCall` (reported, never dropped).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlxserve.core.textstream import partial_suffix
from mlxserve.core.types import (
    InvalidToolCall,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
)

ToolEvent = TextDelta | ToolCallStart | ToolCallDelta | ToolCallEnd

# One call read back from the model's text: the tool's name and its arguments.
Call = tuple[str, dict[str, Any]]


class UnreadableCall(ValueError):
    """A call block that cannot be read; the message says why (it reaches the client)."""


@dataclass(frozen=True)
class BlockSyntax:
    """How a family delimits its calls, and how one block's body becomes calls."""

    open: str
    # None: the calls run to the end of the output (Llama 3, the old Mistral array).
    close: str | None
    # Body text -> the calls in it; raises UnreadableCall (or ValueError) when it cannot.
    parse: Callable[[str], list[Call]]
    # The body is JSON {"name": ..., KEY: {...}}: arguments stream while they are generated.
    json_args_key: str | None = None
    # Llama 3 answers a call as bare JSON, without its python_tag, at the start of a reply.
    bare_json: bool = False
    # Where one block holds several calls (Kimi K2's section, MiniMax M2's): the marker that
    # ends each call, so that a block cut off by max_tokens still gives the calls it completed.
    call_end: str | None = None


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


_HEAD = re.compile(
    r'^\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(arguments|parameters)"\s*:\s*'
)


def value_end(text: str) -> int | None:
    """Index just past the first complete JSON value in ``text``, if it is complete."""
    depth, in_string, escape = 0, False, False
    started = False
    for i, ch in enumerate(text):
        if in_string:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_string = False
                if depth == 0:
                    return i + 1
            continue
        if ch == '"':
            in_string, started = True, True
        elif ch in "{[":
            depth, started = depth + 1, True
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
        elif started and depth == 0 and ch in ",} \n":
            return i
        elif not ch.isspace():
            started = True
    return None


def json_calls(body: str, args_key: str = "arguments") -> list[Call]:
    """Calls written as JSON: one ``{"name", ARGS}`` object or an array of them."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise UnreadableCall(f"the call is not valid JSON ({exc.msg})") from exc
    items = data if isinstance(data, list) else [data]
    calls: list[Call] = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise UnreadableCall("the call has no function name")
        args = item.get(args_key, item.get("arguments", item.get("parameters", {})))
        calls.append((item["name"], arguments_object(args)))
    return calls


def arguments_object(args: Any) -> dict[str, Any]:
    """Arguments as a dict; models sometimes write them as a JSON string."""
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as exc:
            raise UnreadableCall(f"the arguments are not valid JSON ({exc.msg})") from exc
    if not isinstance(args, dict):
        raise UnreadableCall("the arguments are not a JSON object")
    return args


class BlockCallParser:
    """Streams model text into content and tool-call events for one :class:`BlockSyntax`.

    A call whose body is JSON starts as soon as its name is known and its arguments stream as
    they are generated; other bodies are read when their block closes.
    """

    def __init__(self, syntax: BlockSyntax, known_names: set[str], strip: Callable[[str], str]):
        self.syntax = syntax
        self.known = known_names
        self._strip = strip
        self.calls = 0
        self._pending = ""
        self._block: str | None = None  # text of the block being read, after its opener
        self._streamed = 0  # how much of the current call's arguments were sent
        self._args_start: int | None = None
        self._started = False
        self._seen_text = False
        self._opener = ""

    def feed(self, text: str) -> list[ToolEvent]:
        out: list[ToolEvent] = []
        self._pending += text
        while self._pending:
            if self._block is None:
                if not self._find_open(out):
                    break
            elif not self._read_block(out):
                break
        return out

    def finish(self) -> list[ToolEvent]:
        out: list[ToolEvent] = []
        if self._block is not None:
            self._close_block(out, self._block + self._pending, complete=False)
        elif self._pending:
            self._text(out, self._pending)
        self._pending = ""
        return out

    # -- outside a block

    def _find_open(self, out: list[ToolEvent]) -> bool:
        opener = self.syntax.open
        at = self._pending.find(opener)
        bare = self._bare_json_start()
        if bare is not None and (at < 0 or bare < at):
            self._text(out, self._pending[:bare])
            self._block, self._pending, self._opener = "", self._pending[bare:], ""
            return True
        if at >= 0:
            self._text(out, self._pending[:at])
            self._block, self._pending = "", self._pending[at + len(opener) :]
            self._opener = opener
            return True
        keep = partial_suffix(self._pending, opener)
        if self.syntax.bare_json and not self._seen_text and not self._pending.strip():
            keep = len(self._pending)
        self._text(out, self._pending[: len(self._pending) - keep])
        self._pending = self._pending[len(self._pending) - keep :]
        return False

    def _bare_json_start(self) -> int | None:
        if not self.syntax.bare_json or self._seen_text:
            return None
        stripped = self._pending.lstrip()
        if stripped.startswith("{"):
            return len(self._pending) - len(stripped)
        return None

    def _text(self, out: list[ToolEvent], text: str) -> None:
        if text:
            self._seen_text = self._seen_text or bool(text.strip())
            out.append(TextDelta(text))

    # -- inside a block

    def _read_block(self, out: list[ToolEvent]) -> bool:
        assert self._block is not None
        self._block += self._pending
        self._pending = ""
        close = self.syntax.close
        if close is not None:
            at = self._block.find(close)
            if at >= 0:
                body, rest = self._block[:at], self._block[at + len(close) :]
                self._stream_args(out, body)
                self._close_block(out, body, complete=True)
                self._pending = rest
                return True
        self._stream_args(out, self._block)
        return False

    def _stream_args(self, out: list[ToolEvent], body: str) -> None:
        close = self.syntax.close
        if close is None or self.syntax.json_args_key is None:
            return  # read whole when the block ends
        if not self._started:
            head = _HEAD.match(body)
            if head is None or head.group(1) not in self.known:
                return
            self._started = True
            self._args_start = head.end()
            out.append(ToolCallStart(self.calls, new_call_id(), head.group(1)))
        assert self._args_start is not None
        value = body[self._args_start :]
        if self._streamed == 0:
            lead = len(value) - len(value.lstrip())
            self._args_start += lead
            value = value[lead:]
        end = value_end(value)
        upto = len(value) if end is None else end
        upto = min(upto, len(value) - partial_suffix(value, close))
        if upto > self._streamed:
            out.append(ToolCallDelta(self.calls, value[self._streamed : upto]))
            self._streamed = upto

    def _close_block(self, out: list[ToolEvent], body: str, *, complete: bool) -> None:
        if self._started:
            out.append(ToolCallEnd(self.calls))
            self.calls += 1
        else:
            self._whole(out, body, complete=complete)
        self._block = None
        self._started = False
        self._streamed = 0
        self._args_start = None

    def _whole(self, out: list[ToolEvent], body: str, *, complete: bool) -> None:
        raw = self._opener + body
        if complete and self.syntax.close:
            raw += self.syntax.close
        unknown_name = None
        if not complete and self.syntax.close:
            rest = self._calls_before_cut(out, body)
            if len(rest) < len(body):
                self._seen_text = True
                if not rest.strip():
                    return
                raw = rest
            reason = "the call was cut off before its end marker"
        else:
            try:
                calls = self.syntax.parse(body)
                unknown = [name for name, _ in calls if name not in self.known]
                if not calls:
                    reason = "the block holds no call"
                elif unknown:
                    reason = f"the model called '{unknown[0]}', which is not among the tools"
                    unknown_name = unknown[0]
                else:
                    self._emit(out, calls)
                    return
            except ValueError as exc:
                reason = str(exc) or "the call cannot be read"
        self._seen_text = True
        if not self._opener:  # bare JSON that is not a call is just an answer
            out.append(TextDelta(raw))
            return
        out.append(InvalidToolCall(self._strip(raw), reason=reason, unknown_name=unknown_name))

    def _calls_before_cut(self, out: list[ToolEvent], body: str) -> str:
        """Gives the calls that were complete in a block of several calls cut off before its
        end marker, and returns the rest of the block (all of it when none was complete)."""
        call_end = self.syntax.call_end
        at = body.rfind(call_end) if call_end else -1
        if call_end is None or at < 0:
            return body
        try:
            calls = self.syntax.parse(body[: at + len(call_end)])
        except ValueError:
            return body
        if not calls or any(name not in self.known for name, _ in calls):
            return body
        self._emit(out, calls)
        return body[at + len(call_end) :]

    def _emit(self, out: list[ToolEvent], calls: list[Call]) -> None:
        for name, args in calls:
            out.append(ToolCallStart(self.calls, new_call_id(), name))
            out.append(ToolCallDelta(self.calls, json.dumps(args, ensure_ascii=False)))
            out.append(ToolCallEnd(self.calls))
            self.calls += 1
