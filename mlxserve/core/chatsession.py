"""One stateful chat request, for every dialect that has them (LM Studio's ``/api/v1/chat``
and OpenAI's ``/v1/responses``): its MCP sessions, its generation (the MCP tool loop when
servers are named), and saving the turn to the chat store."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from mlxserve.core import generate, images
from mlxserve.core.chatstore import ChatStore
from mlxserve.core.generate import Generation
from mlxserve.core.manager import ModelManager
from mlxserve.core.mcp import McpClients, Requested, Toolset, specs_for
from mlxserve.core.toolloop import LoopEvent, ToolLoop, with_tools
from mlxserve.core.types import CoreRequest
from mlxserve.settings import Settings


class ChatSession:
    """Use: :meth:`connect` the request's MCP servers, :meth:`start` the generation, iterate
    :meth:`events`, :meth:`save` the turn, and always :meth:`close` (which also stops the
    generation if it still runs)."""

    def __init__(
        self, settings: Settings, manager: ModelManager, mcp: McpClients, chats: ChatStore
    ) -> None:
        self.settings = settings
        self.manager = manager
        self.mcp = mcp
        self.chats = chats
        # The MCP tools offered to the model (None: no server named).
        self.toolset: Toolset | None = None
        # The first round's generation, and the loop that runs the model's MCP calls.
        self.gen: Generation | None = None
        self.loop: ToolLoop | None = None
        self._exits = contextlib.AsyncExitStack()

    async def connect(self, requested: list[Requested]) -> Toolset | None:
        """Connect to the MCP servers the request names (refusing what the settings do not
        allow) and list their tools; None when it names none."""
        if not requested:
            return None
        specs = await specs_for(self.settings, requested)
        self.toolset = await self._exits.enter_async_context(self.mcp.session(specs))
        return self.toolset

    async def start(
        self, core: CoreRequest, *, context_length: int | None = None
    ) -> tuple[Generation, float | None, float]:
        """Read its images, lease its model (loading it if allowed, with ``context_length``),
        offer the MCP tools with it and queue it on the leased instance. Returns the
        generation, the load time if this request loaded the model, and when it was queued."""
        policy = images.ImagePolicy.from_settings(self.settings)
        core = await images.fetch_all(core, policy)
        lease = self.manager.lease(core.model, ttl=core.ttl, context_length=context_length)
        async with lease as instance:
            started = time.perf_counter()
            # Later rounds of the tool loop use this very instance.
            core = replace(core, model=instance.id)
            if self.toolset is not None:
                core = with_tools(core, self.toolset)
            # Queued on the leased instance, never on a second lookup that could race an
            # eviction of this very instance.
            draft = await generate.draft_for(self.manager, instance, core)
            gen = await generate.admit(
                instance, core, policy, self.settings.max_output_tokens, draft=draft
            )
        self.gen = gen
        if self.toolset is not None:
            rounds = self.settings.mcp_max_rounds
            self.loop = ToolLoop(self.manager, core, gen, self.toolset, rounds)
        return gen, lease.load_seconds, started

    def events(self, idle_seconds: float | None = None) -> AsyncIterator[LoopEvent]:
        """The reply's events: every round's, with the MCP results, when tools are offered."""
        if self.loop is not None:
            return self.loop.events(idle_seconds)
        assert self.gen is not None, "start() first"
        return self.gen.events(idle_seconds)

    def cancel(self) -> None:
        """Stop the generation (whichever round is running)."""
        if self.loop is not None:
            self.loop.cancel()
        elif self.gen is not None:
            self.gen.cancel()

    async def save(
        self,
        *,
        parent_id: str | None,
        system: str | None,
        input: list[dict[str, Any]],
        answer: list[dict[str, Any]],
        response_id: str | None = None,
        reply: dict[str, Any] | None = None,
    ) -> str:
        """Store the turn: its new input, the tool rounds' messages and the ``answer``
        messages (and ``reply``, the response object as the client got it); returns its
        response id."""
        assert self.gen is not None, "start() first"
        transcript = self.loop.transcript if self.loop is not None else []
        return await self.chats.asave(
            response_id=response_id,
            parent_id=parent_id,
            model=self.gen.instance.info.key,
            system=system,
            input=input,
            output=[*transcript, *answer],
            reply=reply,
        )

    async def close(self) -> None:
        """Stop the generation and close the request's MCP sessions."""
        self.cancel()
        await self._exits.aclose()
