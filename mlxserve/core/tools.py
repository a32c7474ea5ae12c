"""Tool calling: each model family's call format, prompting, forcing grammars and a streaming
parser that turns the model's text back into tool calls."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from enum import Enum
from typing import Any

from mlxserve.core.grammar import strict_json
from mlxserve.core.textstream import partial_suffix
from mlxserve.core.types import TextDelta, ToolCallDelta, ToolCallEnd, ToolCallStart


class ToolFormat(str, Enum):
    HERMES = "hermes"  # Qwen, Hermes, many others: <tool_call>{json}</tool_call>
    LLAMA3 = "llama3"  # Llama 3.x: {"name": ..., "parameters": {...}}
    MISTRAL = "mistral"  # Mistral: [TOOL_CALLS][{"name": ..., "arguments": {...}}]
    LMSTUDIO = "lmstudio"  # any other model: LM Studio's [TOOL_REQUEST]{json}[END_TOOL_REQUEST]


@dataclass(frozen=True)
class _Markers:
    open: str
    close: str | None  # None: the calls run to the end of the output
    args_key: str


MARKERS = {
    ToolFormat.HERMES: _Markers("<tool_call>", "</tool_call>", "arguments"),
    ToolFormat.LLAMA3: _Markers("<|python_tag|>", None, "parameters"),
    ToolFormat.MISTRAL: _Markers("[TOOL_CALLS]", None, "arguments"),
    ToolFormat.LMSTUDIO: _Markers("[TOOL_REQUEST]", "[END_TOOL_REQUEST]", "arguments"),
}


def detect_format(template: str | None) -> ToolFormat:
    """The call format a model was trained on, judged from its chat template."""
    source = template or ""
    if "tools" not in source:
        return ToolFormat.LMSTUDIO
    if "[TOOL_CALLS]" in source:
        return ToolFormat.MISTRAL
    if "<tool_call>" in source:
        return ToolFormat.HERMES
    if "<|python_tag|>" in source or ("<|eot_id|>" in source and "parameters" in source):
        return ToolFormat.LLAMA3
    return ToolFormat.HERMES


def lmstudio_tool_prompt(tools: list[dict[str, Any]]) -> str:
    """The system prompt that teaches a model without tool training our call format."""
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "You can call these tools (JSON Schema function definitions):\n"
        f"{listing}\n\n"
        "To call a tool, answer with exactly this and nothing else:\n"
        '[TOOL_REQUEST]{"name": "<tool name>", "arguments": {<arguments as JSON>}}'
        "[END_TOOL_REQUEST]\n"
        "Call a tool only when it helps to answer; otherwise answer normally."
    )


def call_schema(fmt: ToolFormat, function: dict[str, Any]) -> dict[str, Any]:
    """JSON schema of one call to ``function`` in ``fmt``'s JSON shape (name first)."""
    params = function.get("parameters") or {"type": "object", "properties": {}}
    key = MARKERS[fmt].args_key
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, key: params},
        "required": ["name", key],
        "additionalProperties": False,
    }


def forcing_grammar(fmt: ToolFormat, functions: list[dict[str, Any]], parallel: bool) -> str:
    """A Lark grammar (llguidance dialect) for output that is nothing but tool calls."""
    schemas = [call_schema(fmt, f) for f in functions]
    one = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    call = "%json " + json.dumps(strict_json(one))
    m = MARKERS[fmt]
    if fmt is ToolFormat.MISTRAL:
        body = 'call ("," call)*' if parallel else "call"
        return f'start: "[TOOL_CALLS][" {body} "]"\ncall: {call}\n'
    if fmt is ToolFormat.LLAMA3:
        return f"start: call\ncall: {call}\n"
    block = f"{json.dumps(m.open)} call {json.dumps(m.close)}"
    if fmt is ToolFormat.HERMES:
        block = f"{json.dumps(m.open + chr(10))} call {json.dumps(chr(10) + str(m.close))}"
    body = 'block ("\\n" block)*' if parallel else "block"
    return f"start: {body}\nblock: {block}\ncall: {call}\n"


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


_HEAD = re.compile(
    r'^\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(arguments|parameters)"\s*:\s*'
)


def _value_end(text: str) -> int | None:
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


def _calls_in(body: str, args_key: str) -> list[tuple[str, str]] | None:
    """(name, arguments JSON) for each call in a block body, or None if it is not valid."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None
    items = data if isinstance(data, list) else [data]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        args = item.get(args_key, item.get("arguments", item.get("parameters", {})))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        if not isinstance(args, dict):
            return None
        calls.append((item["name"], json.dumps(args, ensure_ascii=False)))
    return calls


ToolEvent = TextDelta | ToolCallStart | ToolCallDelta | ToolCallEnd


class ToolCallParser:
    """Streams model text into content and tool-call events.

    For formats with one call per block (Hermes, LM Studio), the call starts as soon as its
    name is known and its arguments stream as they are generated. A block with an unknown
    tool name or invalid JSON is given back as text: reported, never dropped.
    """

    def __init__(self, fmt: ToolFormat, known_names: set[str]) -> None:
        self.fmt = fmt
        self.markers = MARKERS[fmt]
        self.known = known_names
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
            out.append(TextDelta(self._pending))
        self._pending = ""
        return out

    # -- outside a block

    def _find_open(self, out: list[ToolEvent]) -> bool:
        opener = self.markers.open
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
        if self.fmt is ToolFormat.LLAMA3 and not self._seen_text and not self._pending.strip():
            keep = len(self._pending)
        self._text(out, self._pending[: len(self._pending) - keep])
        self._pending = self._pending[len(self._pending) - keep :]
        return False

    def _bare_json_start(self) -> int | None:
        """Llama 3 models often answer a call as bare JSON, with no python_tag."""
        if self.fmt is not ToolFormat.LLAMA3 or self._seen_text:
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
        close = self.markers.close
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
        if self.markers.close is None:
            return  # array and bare formats are parsed whole at the end
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
        end = _value_end(value)
        upto = len(value) if end is None else end
        if self.markers.close:
            upto = min(upto, len(value) - partial_suffix(value, self.markers.close))
        if upto > self._streamed:
            out.append(ToolCallDelta(self.calls, value[self._streamed : upto]))
            self._streamed = upto

    def _close_block(self, out: list[ToolEvent], body: str, *, complete: bool) -> None:
        if self._started:
            out.append(ToolCallEnd(self.calls))
            self.calls += 1
        else:
            calls = (
                _calls_in(body, self.markers.args_key)
                if complete or not self.markers.close
                else None
            )
            if calls and all(name in self.known for name, _ in calls):
                for name, args in calls:
                    out.append(ToolCallStart(self.calls, new_call_id(), name))
                    out.append(ToolCallDelta(self.calls, args))
                    out.append(ToolCallEnd(self.calls))
                    self.calls += 1
            else:
                raw = self._opener + body
                if complete and self.markers.close:
                    raw += self.markers.close
                self._text(out, raw)
        self._block = None
        self._started = False
        self._streamed = 0
        self._args_start = None
