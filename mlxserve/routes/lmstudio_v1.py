"""LM Studio's native REST API v1: models, load, unload, and stateful chat with named SSE
events (``/api/v1/*``). Errors use LM Studio's envelope (``routes.common.error_body_for``)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlxserve.core.chatsession import ChatSession
from mlxserve.core.generate import Generation, check_draft
from mlxserve.core.instance import Instance, Loaded, memory_report
from mlxserve.core.mcp import Toolset
from mlxserve.core.registry import ModelInfo
from mlxserve.core.toolloop import LoopEvent, ToolResult
from mlxserve.core.types import (
    Done,
    Idle,
    InvalidToolCall,
    Progress,
    ReasoningDelta,
    TokenLogprob,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
)
from mlxserve.errors import InvalidRequest, MlxServeError
from mlxserve.http.errors import as_mlxserve_error, lmstudio_error_body
from mlxserve.http.sse import EventStreamResponse, sse
from mlxserve.protocols.lmstudio import (
    ChatRequest,
    LoadModelRequest,
    NamedTool,
    UnloadModelRequest,
)
from mlxserve.routes.common import parse, read_json, unless_disconnected
from mlxserve.state import AppState


def _instance_entry(instance: Loaded) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": instance.id,
        "config": dict(instance.load_config),
        # Ours: what the loading guardrail counts for it.
        "memory_bytes": instance.memory_bytes,
        "memory": memory_report(instance),
    }
    # A model sharded across a distributed group (``serve --distributed``): its ranks.
    describe = getattr(instance.engine, "describe_distributed", None)
    if describe is not None:
        entry["distributed"] = describe()
    return entry


def model_entry(info: ModelInfo, instances: list[Loaded]) -> dict[str, Any]:
    """One model as ``GET /api/v1/models`` lists it."""
    llm = info.type == "llm"
    entry: dict[str, Any] = {
        "type": info.type,
        "publisher": info.publisher,
        "key": info.key,
        "display_name": info.display_name,
    }
    if llm:
        entry["architecture"] = info.architecture
    entry |= {
        "quantization": {"name": info.quantization, "bits_per_weight": info.bits_per_weight},
        "size_bytes": info.size_bytes,
        "params_string": info.params_string or None,
        "loaded_instances": [_instance_entry(i) for i in instances],
        "max_context_length": info.max_context_length,
        "format": info.format,
        # Ours: where it lies ("models", "lmstudio", "hf-cache"); only "models" can be deleted.
        "source": info.source,
    }
    if llm:
        capabilities: dict[str, Any] = {
            "vision": info.vision,
            "trained_for_tool_use": info.trained_for_tool_use,
        }
        if info.reasoning_options:
            capabilities["reasoning"] = {
                "allowed_options": list(info.reasoning_options),
                "default": info.reasoning_default,
            }
        entry["capabilities"] = capabilities
        entry["description"] = info.description
    return entry


async def list_models(request: Request) -> Response:
    state: AppState = request.app.state.mlxserve
    models = [
        model_entry(m, state.manager.instances_of(m.key)) for m in await state.registry.models()
    ]
    return JSONResponse({"models": models})


async def load_model(request: Request) -> Response:
    state: AppState = request.app.state.mlxserve
    body = parse(LoadModelRequest, await read_json(request))
    info = await state.manager.find_model(body.model)
    if body.draft_model is not None:
        await check_draft(state.registry, info, body.draft_model)
    instance = await state.manager.load_any(info, body.to_load_request())
    out: dict[str, Any] = {
        "type": info.type,
        "instance_id": instance.id,
        "load_time_seconds": round(instance.load_seconds, 3),
        "status": "loaded",
    }
    if body.echo_load_config:
        out["load_config"] = dict(instance.load_config)
    return JSONResponse(out)


async def unload_model(request: Request) -> Response:
    state: AppState = request.app.state.mlxserve
    body = parse(UnloadModelRequest, await read_json(request))
    instance = await state.manager.unload(body.instance_id)
    return JSONResponse({"instance_id": instance.id})


Named = tuple[str, dict[str, Any]]


@dataclass
class _Turn:
    """One chat turn as it runs: its output items, its timings, and the named SSE events
    its core events make (the same for the streamed and the whole reply)."""

    instance_id: str
    load_seconds: float | None = None
    started: float = 0.0
    first_at: float | None = None
    ended: float | None = None
    prompt_tokens: int = 0
    items: list[dict[str, Any]] = field(default_factory=list)
    open: str | None = None
    done: Done | None = None
    response_id: str | None = None
    # MCP tools offered to the model, and the call being generated (name, arguments so far).
    toolset: Toolset | None = None
    call: tuple[str, str] | None = None
    held: str = ""
    # Where the final answer's items begin: after the last tool result.
    answer_from: int = 0

    def begin(self, gen: Generation, load_seconds: float | None, started: float) -> None:
        self.instance_id = gen.instance.id
        self.prompt_tokens = gen.prompt_tokens
        self.started = started
        if load_seconds is not None:
            self.load_seconds = load_seconds

    def _switch(self, kind: str | None) -> list[tuple[str, dict[str, Any]]]:
        out: list[tuple[str, dict[str, Any]]] = []
        if self.open == kind:
            return out
        if self.open is not None:
            out.append((f"{self.open}.end", {}))
        if kind is not None:
            out.append((f"{kind}.start", {}))
            self.items.append({"type": kind, "content": ""})
        self.open = kind
        return out

    def _provider(self, name: str) -> dict[str, str]:
        return (self.toolset.provider(name) if self.toolset else None) or {}

    def _tool_call(self, event: ToolCallStart | ToolCallDelta | ToolCallEnd) -> list[Named]:
        if isinstance(event, ToolCallStart):
            out = self._switch(None)
            self.call = (event.name, "")
            provider = self._provider(event.name)
            return [*out, ("tool_call.start", {"tool": event.name, "provider_info": provider})]
        if self.call is None:
            return []
        name, arguments = self.call
        if isinstance(event, ToolCallDelta):
            self.call = (name, arguments + event.arguments)
            return []
        self.call = None
        data = {
            "tool": name,
            "arguments": arguments if event.parsed is None else event.parsed,
            "provider_info": self._provider(name),
        }
        return [("tool_call.arguments", data)]

    def _tool_result(self, result: ToolResult) -> list[Named]:
        """A call's result: a ``tool_call`` item (the output the model was given) or an
        ``invalid_tool_call`` item, with ``tool_call.success`` / ``.failure``."""
        self.answer_from = len(self.items) + 1
        provider = result.provider or {}
        arguments = result.parsed_arguments
        if result.status in ("invalid_name", "invalid_arguments"):
            metadata: dict[str, Any] = {"type": result.status, "tool_name": result.name}
            if result.status == "invalid_arguments":
                metadata |= {"arguments": arguments, "provider_info": provider}
            self.items.append(
                {"type": "invalid_tool_call", "reason": result.reason, "metadata": metadata}
            )
            return [("tool_call.failure", {"reason": result.reason, "metadata": metadata})]
        call = {"tool": result.name, "arguments": arguments}
        self.items.append(
            {"type": "tool_call", **call, "output": result.output, "provider_info": provider}
        )
        if result.status == "success":
            return [
                ("tool_call.success", {**call, "output": result.output, "provider_info": provider})
            ]
        # The tool ran and reported an error (or the connection broke: an ``error`` follows).
        metadata = {
            "type": result.status,
            "tool_name": result.name,
            "arguments": arguments,
            "provider_info": provider,
        }
        return [("tool_call.failure", {"reason": result.reason, "metadata": metadata})]

    def feed(self, event: LoopEvent) -> list[Named]:
        """The named events for one core event."""
        out: list[Named] = []
        if isinstance(event, Progress):
            if self.first_at is None and event.total:
                out.append(
                    ("prompt_processing.progress", {"progress": event.processed / event.total})
                )
            return out
        if isinstance(event, ToolResult):
            return self._tool_result(event)
        if isinstance(event, TokenLogprob):
            return out  # v1 chat has no log probabilities
        if isinstance(event, Idle):
            return out
        if self.first_at is None:
            self.first_at = time.perf_counter()
            out.append(("prompt_processing.progress", {"progress": 1.0}))
            out.append(("prompt_processing.end", {}))
        if isinstance(event, (ToolCallStart, ToolCallDelta, ToolCallEnd)):
            return out + self._tool_call(event)
        if isinstance(event, Done):
            if not any(item["type"] == "message" for item in self.items[self.answer_from :]):
                out += self._switch("message")
            out += self._switch(None)
            self.done = event
            self.ended = time.perf_counter()
            return out
        if isinstance(event, InvalidToolCall):
            return out + self._invalid_call(event)
        kind = "reasoning" if isinstance(event, ReasoningDelta) else "message"
        text = event.text
        if kind == "message" and self.toolset is not None and self.open != "message":
            # The newlines a model writes around its tool calls are no message of their own.
            text, self.held = self.held + text, ""
            if not text.strip():
                self.held = text
                return out
        out += self._switch(kind)
        self.items[-1]["content"] += text
        out.append((f"{kind}.delta", {"content": text}))
        return out

    def _invalid_call(self, event: InvalidToolCall) -> list[Named]:
        """A call the model wrote that cannot be read: LM Studio's ``invalid_tool_call``."""
        out = self._switch(None)
        metadata: dict[str, Any] = {
            "type": "invalid_name" if event.unknown_name else "invalid_arguments",
            "tool_name": event.unknown_name or "",
        }
        reason = f"Invalid tool call: {event.reason}"
        self.items.append({"type": "invalid_tool_call", "reason": reason, "metadata": metadata})
        return [*out, ("tool_call.failure", {"reason": reason, "metadata": metadata})]

    def message_text(self) -> str:
        """The final answer: the message text after the last tool result."""
        answer = self.items[self.answer_from :]
        return "".join(i["content"] for i in answer if i["type"] == "message")

    def stats(self) -> dict[str, Any]:
        usage = self.done.usage if self.done is not None else None
        output_tokens = usage.completion_tokens if usage else 0
        ttft = (self.first_at - self.started) if self.first_at is not None else 0.0
        generating = 0.0
        if self.first_at is not None and self.ended is not None:
            generating = self.ended - self.first_at
            if generating <= 1e-6:
                generating = self.ended - self.started
        stats: dict[str, Any] = {
            "input_tokens": usage.prompt_tokens if usage else self.prompt_tokens,
            "total_output_tokens": output_tokens,
            "reasoning_output_tokens": usage.reasoning_tokens if usage else 0,
            # Of input_tokens, those served from the prompt cache.
            "cached_input_tokens": usage.cached_tokens if usage else 0,
            "tokens_per_second": round(output_tokens / generating, 3) if generating > 0 else 0.0,
            "time_to_first_token_seconds": round(max(ttft, 0.0), 3),
        }
        if self.load_seconds is not None:
            stats["model_load_time_seconds"] = round(self.load_seconds, 3)
        done = self.done
        if done is not None and done.draft is not None and done.draft_model is not None:
            stats["draft_model"] = done.draft_model
            stats["total_draft_tokens_count"] = done.draft.total
            stats["accepted_draft_tokens_count"] = done.draft.accepted
            stats["rejected_draft_tokens_count"] = done.draft.rejected
            stats["ignored_draft_tokens_count"] = done.draft.ignored
        return stats

    def result(self) -> dict[str, Any]:
        items = [i for i in self.items if i["type"] != "reasoning" or i["content"]]
        body: dict[str, Any] = {
            "model_instance_id": self.instance_id,
            "output": items,
            "stats": self.stats(),
        }
        if self.response_id is not None:
            body["response_id"] = self.response_id
        return body


@dataclass
class _Chat:
    """A parsed chat request: the messages to send, how to store them, and its session."""

    state: AppState
    body: ChatRequest
    messages: list[dict[str, Any]]
    new_messages: list[dict[str, Any]]
    session: ChatSession

    @property
    def toolset(self) -> Toolset | None:
        return self.session.toolset

    async def connect(self) -> None:
        """Connect to the request's MCP servers; the tool choice must name what they offer."""
        toolset = await self.session.connect(self.body.requested_servers())
        if toolset is None:
            return
        choice = self.body.tool_choice
        names = toolset.tools
        if choice == "required" and not names:
            raise InvalidRequest(
                "tool_choice 'required' needs tools, and the integrations offer none.",
                param="tool_choice",
            )
        if isinstance(choice, NamedTool) and choice.name not in names:
            raise InvalidRequest(
                f"tool_choice names '{choice.name}', which no integration offers.",
                param="tool_choice",
            )

    def events(self, idle: float | None = None) -> AsyncIterator[LoopEvent]:
        return self.session.events(idle)

    async def end(self) -> None:
        """Stop the generation (whichever round is running) and close the MCP sessions."""
        await self.session.close()

    async def begin(self, model: str) -> tuple[Generation, float | None, float]:
        """Resolve (loading if needed) and queue the generation. Returns it, the load time if
        this request loaded the model, and when it was queued."""
        body = self.body
        temperature = self.state.settings.default_temperature
        return await self.session.start(
            body.to_core(model, self.messages, temperature), context_length=body.context_length
        )

    async def store(self, turn: _Turn) -> None:
        if not self.body.store or turn.done is None:
            return
        turn.response_id = await self.session.save(
            parent_id=self.body.previous_response_id,
            system=self.body.system_prompt,
            input=self.new_messages,
            answer=[{"role": "assistant", "content": turn.message_text()}],
        )

    async def run(self, turn: _Turn) -> _Turn:
        async for event in self.events():
            turn.feed(event)
            if turn.done is not None:
                break
        await self.store(turn)
        return turn


def _named(name: str, data: dict[str, Any]) -> str:
    return sse({"type": name, **data}, event=name)


async def _events(
    chat: _Chat, turn: _Turn, gen: Generation | None, load: ModelInfo | None
) -> AsyncIterator[str]:
    """LM Studio's named events: always ``chat.start`` first and ``chat.end`` last, with an
    ``error`` event before it if something failed after the stream began."""
    ping = chat.state.settings.sse_ping_seconds
    yield _named("chat.start", {"model_instance_id": turn.instance_id})
    try:
        if gen is None:
            assert load is not None
            yield _named("model_load.start", {"model_instance_id": turn.instance_id})
            waited = time.perf_counter()
            gen, load_seconds, started = await chat.begin(load.key)
            loaded = load_seconds if load_seconds is not None else started - waited
            turn.begin(gen, loaded, started)
            ids = {"model_instance_id": turn.instance_id}
            yield _named("model_load.progress", {**ids, "progress": 1.0})
            yield _named("model_load.end", {**ids, "load_time_seconds": round(loaded, 3)})
        yield _named("prompt_processing.start", {})
        async for event in chat.events(ping):
            if isinstance(event, Idle):
                yield ": ping\n\n"
                continue
            for name, data in turn.feed(event):
                yield _named(name, data)
            if turn.done is not None:
                break
        await chat.store(turn)
    except Exception as exc:
        yield _named("error", lmstudio_error_body(as_mlxserve_error(exc)))
    finally:
        await chat.end()
    yield _named("chat.end", {"result": turn.result()})


async def chat(request: Request) -> Response:
    state: AppState = request.app.state.mlxserve
    body = parse(ChatRequest, await read_json(request))
    body.check_supported()
    system = body.system_prompt
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        conversation = await state.chats.aconversation(body.previous_response_id)
        history = conversation.messages
        system = system or conversation.system
    new_messages = body.user_messages()
    messages = [{"role": "system", "content": system}] if system else []
    messages += [*history, *new_messages]
    session = ChatSession(state.settings, state.manager, state.mcp, state.chats)
    chat = _Chat(state, body, messages, new_messages, session)
    try:
        target = await state.manager.resolve(body.model)
        await chat.connect()
        if body.stream and not isinstance(target, Instance):
            # The load happens inside the stream, so that its events can be sent as it goes.
            turn = _Turn(state.manager.next_instance_id(target.key), toolset=chat.toolset)
            return EventStreamResponse(_events(chat, turn, None, target), on_close=chat.end)
        gen, load_seconds, started = await chat.begin(body.model)
        turn = _Turn(gen.instance.id, toolset=chat.toolset)
        turn.begin(gen, load_seconds, started)
        if body.stream:
            return EventStreamResponse(_events(chat, turn, gen, None), on_close=chat.end)
    except BaseException:
        await chat.end()
        raise
    try:
        finished = await unless_disconnected(request, chat.run(turn))
    finally:
        await chat.end()
    if finished is None:
        return Response(status_code=204)
    if finished.done is None:
        raise MlxServeError("generation ended without a result")
    return JSONResponse(finished.result())


routes = [
    Route("/api/v1/models", list_models, methods=["GET"]),
    Route("/api/v1/models/load", load_model, methods=["POST"]),
    Route("/api/v1/models/unload", unload_model, methods=["POST"]),
    Route("/api/v1/chat", chat, methods=["POST"]),
]
