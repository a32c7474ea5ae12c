"""What the MCP modules share: how to reach a server, one of its tools, and a call's outcome
(:mod:`mlxserve.core.mcp` builds them, :mod:`mlxserve.core.mcp_session` uses them)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class ServerSpec:
    """How to reach one MCP server, and what a request may use of it."""

    label: str
    # LM Studio's ``provider_info`` for the server's calls.
    provider_info: tuple[tuple[str, str], ...]
    url: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    command: str | None = None
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] | None = None
    allowed_tools: frozenset[str] | None = None
    # The address the URL's host was checked at: connections go there, never to what a
    # second lookup answers (DNS rebinding). None: the host is allow-listed by name.
    pinned: str | None = None

    @property
    def provider(self) -> dict[str, str]:
        return dict(self.provider_info)

    def endpoint(self) -> ServerSpec:
        """The spec without its per-request tool filter (what a kept-alive session is for)."""
        return replace(self, allowed_tools=None)


@dataclass(frozen=True)
class McpTool:
    server: ServerSpec
    name: str
    description: str | None
    input_schema: dict[str, Any]
    annotations: dict[str, Any] | None = None

    def function(self) -> dict[str, Any]:
        """The tool as a core function definition (what chat templates render)."""
        schema = dict(self.input_schema or {"type": "object", "properties": {}})
        # Closed unless the server says otherwise (SDK servers leave it out): a forced call
        # could otherwise run on with invented arguments until it runs out of tokens.
        if schema.get("type") == "object" and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        return {"name": self.name, "description": self.description or "", "parameters": schema}


@dataclass(frozen=True)
class CallOutcome:
    output: str
    is_error: bool
