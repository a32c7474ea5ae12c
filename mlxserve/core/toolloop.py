"""The MCP tool loop: offer the servers' tools to the model, run each call it makes against its
server, feed the results back, and generate again, until the model answers without calling
an MCP tool or the round limit is reached.

Rounds and ``tool_choice``: a forced choice (``"required"`` or a named tool) applies to the
first round only, and later rounds use ``"auto"``; forcing every round would never let the
model answer. After ``max_rounds`` rounds with calls, one last round runs with tools off
(``"none"``), so the reply always ends with the model's answer.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any, Literal

from mlxserve.core import generate
from mlxserve.core.generate import Generation
from mlxserve.core.manager import ModelManager
from mlxserve.core.mcp import Toolset
from mlxserve.core.types import (
    CoreRequest,
    Done,
    Event,
    Idle,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)
from mlxserve.errors import McpConnectionError

log = logging.getLogger(__name__)
# Room kept free for the reply (and the template's wrapping) when a tool result is fitted
# into the context.
ANSWER_RESERVE = 256
MIN_RESULT_TOKENS = 16

Status = Literal["success", "tool_error", "invalid_name", "invalid_arguments", "connection_error"]


@dataclass(frozen=True)
class ToolResult:
    """A call the loop ran (or refused), and what the model is given back for it."""

    call_id: str
    name: str
    arguments: str
    provider: dict[str, str] | None
    status: Status
    output: str
    reason: str = ""
    # The arguments as the core parsed them (None: not a JSON object).
    parsed: dict[str, Any] | None = None

    @property
    def parsed_arguments(self) -> Any:
        """The arguments to show: the object, else the text the model wrote."""
        return self.arguments if self.parsed is None else self.parsed


LoopEvent = Event | ToolResult


def with_tools(request: CoreRequest, toolset: Toolset) -> CoreRequest:
    """``request`` with the toolset's MCP tools offered besides its own function tools."""
    return replace(request, tools=(*request.tools, *toolset.functions()))


@dataclass
class _Call:
    id: str
    name: str
    arguments: str = ""
    parsed: dict[str, Any] | None = None

    def result(
        self, provider: dict[str, str] | None, status: Status, output: str, reason: str = ""
    ) -> ToolResult:
        return ToolResult(
            self.id, self.name, self.arguments, provider, status, output, reason, self.parsed
        )


class ToolLoop:
    """Runs the rounds of one request. ``first`` is the first round's generation, already
    admitted by the route (which may have loaded the model for it) for ``request``, the
    request as :func:`with_tools` made it."""

    def __init__(
        self,
        manager: ModelManager,
        request: CoreRequest,
        first: Generation,
        toolset: Toolset,
        max_rounds: int,
    ) -> None:
        self.manager = manager
        self.request = request
        self.gen = first
        self.toolset = toolset
        self.max_rounds = max_rounds
        self.messages = list(request.messages or ())
        # The assistant and tool messages of the rounds that called tools (for chat stores).
        self.transcript: list[dict[str, Any]] = []
        self.rounds = 0

    def cancel(self) -> None:
        self.gen.cancel()

    async def events(self, idle_seconds: float | None = None) -> AsyncIterator[LoopEvent]:
        """The rounds' events as one stream, ending with one :class:`Done` whose usage adds
        up every round."""
        usage = Usage(0, 0, 0, 0)
        while True:
            calls: list[_Call] = []
            text = ""
            done: Done | None = None
            async for event in self.gen.events(idle_seconds):
                if isinstance(event, Done):
                    done = event
                    break
                if isinstance(event, ToolCallStart):
                    calls.append(_Call(event.id, event.name))
                elif isinstance(event, ToolCallDelta) and calls:
                    calls[-1].arguments += event.arguments
                elif isinstance(event, ToolCallEnd) and calls:
                    calls[-1].parsed = event.parsed
                elif isinstance(event, TextDelta):
                    text += event.text
                yield event
            if done is None:
                return
            usage = Usage(
                usage.prompt_tokens + done.usage.prompt_tokens,
                usage.completion_tokens + done.usage.completion_tokens,
                usage.reasoning_tokens + done.usage.reasoning_tokens,
                usage.cached_tokens + done.usage.cached_tokens,
                usage.cache_written + done.usage.cache_written,
            )
            ours = [c for c in calls if c.name in self.toolset.tools]
            if done.finish_reason != "tool_calls" or not ours:
                yield replace(done, usage=usage)
                return
            self.rounds += 1
            results = []
            for call in calls:
                if self._client_function(call.name):
                    continue
                task = asyncio.ensure_future(self._run(call))
                try:
                    # Keep-alives while the server works (an SSE stream is otherwise silent).
                    while not (await asyncio.wait({task}, timeout=idle_seconds or None))[0]:
                        yield Idle()
                finally:
                    task.cancel()
                result = task.result()
                if result.status == "connection_error":
                    yield result
                    raise McpConnectionError(result.reason)
                results.append(result)
            results = await self._fit(results, done)
            for result in results:
                yield result
            self._feed_back(text, calls, results)
            if len(ours) < len(calls):
                # The model also called the client's own functions: the client runs those.
                yield replace(done, usage=usage)
                return
            await self._next_round()

    def _client_function(self, name: str) -> bool:
        if name in self.toolset.tools:
            return False
        return any(t.get("name") == name for t in self.request.tools)

    async def _run(self, call: _Call) -> ToolResult:
        entry = self.toolset.tools.get(call.name)
        if entry is None:
            reason = f"Tool '{call.name}' is not offered by any MCP server of this request."
            return call.result(None, "invalid_name", reason, reason)
        tool, conn = entry
        provider = tool.server.provider
        arguments = call.parsed
        problem = (
            "they are not a JSON object"
            if arguments is None
            else await _argument_problem(arguments, tool.input_schema)
        )
        if problem is not None or arguments is None:
            reason = f"Invalid arguments for '{call.name}': {problem}"
            return call.result(provider, "invalid_arguments", reason, reason)
        try:
            outcome = await conn.call(call.name, arguments)
        except McpConnectionError as exc:
            return call.result(provider, "connection_error", "", exc.message)
        except Exception as exc:  # whatever else the SDK raises: the model sees a tool error
            log.exception("MCP tool '%s' failed unexpectedly", call.name)
            reason = f"Tool '{call.name}' failed: {type(exc).__name__}: {exc}"
            return call.result(provider, "tool_error", reason, reason)
        if outcome.is_error:
            reason = f"Tool '{call.name}' failed: {outcome.output}"
            return call.result(provider, "tool_error", outcome.output, reason)
        return call.result(provider, "success", outcome.output)

    async def _fit(self, results: list[ToolResult], done: Done) -> list[ToolResult]:
        """Results cut to what the context has room for, saying so in the text; a result
        with no room at all is replaced by a note that it was left out."""
        if not results:
            return results
        instance = self.gen.instance
        n_ctx = instance.context_length
        used = done.usage.prompt_tokens + done.usage.completion_tokens
        room = (n_ctx - used - min(ANSWER_RESERVE, n_ctx // 4)) // len(results)

        async def count(text: str) -> int:
            return len(await asyncio.to_thread(instance.engine.tokenize, text))

        fitted = []
        for result in results:
            size = len(result.output)
            # No token is longer than 16 characters: more than this cannot fit.
            text = result.output[: max(room, 0) * 16 + 1]
            tokens = await count(text)
            if tokens <= room and len(text) == size:
                fitted.append(result)
                continue
            marker = (
                f"\n[Truncated: the tool result was {size} characters; only the first "
                f"{size} fit in the model's context of {n_ctx} tokens.]"
            )
            keep_tokens = room - await count(marker)
            if keep_tokens < MIN_RESULT_TOKENS:
                note = (
                    f"[The tool result ({size} characters) was left out: the model's context "
                    f"of {n_ctx} tokens has no room for it.]"
                )
            else:
                keep = text[: len(text) * keep_tokens // tokens]
                while keep and await count(keep) > keep_tokens:
                    keep = keep[: len(keep) * 9 // 10]
                note = keep + marker.replace(f"first {size}", f"first {len(keep)}")
            fitted.append(replace(result, output=note))
        return fitted

    def _feed_back(self, text: str, calls: list[_Call], results: list[ToolResult]) -> None:
        assistant: dict[str, Any] = {
            "role": "assistant",
            "content": text.strip(),
            "tool_calls": [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {
                        "name": c.name,
                        "arguments": c.arguments if c.parsed is None else c.parsed,
                    },
                }
                for c in calls
            ],
        }
        added = [assistant] + [
            {"role": "tool", "tool_call_id": r.call_id, "name": r.name, "content": r.output}
            for r in results
        ]
        self.messages += added
        self.transcript += added

    async def _next_round(self) -> None:
        choice: str | dict[str, str] = "auto"
        if self.request.tool_choice == "none" or self.rounds >= self.max_rounds:
            choice = "none"
        request = replace(
            self.request,
            model=self.gen.instance.id,
            messages=tuple(self.messages),
            tool_choice=choice,
        )
        self.gen = await generate.start(self.manager, request)


async def _argument_problem(arguments: dict[str, Any], schema: dict[str, Any]) -> str | None:
    """Why ``arguments`` do not fit the tool's input schema, or None when they do."""
    # Here, not at the top: only MCP tool calls are checked, and jsonschema takes ≈3 MB. Its
    # first import takes 0.1-0.2 s: in a thread, not on the event loop where every other
    # request's tokens would wait for it (later imports find it in sys.modules).
    await asyncio.to_thread(importlib.import_module, "jsonschema")
    import jsonschema

    try:
        validator = jsonschema.validators.validator_for(schema)(schema)
        error = jsonschema.exceptions.best_match(validator.iter_errors(arguments))
    except Exception:
        # A schema we cannot use (invalid, a bad ``pattern``, an unresolvable ``$ref``) is
        # the server's own business: it judges the call.
        return None
    return error.message[:300] if error is not None else None
