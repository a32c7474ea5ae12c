"""The one path every generation takes: model, prompt, engine, and back as core events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from backends.base import (
    EngineError,
    Finished,
    GenerationRequest,
    PromptProgress,
    QueueFull,
    Token,
    TokenStream,
)
from mlxserve.core.manager import Instance, ModelManager
from mlxserve.core.textstream import TextAssembler
from mlxserve.core.types import CoreRequest, Done, Event, Idle, Progress, TextDelta, Usage
from mlxserve.errors import ContextLengthExceeded, EngineFailure, InvalidRequest, Overloaded


class Generation:
    """A request admitted to an engine. Iterate :meth:`events`; :meth:`cancel` (or leaving the
    iteration early) stops the engine's work for it."""

    def __init__(
        self,
        instance: Instance,
        prompt_tokens: int,
        stream: TokenStream,
        assembler: TextAssembler,
    ) -> None:
        self.instance = instance
        self.prompt_tokens = prompt_tokens
        self._stream = stream
        self._assembler = assembler

    def cancel(self) -> None:
        self._stream.cancel()

    async def events(self, idle_seconds: float | None = None) -> AsyncIterator[Event]:
        """The generation's events; :class:`Idle` after each ``idle_seconds`` of silence."""
        generated = 0
        try:
            while True:
                batch = await self._stream.next_batch(idle_seconds or None)
                if not batch:
                    yield Idle()
                for item in batch:
                    if isinstance(item, Token):
                        generated += 1
                        text = self._assembler.add(item.id)
                        if text:
                            yield TextDelta(text)
                        if self._assembler.stopped:
                            self._stream.cancel()
                            yield Done("stop", Usage(self.prompt_tokens, generated))
                            return
                    elif isinstance(item, PromptProgress):
                        yield Progress(item.processed, item.total)
                    elif isinstance(item, Finished):
                        tail = self._assembler.finish()
                        if tail:
                            yield TextDelta(tail)
                        yield Done(
                            "stop" if item.reason == "stop" else "length",
                            Usage(self.prompt_tokens, item.generated),
                        )
                        return
        except EngineError as exc:
            raise EngineFailure(f"Generation failed: {exc}") from exc
        finally:
            self._stream.cancel()


async def start(manager: ModelManager, request: CoreRequest) -> Generation:
    """Resolve the model, render and tokenize the prompt, check it fits, and queue it.

    Everything that can be the client's fault is raised here, before a response starts.
    """
    instance = await manager.get(request.model)
    engine = instance.engine
    info = engine.info
    if request.messages is not None:
        text = instance.template.render(
            list(request.messages), add_generation_prompt=True, **request.template_kwargs
        )
        tokens = await asyncio.to_thread(engine.tokenize, text)
    else:
        tokens = await asyncio.to_thread(engine.tokenize, request.prompt or "")
        if info.bos_token_id is not None and tokens[:1] != [info.bos_token_id]:
            tokens.insert(0, info.bos_token_id)
    if not tokens:
        raise InvalidRequest("The prompt is empty after tokenization.", param="messages")
    n_ctx = instance.context_length
    if len(tokens) >= n_ctx:
        raise ContextLengthExceeded(len(tokens), n_ctx)
    # The reply gets whatever room the context has left; a larger max_tokens is clamped and
    # the reply then ends with finish_reason "length".
    room = n_ctx - len(tokens)
    max_tokens = min(request.max_tokens or room, room)
    try:
        stream = engine.submit(
            GenerationRequest(
                prompt=tuple(tokens),
                sampling=request.sampling,
                max_tokens=max_tokens,
                stop_token_ids=frozenset() if request.ignore_eos else info.eos_token_ids,
            )
        )
    except QueueFull as exc:
        raise Overloaded(f"Model '{instance.id}' is busy: {exc}. Retry shortly.") from exc
    assembler = TextAssembler(
        engine.token_bytes, request.stops, strip_leading_space=info.strip_leading_space
    )
    return Generation(instance, len(tokens), stream, assembler)
