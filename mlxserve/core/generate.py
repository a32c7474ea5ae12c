"""The one path every generation takes: model, prompt, engine, and back as core events."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends.base import (
    DraftStats,
    DraftUnsupported,
    EngineError,
    Finished,
    GenerationRequest,
    PromptProgress,
    Token,
    TokenLogprobs,
    TokenStream,
    VisionPrompt,
)
from backends.constraint import GrammarConstraint, GrammarError
from backends.owner import QueueFull
from mlxserve.core import images
from mlxserve.core.families import OutputParser
from mlxserve.core.families.base import ReasoningOptions, check_setting
from mlxserve.core.families.history import check_tool_results
from mlxserve.core.grammar import json_schema_grammar, lark_grammar
from mlxserve.core.instance import Instance
from mlxserve.core.manager import ModelManager
from mlxserve.core.metrics import note_model
from mlxserve.core.registry import ModelInfo, Registry
from mlxserve.core.system_messages import arrange_system
from mlxserve.core.textstream import TextAssembler
from mlxserve.core.types import (
    Candidate,
    CoreRequest,
    Done,
    Event,
    Idle,
    Progress,
    ReasoningDelta,
    TextDelta,
    TokenLogprob,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)
from mlxserve.errors import (
    ContextLengthExceeded,
    EngineFailure,
    GenerationCancelled,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
)

log = logging.getLogger("mlxserve.generate")

REASONING_ALIASES = {"none": "off"}


class OutputPipeline:
    """Token ids -> text (stop strings) -> the model family's parser (reasoning, tool calls,
    control markers): the same for every dialect and every backend."""

    def __init__(self, assembler: TextAssembler, parser: OutputParser | None) -> None:
        self.assembler = assembler
        self.parser = parser
        self.reasoning_tokens = 0
        # The arguments text of each call so far, by index: parsed once when it ends.
        self._arguments: dict[int, str] = {}

    @property
    def stopped(self) -> bool:
        return self.assembler.stopped

    @property
    def stop_sequence(self) -> str | None:
        return self.assembler.stop_sequence

    @property
    def called_tools(self) -> bool:
        return bool(self.parser and self.parser.calls)

    def token(self, token_id: int) -> list[Event]:
        text = self.assembler.add(token_id)
        out = self._text(text, final=self.assembler.stopped)
        if self.parser is not None and (
            self.parser.in_reasoning or any(isinstance(e, ReasoningDelta) for e in out)
        ):
            self.reasoning_tokens += 1
        return out

    def finish(self) -> list[Event]:
        return self._text(self.assembler.finish(), final=True)

    def _text(self, text: str, *, final: bool) -> list[Event]:
        if self.parser is None:
            return [TextDelta(text)] if text else []
        out: list[Event] = self._calls(self.parser.feed(text)) if text else []
        if final:
            out += self._calls(self.parser.finish())
        return out

    def _calls(self, events: Iterable[Event]) -> list[Event]:
        """The parser's events, each call's end carrying its arguments parsed."""
        out: list[Event] = []
        for event in events:
            if isinstance(event, ToolCallStart):
                self._arguments[event.index] = ""
            elif isinstance(event, ToolCallDelta):
                self._arguments[event.index] = (
                    self._arguments.get(event.index, "") + event.arguments
                )
            elif isinstance(event, ToolCallEnd):
                event = ToolCallEnd(event.index, _object(self._arguments.pop(event.index, "")))
            out.append(event)
        return out


def _object(arguments: str) -> dict[str, Any] | None:
    """A call's arguments text as the JSON object it should be; None when it is not one."""
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


class Generation:
    """A request admitted to an engine. Iterate :meth:`events`; :meth:`cancel` (or leaving the
    iteration early) stops the engine's work for it."""

    def __init__(
        self, instance: Instance, prompt_tokens: int, stream: TokenStream, output: OutputPipeline
    ) -> None:
        self.instance = instance
        self.prompt_tokens = prompt_tokens
        self._stream = stream
        self._output = output
        # Prompt tokens the engine took from its prompt cache instead of processing them.
        self.cached_tokens = 0
        self._queued_at = time.perf_counter()
        # The draft model's key, when the request named one.
        self.draft_model: str | None = None

    def cancel(self) -> None:
        self._stream.cancel()

    def _done(
        self,
        reason: str,
        generated: int,
        draft: DraftStats | None = None,
        cache_written: int = 0,
    ) -> Done:
        finish = "stop" if reason == "stop" else "length"
        if finish == "stop" and self._output.called_tools:
            finish = "tool_calls"
        usage = Usage(
            self.prompt_tokens,
            generated,
            self._output.reasoning_tokens,
            self.cached_tokens,
            cache_written,
        )
        stop = self._output.stop_sequence if finish == "stop" else None
        return Done(finish, usage, stop, self.draft_model, draft)  # type: ignore[arg-type]

    def _candidate(self, token_id: int, logprob: float) -> Candidate:
        raw = self.instance.engine.token_bytes(token_id)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return Candidate(text, raw, logprob)

    def _logprob(self, token_id: int, logprobs: TokenLogprobs) -> TokenLogprob:
        top = tuple(self._candidate(t, v) for t, v in logprobs.top)
        return TokenLogprob(self._candidate(token_id, logprobs.logprob), top)

    async def events(self, idle_seconds: float | None = None) -> AsyncIterator[Event]:
        """The generation's events; :class:`Idle` after each ``idle_seconds`` of silence."""
        generated = 0
        meter = self.instance.meter
        running = False
        first_token: float | None = None
        last_token = 0.0
        if meter is not None:
            meter.queued()
        try:
            while True:
                batch = await self._stream.next_batch(idle_seconds or None)
                if not batch:
                    yield Idle()
                if batch and not running:
                    running = True
                    if meter is not None:
                        meter.started()
                for item in batch:
                    if isinstance(item, Token):
                        generated += 1
                        last_token = time.perf_counter()
                        if first_token is None:
                            first_token = last_token
                            if meter is not None:
                                meter.first_token(first_token - self._queued_at)
                        if item.logprobs is not None:
                            yield self._logprob(item.id, item.logprobs)
                        for event in self._output.token(item.id):
                            yield event
                        if self._output.stopped:
                            self._stream.cancel()
                            yield self._done("stop", generated)
                            return
                    elif isinstance(item, PromptProgress):
                        self.cached_tokens = max(self.cached_tokens, item.cached)
                        yield Progress(item.processed, item.total, item.cached)
                    elif isinstance(item, Finished):
                        if item.reason == "cancelled":
                            raise GenerationCancelled(
                                "The generation was stopped before it ended: its model is "
                                "being unloaded or the server is shutting down."
                            )
                        for event in self._output.finish():
                            yield event
                        yield self._done(
                            item.reason, item.generated, item.draft, item.cache_written
                        )
                        return
        except EngineError as exc:
            raise EngineFailure(f"Generation failed: {exc}") from exc
        finally:
            self._stream.cancel()
            if meter is not None:
                meter.ended(was_running=running)
                meter.finished(
                    prompt_tokens=self.prompt_tokens,
                    generated=generated,
                    cached=self.cached_tokens,
                    decode_seconds=None if first_token is None else last_token - first_token,
                )


@dataclass
class _Plan:
    """What a request needs beyond its messages: template arguments, a grammar, the tools the
    reply may call, and whether it reasons."""

    messages: list[dict[str, Any]]
    template_kwargs: dict[str, Any]
    grammar: str | None = None
    functions: list[dict[str, Any]] = field(default_factory=list)
    reasoning: bool = False


def _plan(instance: Instance, request: CoreRequest) -> _Plan:
    loaded = instance.family
    family, source = loaded.family, loaded.template
    messages = arrange_system(instance.template, list(request.messages or ()))
    check_tool_results(messages)
    plan = _Plan(messages, dict(request.template_kwargs))
    if request.tools and request.tool_choice != "none":
        functions = list(request.tools)
        plan.functions = functions
        prompt = None if family.takes_tools(source) else family.tool_prompt(functions)
        if prompt is not None:
            plan.messages = _with_system(plan.messages, prompt)
        else:
            plan.template_kwargs["tools"] = [template_tool(f) for f in functions]
        forced = request.tool_choice
        if forced == "required" or isinstance(forced, dict):
            chosen = functions
            if isinstance(forced, dict):
                chosen = [f for f in functions if f["name"] == forced["name"]]
            parallel = request.parallel_tool_calls and not isinstance(forced, dict)
            lark = family.call_grammar(chosen, parallel, loaded.lit)
            plan.grammar = lark_grammar(lark, "tools")
    if plan.grammar is None and request.json_schema is not None:
        plan.grammar = json_schema_grammar(request.json_schema, "response_format")
    setting = REASONING_ALIASES.get(request.reasoning or "", request.reasoning)
    if setting is not None and request.reasoning_optional:
        setting = _wished(setting, family.reasoning_options(source), instance.id)
    kwargs = family.reasoning_kwargs(setting, source, constrained=plan.grammar is not None)
    for key, value in kwargs.items():
        plan.template_kwargs.setdefault(key, value)
    if plan.grammar is None:
        plan.messages = family.reasoning_messages(plan.messages, setting, source)
    # Last, so that the family reshapes what was added too (the tool prompt, for Gemma's
    # templates that take no system message).
    plan.messages = family.prepare_messages(plan.messages)
    plan.reasoning = family.reasoning_options(source) is not None and not (
        plan.grammar is not None or setting == "off"
    )
    return plan


def _wished(setting: str, options: ReasoningOptions | None, model: str) -> str | None:
    """A reasoning setting that was only a wish (an agent's adaptive thinking), as the model
    can take it: its default where it cannot take the setting, nothing where it does not
    reason (logged)."""
    try:
        check_setting(setting, options)
        return setting
    except InvalidRequest:
        fallback = options.default if options is not None else None
        log.info("model %s cannot take reasoning %r; using %s", model, setting, fallback)
        return fallback


def template_tool(function: dict[str, Any]) -> dict[str, Any]:
    """A function as chat templates expect a tool: Hugging Face's shape, which always has a
    ``description`` (gpt-oss's, Hermes's and other templates fail without one)."""
    return {
        "type": "function",
        "function": {"name": function["name"], "description": "", **function},
    }


def _with_system(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        first["content"] = f"{first.get('content') or ''}\n\n{text}".strip()
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


async def _prompt(
    instance: Instance, request: CoreRequest, plan: _Plan, policy: images.ImagePolicy
) -> tuple[str, list[int], VisionPrompt | None]:
    """The rendered prompt and its token ids (image positions expanded), and for a prompt
    with images what the engine prepared of them."""
    engine = instance.engine
    info = engine.info
    if request.messages is not None:
        pictures = images.images_in(plan.messages)
        if pictures and not info.vision:
            raise InvalidRequest(
                f"Model '{instance.id}' does not support image input.", param=pictures[0].param
            )
        messages = plan.messages
        if pictures and info.image_marker is not None:
            messages = images.with_markers(messages, info.image_marker)
        # Off the event loop: a long conversation's template can take milliseconds to render.
        text = await asyncio.to_thread(
            functools.partial(
                instance.template.render,
                messages,
                add_generation_prompt=True,
                **plan.template_kwargs,
            )
        )
        if pictures:
            if any(p.url is not None for p in pictures):
                raise InvalidRequest("Image URLs are not accepted here; send data URLs.")
            decoded = await asyncio.to_thread(
                lambda: [images.decode(p, policy, info.image_max_pixels) for p in pictures]
            )
            vision = await asyncio.to_thread(engine.prepare_vision, text, decoded)
            return text, list(vision.tokens), vision
        tokens = await asyncio.to_thread(engine.tokenize, text)
    else:
        text = request.prompt or ""
        tokens = await asyncio.to_thread(engine.tokenize, text)
        if info.bos_token_id is not None and tokens[:1] != [info.bos_token_id]:
            tokens.insert(0, info.bos_token_id)
    return text, tokens, None


async def rendered_prompt(
    instance: Instance, request: CoreRequest, policy: images.ImagePolicy
) -> str:
    """The prompt text :func:`start` gives ``instance`` for ``request``: the same planning
    (tool prompt or template tools, reasoning switch, the family's message handling)."""
    text, _, _ = await _prompt(instance, request, _plan(instance, request), policy)
    return text


async def count_prompt_tokens(manager: ModelManager, request: CoreRequest) -> int:
    """How many tokens ``request``'s prompt is, rendered exactly as :func:`start` renders it."""
    policy = images.ImagePolicy.from_settings(manager.settings)
    request = await images.fetch_all(request, policy)
    async with manager.lease(request.model, ttl=request.ttl) as instance:
        _, tokens, _ = await _prompt(instance, request, _plan(instance, request), policy)
    return len(tokens)


async def start(manager: ModelManager, request: CoreRequest) -> Generation:
    """Resolve the model, render and tokenize the prompt, check it fits, and queue it.

    Everything that can be the client's fault is raised here, before a response starts.
    """
    policy = images.ImagePolicy.from_settings(manager.settings)
    request = await images.fetch_all(request, policy)
    # Leased until the work is queued on the engine, which then finishes it before it closes.
    async with manager.lease(request.model, ttl=request.ttl) as instance:
        draft = await draft_for(manager, instance, request)
        return await admit(
            instance, request, policy, manager.settings.max_output_tokens, draft=draft
        )


async def check_draft(registry: Registry, main: ModelInfo, name: str) -> ModelInfo:
    """The draft model ``name``, if it exists and is a text model of ``main``'s format."""
    info = await registry.find(name)
    if info is None:
        raise ModelNotFound(name)
    if info.type != "llm" or info.format != main.format:
        raise InvalidRequest(
            f"Draft model '{info.key}' ({info.format} {info.type}) cannot draft for "
            f"'{main.key}' ({main.format}): a draft must be a text model of the same format.",
            param="draft_model",
        )
    return info


async def draft_for(manager: ModelManager, instance: Instance, request: CoreRequest) -> Path | None:
    """The draft model's folder (the request's, else the instance's load-time default),
    loaded into ``instance``'s engine, or None."""
    name = request.draft_model or instance.load_config.get("draft_model")
    if name is None:
        return None
    info = await check_draft(manager.registry, instance.info, name)
    main = instance.info
    engine = instance.engine

    async def load() -> None:
        await asyncio.wrap_future(engine.call(lambda: engine.prepare_draft(info.weights)))

    try:
        await manager.add_draft(instance, info, load)
    except DraftUnsupported as exc:
        raise InvalidRequest(f"Model '{main.key}': {exc}.", param="draft_model") from exc
    except ValueError as exc:
        raise InvalidRequest(
            f"Draft model '{info.key}' cannot draft for '{main.key}': {exc}.",
            param="draft_model",
        ) from exc
    return info.weights


async def admit(
    instance: Instance,
    request: CoreRequest,
    policy: images.ImagePolicy | None = None,
    output_cap: int | None = None,
    *,
    draft: Path | None = None,
) -> Generation:
    """Render, tokenize, check and queue ``request`` on an instance the caller leases
    (its image URLs already read: :func:`images.fetch_all`); the reply is cut at
    ``output_cap`` tokens (the server's ``max_output_tokens``)."""
    engine = instance.engine
    info = engine.info
    note_model(instance.id)
    plan = _plan(instance, request)
    text, tokens, vision = await _prompt(instance, request, plan, policy or images.ImagePolicy())
    if not tokens:
        raise InvalidRequest("The prompt is empty after tokenization.", param="messages")
    n_ctx = instance.context_length
    if len(tokens) >= n_ctx:
        raise ContextLengthExceeded(len(tokens), n_ctx)
    constraint: GrammarConstraint | None = None
    if plan.grammar is not None:
        try:
            constraint = await asyncio.to_thread(engine.grammars.constraint, plan.grammar)
        except GrammarError as exc:
            raise InvalidRequest(f"This grammar cannot be enforced: {exc}") from exc
    # The reply gets whatever room the context has left; a larger max_tokens is clamped and
    # the reply then ends with finish_reason "length".
    room = n_ctx - len(tokens)
    max_tokens = min(request.max_tokens or room, room, output_cap or room)
    if request.max_tokens is not None and max_tokens < request.max_tokens:
        log.info(
            "max_tokens %d capped to %d (%s)",
            request.max_tokens,
            max_tokens,
            "server's max output tokens" if max_tokens == output_cap else "what the context holds",
        )
    try:
        stream = engine.submit(
            GenerationRequest(
                prompt=tuple(tokens),
                sampling=request.sampling,
                max_tokens=max_tokens,
                stop_token_ids=(
                    frozenset()
                    if request.ignore_eos
                    else instance.family.stop_ids(info.eos_token_ids)
                ),
                constraint=constraint,
                logprobs=request.logprobs,
                draft=draft,
                num_draft_tokens=request.num_draft_tokens or 3,
                vision=vision.payload if vision is not None else None,
            )
        )
    except QueueFull as exc:
        raise Overloaded(f"Model '{instance.id}' is busy: {exc}. Retry shortly.") from exc
    assembler = TextAssembler(
        instance.family.token_bytes(engine.token_bytes),
        request.stops,
        strip_leading_space=info.strip_leading_space,
    )
    parser = None
    if request.messages is not None:
        parser = instance.family.family.parser(
            plan.functions, prompt=text, reasoning=plan.reasoning
        )
    output = OutputPipeline(assembler, parser)
    gen = Generation(instance, len(tokens), stream, output)
    if draft is not None:
        gen.draft_model = request.draft_model or instance.load_config.get("draft_model")
    return gen
