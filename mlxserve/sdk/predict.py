"""The ``llm`` namespace's own endpoints: the ``predict`` channel (``respond``, ``complete``,
each round of ``act``), ``tokenize``, ``countTokens`` and ``applyPromptTemplate``.

Parameters are read by :mod:`mlxserve.protocols.sdk`'s models (``to_core()``). A prediction
runs through the same core as the REST APIs (``generate.admit``): chat
template, stop strings, reasoning split, tool-call parsing, grammars. Its events become the
SDK's ``fragment`` / ``toolCallGeneration*`` messages and a final ``success`` with stats.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from mlxserve.core import generate, images
from mlxserve.core.types import (
    Done,
    Event,
    Idle,
    Progress,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
)
from mlxserve.protocols.sdk import (
    ApplyPromptTemplateParameter,
    PredictParameter,
    parse_parameter,
)
from mlxserve.sdk import shapes
from mlxserve.sdk.kvconfig import echo
from mlxserve.sdk.transport import Channel, Context, SdkError

_STOP_REASONS = {"tool_calls": "toolCalls", "length": "maxPredictedTokensReached"}


def _fragment(text: str, reasoning: str = "none", *, structural: bool = False) -> dict[str, Any]:
    return {
        "type": "fragment",
        "fragment": {
            "content": text,
            "tokensCount": 1,
            "containsDrafted": False,
            "reasoningType": reasoning,
            "isStructural": structural,
        },
    }


@dataclass
class _Run:
    """One prediction's progress: what it has sent, for the stats and the tool calls."""

    started: float
    first_at: float | None = None
    progress: float = 0.0
    in_reasoning: bool = False
    cached: int = 0
    call_name: str = ""
    call_id: str = ""
    call_args: str = ""

    def messages(self, event: Event) -> list[dict[str, Any]]:
        if isinstance(event, Progress):
            if not event.total:
                return []
            value = min(event.processed / event.total, 1.0)
            return self._progress(value, event)
        if isinstance(event, (Idle, Done)):
            return []
        out: list[dict[str, Any]] = []
        if self.first_at is None:
            self.first_at = time.perf_counter()
            out += self._progress(1.0, None)
        if isinstance(event, ReasoningDelta):
            if not self.in_reasoning:
                self.in_reasoning = True
                out.append(_fragment("<think>", "reasoningStartTag", structural=True))
            out.append(_fragment(event.text, "reasoning"))
            return out
        if self.in_reasoning:
            self.in_reasoning = False
            out.append(_fragment("</think>", "reasoningEndTag", structural=True))
        if isinstance(event, TextDelta):
            out.append(_fragment(event.text))
        elif isinstance(event, ToolCallStart):
            self.call_name, self.call_id, self.call_args = event.name, event.id, ""
            out.append({"type": "toolCallGenerationStart", "toolCallId": event.id})
            out.append({"type": "toolCallGenerationNameReceived", "name": event.name})
        elif isinstance(event, ToolCallDelta):
            self.call_args += event.arguments
            out.append(
                {"type": "toolCallGenerationArgumentFragmentGenerated", "content": event.arguments}
            )
        elif isinstance(event, ToolCallEnd):
            out.append(self._call_end(event.parsed))
        return out

    def _progress(self, value: float, event: Progress | None) -> list[dict[str, Any]]:
        # The Python SDK wants strictly rising values.
        if value <= self.progress:
            return []
        self.progress = value
        total = event.total if event else 0
        processed = event.processed if event else 0
        if event is not None:
            self.cached = max(self.cached, event.cached)
        return [
            {
                "type": "promptProcessingProgress",
                "progress": value,
                "details": {
                    "cachedTokenCount": self.cached,
                    "totalPromptTokenCount": total,
                    "processedPromptTokenCount": processed,
                    "unprocessedPromptTokenCount": max(total - processed, 0),
                },
            }
        ]

    def _call_end(self, arguments: dict[str, Any] | None) -> dict[str, Any]:
        if arguments is None:
            return {
                "type": "toolCallGenerationFailed",
                "error": SdkError(
                    f"The model's call of '{self.call_name}' has arguments that are not a JSON "
                    "object."
                ).serialize(),
                "rawContent": self.call_args or "{}",
            }
        return {
            "type": "toolCallGenerationEnd",
            "toolCallRequest": {
                "type": "function",
                "id": self.call_id,
                "name": self.call_name,
                "arguments": arguments,
            },
        }


def _stats(
    run: _Run, done: Done | None, prompt_tokens: int, generated: int, cancelled: bool
) -> dict[str, Any]:
    now = time.perf_counter()
    if cancelled or done is None:
        reason = "userStopped"
    elif done.finish_reason == "stop":
        reason = "stopStringFound" if done.stop_sequence else "eosFound"
    else:
        reason = _STOP_REASONS[done.finish_reason]
    if done is not None:
        prompt_tokens, generated = done.usage.prompt_tokens, done.usage.completion_tokens
    stats: dict[str, Any] = {
        "stopReason": reason,
        "promptTokensCount": prompt_tokens,
        "predictedTokensCount": generated,
        "totalTokensCount": prompt_tokens + generated,
        "totalTimeSec": round(now - run.started, 6),
    }
    if done is not None and done.stop_sequence:
        stats["stopString"] = done.stop_sequence
    if done is not None and done.draft is not None and done.draft_model is not None:
        stats["usedDraftModelKey"] = done.draft_model
        stats["totalDraftTokensCount"] = done.draft.total
        stats["acceptedDraftTokensCount"] = done.draft.accepted
        stats["rejectedDraftTokensCount"] = done.draft.rejected
        stats["ignoredDraftTokensCount"] = done.draft.ignored
    if run.first_at is not None:
        stats["timeToFirstTokenSec"] = round(run.first_at - run.started, 6)
        generating = now - run.first_at
        if generating > 0 and generated:
            stats["tokensPerSecond"] = round(generated / generating, 3)
    return stats


async def _until_cancelled(
    events: AsyncIterator[Event], cancelled: asyncio.Event
) -> AsyncGenerator[Event, None]:
    """``events`` until they end or the client cancels, whichever comes first."""
    waiter = asyncio.ensure_future(cancelled.wait())
    step: asyncio.Future[Event] | None = None
    try:
        while True:
            step = asyncio.ensure_future(events.__anext__())
            await asyncio.wait({step, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                return
            try:
                event = step.result()
            except StopAsyncIteration:
                return
            step = None
            yield event
    finally:
        waiter.cancel()
        if step is not None and not step.done():
            # Stopping the pending step closes the generator (its ``finally`` runs).
            step.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await step


async def predict(ctx: Context, channel: Channel, parameter: Any) -> None:
    body = parse_parameter(PredictParameter, parameter)
    state = ctx.state
    found = shapes.resolve_llm(state, body.modelSpecifier)
    run = _Run(started=time.perf_counter())
    async with state.manager.lease(found.id) as instance:
        request, pred = body.to_core(
            instance.id, state.settings.default_temperature, state.settings.home
        )
        draft = await generate.draft_for(state.manager, instance, request)
        gen = await generate.admit(
            instance, request, output_cap=state.settings.max_output_tokens, draft=draft
        )
    done: Done | None = None
    generated = 0
    events = aiter(gen.events(state.settings.sse_ping_seconds or None))
    try:
        async with contextlib.aclosing(_until_cancelled(events, channel.cancelled)) as stream:
            async for event in stream:
                if isinstance(event, Done):
                    done = event
                    break
                for message in run.messages(event):
                    if message["type"] == "fragment" and not message["fragment"]["isStructural"]:
                        generated += 1
                    await channel.send(message)
    finally:
        gen.cancel()
        await events.aclose()  # type: ignore[attr-defined]
    if run.in_reasoning:
        await channel.send(_fragment("</think>", "reasoningEndTag", structural=True))
    cancelled = channel.cancelled.is_set() and done is None
    await channel.send(
        {
            "type": "success",
            "stats": _stats(run, done, gen.prompt_tokens, generated, cancelled),
            "modelInfo": shapes.instance_info(instance),
            "loadModelConfig": shapes.load_config(instance),
            "predictionConfig": echo(pred, state.settings.default_temperature),
        }
    )


def _specifier_text(p: Any) -> tuple[dict[str, Any], str]:
    if not isinstance(p, dict) or not isinstance(p.get("inputString"), str):
        raise SdkError("The parameter must be {specifier, inputString: string}.")
    return p, p["inputString"]


async def tokenize(ctx: Context, parameter: Any) -> dict[str, Any]:
    p, text = _specifier_text(parameter)
    found = shapes.resolve_llm(ctx.state, p.get("specifier"))
    async with ctx.state.manager.lease(found.id) as instance:
        tokens = await asyncio.to_thread(instance.engine.tokenize, text)
    return {"tokens": [int(t) for t in tokens]}


async def count_tokens(ctx: Context, parameter: Any) -> dict[str, Any]:
    return {"tokenCount": len((await tokenize(ctx, parameter))["tokens"])}


async def apply_prompt_template(ctx: Context, parameter: Any) -> dict[str, Any]:
    """The prompt the model would be given for this history and prediction config: rendered
    by the same planning as a prediction (``generate.rendered_prompt``)."""
    body = parse_parameter(ApplyPromptTemplateParameter, parameter)
    state = ctx.state
    found = shapes.resolve_llm(state, body.specifier)
    request, pred = body.to_core(found.id, state.settings.default_temperature, state.settings.home)
    if pred.raw:
        return {"formatted": request.prompt or ""}
    policy = images.ImagePolicy.from_settings(state.settings)
    async with state.manager.lease(found.id) as instance:
        text = await generate.rendered_prompt(instance, request, policy)
    template = instance.template
    if body.opts.omitBosToken and template.bos_token and text.startswith(template.bos_token):
        text = text[len(template.bos_token) :]
    if body.opts.omitEosToken and template.eos_token and text.endswith(template.eos_token):
        text = text[: -len(template.eos_token)]
    return {"formatted": text}
