"""OpenAI Responses API: ``POST /v1/responses``.

An adapter over the one generation path: the request becomes a core request (with the stored
history of ``previous_response_id`` in front), the core's events are cut into output items by
:class:`~mlxserve.routes.blocks.Blocks`, and the items are rendered as Responses events
(streamed, each with its ``sequence_number``) or gathered into one response object. Stored
turns go into the chat store shared with LM Studio's ``/api/v1/chat``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlxserve.core.chatsession import ChatSession
from mlxserve.core.chatstore import new_response_id
from mlxserve.core.mcp import Toolset
from mlxserve.core.sealed import ReasoningSeal
from mlxserve.core.toolloop import LoopEvent, ToolResult
from mlxserve.core.types import Candidate, CoreRequest, Done, Idle, TokenLogprob
from mlxserve.errors import InvalidRequest, MlxServeError
from mlxserve.http.errors import as_mlxserve_error
from mlxserve.http.sse import EventStreamResponse, sse
from mlxserve.protocols.responses import McpChoice, ResponsesRequest
from mlxserve.routes.blocks import Appended, Block, Blocks, Change, Opened, gather
from mlxserve.routes.common import parse, read_json, unless_disconnected
from mlxserve.state import AppState

_PREFIX = {"text": "msg", "reasoning": "rs", "tool": "fc"}
# The core names request fields as chat completions does; say them as this API does.
_FIELDS = {"response_format": "text.format", "messages": "input"}


def _text_part(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def _logprob_entry(event: TokenLogprob) -> dict[str, Any]:
    def one(c: Candidate) -> dict[str, Any]:
        return {"token": c.token, "logprob": c.logprob, "bytes": list(c.bytes)}

    return one(event.sampled) | {"top_logprobs": [one(c) for c in event.top]}


def _reasoning_part(text: str) -> dict[str, Any]:
    return {"type": "reasoning_text", "text": text}


# The content part each kind of item has (function calls have none).
_PART = {"text": "output_text", "reasoning": "reasoning_text"}


def _part(kind: str, text: str) -> dict[str, Any]:
    return _text_part(text) if kind == "text" else _reasoning_part(text)


def _check_choice(body: ResponsesRequest, toolset: Toolset) -> None:
    """A ``tool_choice`` naming an MCP tool must name one its server offers."""
    choice = body.tool_choice
    if isinstance(choice, McpChoice) and choice.name is not None:
        entry = toolset.tools.get(choice.name)
        if entry is None or entry[0].server.label != choice.server_label:
            raise InvalidRequest(
                f"tool_choice names '{choice.name}', which MCP server "
                f"'{choice.server_label}' does not offer.",
                param="tool_choice",
            )


def _redacted(tool: Any) -> Any:
    """A request's tool as the response echoes it: an MCP tool's credentials left out."""
    if isinstance(tool, dict) and tool.get("type") == "mcp":
        return {k: v for k, v in tool.items() if k not in ("headers", "authorization")}
    return tool


class ResponseRenderer:
    """One response: its object (at any point of its life) and the stream events that lead
    there. Streamed and gathered responses go through the same steps, so they agree."""

    def __init__(
        self,
        body: ResponsesRequest,
        raw: dict[str, Any],
        core: CoreRequest,
        model: str,
        seal: ReasoningSeal,
    ) -> None:
        self.id = new_response_id()
        self.body = body
        self.seal = seal
        # Reasoning items carry their text sealed in encrypted_content when asked to.
        self.encrypt_reasoning = body.wants_encrypted_reasoning()
        # A namespace function's name for the model -> (namespace, name).
        self.namespaced = body.namespaced()
        self.raw = raw
        self.core = core
        self.model = model
        self.created_at = int(time.time())
        self.blocks = Blocks()
        # Output items by output index (an MCP call's item is done after later ones opened).
        self.output: dict[int, dict[str, Any]] = {}
        self.status = "in_progress"
        self.done: Done | None = None
        self.error: dict[str, Any] | None = None
        self._item_ids: dict[int, str] = {}
        # MCP: the servers' tools; the tool listings come first, so blocks' output indexes
        # are offset by their count; MCP calls wait for their results by call id; the final
        # answer's blocks begin after the last result.
        self.toolset: Toolset | None = None
        self.offset = 0
        self._calls: dict[str, Block] = {}
        self.answer_from = 0
        # Log probabilities of tokens whose text has not reached a block yet, and those of
        # each text block's tokens (reasoning and tool-call tokens have none here).
        self._pending: list[dict[str, Any]] = []
        self._logprobs: dict[int, list[dict[str, Any]]] = {}

    # -- the response object

    def response(self) -> dict[str, Any]:
        done = self.done
        incomplete = {"reason": "max_output_tokens"} if self.status == "incomplete" else None
        finished = self.status in ("completed", "incomplete")
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "completed_at": int(time.time()) if finished else None,
            "status": self.status,
            "model": self.model,
            "output": [item for _, item in sorted(self.output.items())],
            "usage": self._usage(done) if done is not None else None,
            "previous_response_id": self.body.previous_response_id,
            "instructions": self.body.instructions,
            "error": self.error,
            "incomplete_details": incomplete,
            "parallel_tool_calls": self.core.parallel_tool_calls,
            "tool_choice": self.raw.get("tool_choice") or "auto",
            "tools": [_redacted(t) for t in self.raw.get("tools") or []],
            "temperature": self.core.sampling.temperature,
            "top_p": self.core.sampling.top_p,
            "max_output_tokens": self.body.max_output_tokens,
            "text": self.raw.get("text") or {"format": {"type": "text"}},
            "reasoning": {"effort": self.body.reasoning.effort if self.body.reasoning else None},
            "store": self.body.store,
            "metadata": self.raw.get("metadata") or {},
            "truncation": "disabled",
            "background": False,
        }

    @staticmethod
    def _usage(done: Done) -> dict[str, Any]:
        return {
            "input_tokens": done.usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": done.usage.cached_tokens},
            "output_tokens": done.usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": done.usage.reasoning_tokens},
            "total_tokens": done.usage.total_tokens,
        }

    def opening(self) -> list[dict[str, Any]]:
        return [
            {"type": "response.created", "response": self.response()},
            {"type": "response.in_progress", "response": self.response()},
        ]

    def feed(self, event: LoopEvent) -> list[dict[str, Any]]:
        if isinstance(event, ToolResult):
            return self.tool_result(event)
        if isinstance(event, TokenLogprob):
            self._pending.append(_logprob_entry(event))
            return []
        return self._render(self.blocks.feed(event))

    # -- MCP

    def listed(self, toolset: Toolset) -> list[dict[str, Any]]:
        """The ``mcp_list_tools`` items, one per server, before any output of the model."""
        self.toolset = toolset
        out: list[dict[str, Any]] = []
        for index, (spec, tools) in enumerate(toolset.listed):
            item: dict[str, Any] = {
                "id": f"mcpl_{uuid.uuid4().hex}",
                "type": "mcp_list_tools",
                "server_label": spec.label,
                "tools": [],
            }
            where = {"output_index": index, "item_id": item["id"]}
            out.append({"type": "response.output_item.added", "output_index": index, "item": item})
            out.append({"type": "response.mcp_list_tools.in_progress", **where})
            item = {
                **item,
                "tools": [
                    {
                        "name": t.name,
                        "description": t.description,
                        "input_schema": t.input_schema,
                        "annotations": t.annotations,
                    }
                    for t in tools
                ],
            }
            out.append({"type": "response.mcp_list_tools.completed", **where})
            out.append({"type": "response.output_item.done", "output_index": index, "item": item})
            self.output[index] = item
        self.offset = len(toolset.listed)
        return out

    def _mcp(self, block: Block) -> bool:
        return (
            block.kind == "tool" and self.toolset is not None and block.name in self.toolset.tools
        )

    def tool_result(self, result: ToolResult) -> list[dict[str, Any]]:
        """An MCP call's outcome: its item completes (or fails) with the output."""
        block = self._calls.pop(result.call_id, None)
        if block is None:
            return []
        self.answer_from = len(self.blocks.blocks)
        failed = result.status != "success"
        item = self._item(block, "failed" if failed else "completed", whole=True)
        if result.status == "success":
            item["output"] = result.output
        elif result.status == "tool_error":
            item["error"] = {
                "type": "mcp_tool_execution_error",
                "content": [{"type": "text", "text": result.output}],
            }
        elif result.status == "connection_error":
            item["error"] = {"type": "http_error", "code": 424, "message": result.reason}
        else:
            item["error"] = {"type": "mcp_protocol_error", "code": -32602, "message": result.reason}
        index = block.index + self.offset
        self.output[index] = item
        where = self._where(block)
        return [
            {"type": f"response.mcp_call.{'failed' if failed else 'completed'}", **where},
            {"type": "response.output_item.done", "output_index": index, "item": item},
        ]

    def finish(self, done: Done) -> list[dict[str, Any]]:
        """Close the open item and settle the status; :meth:`terminal` comes after."""
        self.done = done
        self.status = "incomplete" if done.finish_reason == "length" else "completed"
        return self._render(self.blocks.finish())

    def terminal(self) -> dict[str, Any]:
        return {"type": f"response.{self.status}", "response": self.response()}

    def failed(self, exc: MlxServeError) -> dict[str, Any]:
        self.status = "failed"
        self.error = {"code": "server_error", "message": exc.message}
        return {"type": "response.failed", "response": self.response()}

    # -- output items

    def _item(self, block: Block, status: str, *, whole: bool) -> dict[str, Any]:
        item_id = self._item_ids[block.index]
        if self._mcp(block):
            assert self.toolset is not None
            return {
                "id": item_id,
                "type": "mcp_call",
                "status": status,
                "server_label": self.toolset.tools[block.name][0].server.label,
                "name": block.name,
                "arguments": block.text if whole else "",
                "output": None,
                "error": None,
            }
        if block.kind == "text":
            content = [_text_part(block.text, self._logprobs.get(block.index))] if whole else []
            return {
                "id": item_id,
                "type": "message",
                "role": "assistant",
                "status": status,
                "content": content,
            }
        if block.kind == "reasoning":
            content = [_reasoning_part(block.text)] if whole else []
            item: dict[str, Any] = {
                "id": item_id,
                "type": "reasoning",
                "summary": [],
                "content": content,
                "status": status,
            }
            if self.encrypt_reasoning:
                item["encrypted_content"] = self.seal.seal(block.text) if whole else None
            return item
        call: dict[str, Any] = {
            "id": item_id,
            "type": "function_call",
            "status": status,
            "call_id": block.call_id,
            "name": block.name,
            "arguments": block.text if whole else "",
        }
        if block.name in self.namespaced:
            call["namespace"], call["name"] = self.namespaced[block.name]
        return call

    def _render(self, changes: list[Change]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for change in changes:
            if isinstance(change, Opened):
                out += self._opened(change.block)
            elif isinstance(change, Appended):
                out.append(self._appended(change.block, change.text))
            else:
                out += self._closed(change.block)
        return out

    def _where(self, block: Block) -> dict[str, Any]:
        where: dict[str, Any] = {
            "output_index": block.index + self.offset,
            "item_id": self._item_ids[block.index],
        }
        if block.kind != "tool":
            where["content_index"] = 0
        return where

    def _opened(self, block: Block) -> list[dict[str, Any]]:
        prefix = "mcp" if self._mcp(block) else _PREFIX[block.kind]
        self._item_ids[block.index] = f"{prefix}_{uuid.uuid4().hex}"
        item = self._item(block, "in_progress", whole=False)
        index = block.index + self.offset
        out = [{"type": "response.output_item.added", "output_index": index, "item": item}]
        if block.kind != "tool":
            part = _part(block.kind, "")
            out.append({"type": "response.content_part.added", **self._where(block), "part": part})
        return out

    def _appended(self, block: Block, text: str) -> dict[str, Any]:
        if block.kind == "tool":
            name = "response.function_call_arguments.delta"
            if self._mcp(block):
                name = "response.mcp_call_arguments.delta"
            return {"type": name, **self._where(block), "delta": text}
        event = {"type": f"response.{_PART[block.kind]}.delta", **self._where(block), "delta": text}
        pending, self._pending = self._pending, []
        if block.kind == "text":
            self._logprobs.setdefault(block.index, []).extend(pending)
            event["logprobs"] = pending
        return event

    def _closed(self, block: Block) -> list[dict[str, Any]]:
        where = self._where(block)
        out: list[dict[str, Any]] = []
        if self._mcp(block):
            # The call runs once the model's turn ends; its item is done with its result.
            self._calls[block.call_id] = block
            return [
                {"type": "response.mcp_call_arguments.done", **where, "arguments": block.text},
                {"type": "response.mcp_call.in_progress", **where},
            ]
        if block.kind == "tool":
            name = "response.function_call_arguments.done"
            call = self.namespaced.get(block.name, (None, block.name))[1]
            out.append({"type": name, **where, "name": call, "arguments": block.text})
        else:
            done = {"type": f"response.{_PART[block.kind]}.done", **where, "text": block.text}
            logprobs = self._logprobs.get(block.index, [])
            if block.kind == "text":
                done["logprobs"] = logprobs
            part = (
                _text_part(block.text, logprobs)
                if block.kind == "text"
                else _part(block.kind, block.text)
            )
            out += [done, {"type": "response.content_part.done", **where, "part": part}]
        status = "incomplete" if self.status == "incomplete" else "completed"
        item = self._item(block, status, whole=True)
        self.output[block.index + self.offset] = item
        out.append(
            {
                "type": "response.output_item.done",
                "output_index": where["output_index"],
                "item": item,
            }
        )
        return out

    def template_output(self) -> list[dict[str, Any]]:
        """The reply as one chat-template assistant message, for the chat store (with MCP
        calls, the answer after them: the tool loop keeps the calls' messages)."""
        blocks = self.blocks.blocks[self.answer_from :]
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(b.text for b in blocks if b.kind == "text"),
        }
        reasoning = "".join(b.text for b in blocks if b.kind == "reasoning")
        if reasoning:
            message["reasoning_content"] = reasoning
        calls = [
            {
                "id": b.call_id,
                "type": "function",
                "function": {"name": b.name, "arguments": b.text if b.parsed is None else b.parsed},
            }
            for b in blocks
            if b.kind == "tool"
        ]
        if calls:
            message["tool_calls"] = calls
        return [message]


async def _stream(
    session: ChatSession,
    renderer: ResponseRenderer,
    save: Callable[[], Awaitable[None]],
    ping_seconds: float,
    toolset: Toolset | None = None,
) -> AsyncIterator[str]:
    """Responses SSE: named events, numbered from 0, ending on a terminal event (no [DONE])."""
    sequence = 0

    def emit(event: dict[str, Any]) -> str:
        nonlocal sequence
        event["sequence_number"] = sequence
        sequence += 1
        return sse(event, event["type"])

    try:
        for event in renderer.opening():
            yield emit(event)
        for event in renderer.listed(toolset) if toolset is not None else []:
            yield emit(event)
        async for item in session.events(ping_seconds):
            if isinstance(item, Idle):
                yield ": ping\n\n"
                continue
            if isinstance(item, Done):
                for event in renderer.finish(item):
                    yield emit(event)
                await save()
                yield emit(renderer.terminal())
                return
            for event in renderer.feed(item):
                yield emit(event)
    except Exception as exc:  # whatever fails, the client gets the dialect's error event
        yield emit(renderer.failed(as_mlxserve_error(exc)))
    finally:
        await session.close()


async def create_response(request: Request) -> Response:
    state: AppState = request.app.state.mlxserve
    raw = await read_json(request)
    body = parse(ResponsesRequest, raw)
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        history = (await state.chats.aconversation(body.previous_response_id)).messages
    core = body.to_core(state.settings.default_temperature, history, state.seal)
    session = ChatSession(state.settings, state.manager, state.mcp, state.chats)
    try:
        toolset = await session.connect(body.requested_servers())
        if toolset is not None:
            _check_choice(body, toolset)
        try:
            gen, _, _ = await session.start(core)
        except InvalidRequest as exc:
            exc.param = _FIELDS.get(exc.param or "", exc.param)
            raise
        renderer = ResponseRenderer(body, raw, core, gen.instance.id, state.seal)
    except BaseException:
        await session.close()  # a generation queued already must not run on to max_tokens
        raise

    async def save() -> None:
        if body.store:
            await session.save(
                response_id=renderer.id,
                parent_id=body.previous_response_id,
                system=body.instructions,
                input=body.input_messages(state.seal),
                answer=renderer.template_output(),
                reply=renderer.response(),
            )

    if body.stream:
        ping = state.settings.sse_ping_seconds
        return EventStreamResponse(
            _stream(session, renderer, save, ping, toolset), on_close=session.close
        )

    if toolset is not None:
        renderer.listed(toolset)
    try:
        finished = await unless_disconnected(request, gather(session, renderer))
    finally:
        await session.close()
    if finished is None:
        return Response(status_code=204)
    if not finished:
        raise MlxServeError("generation ended without a result")
    await save()
    return JSONResponse(renderer.response())


routes = [Route("/v1/responses", create_response, methods=["POST"])]
