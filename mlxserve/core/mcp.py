"""MCP servers for requests: servers a request names (``ephemeral_mcp`` integrations,
Responses ``mcp`` tools), connected for that request, and servers configured in
``<home>/mcp.json``, started on demand and kept alive until shutdown. The sessions
themselves (the official ``mcp`` SDK) are in :mod:`mlxserve.core.mcp_session`, imported
when the first connection opens.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import ipaddress
import json
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from mlxserve.core.mcp_spec import McpTool, ServerSpec
from mlxserve.errors import InvalidRequest, McpConnectionError, PermissionDenied
from mlxserve.settings import Settings

if TYPE_CHECKING:
    from mlxserve.core.mcp_session import Connection

log = logging.getLogger(__name__)


def check_url(
    url: str,
    allowed_hosts: list[str],
    *,
    param: str = "server_url",
    allow_flag: str = "--mcp-allowed-hosts (MLXSERVE_MCP_ALLOWED_HOSTS)",
) -> str | None:
    """Refuse what an ephemeral server URL must not reach: other schemes, and (unless the
    host is allow-listed) loopback, private, link-local and other non-public addresses,
    such as cloud metadata endpoints. Image URLs go through the same check. Returns the
    checked address to connect to (None for an allow-listed host)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(
            f"{param} must be an http:// or https:// URL with a host.", param=param
        )
    try:
        port = parts.port
    except ValueError:
        raise InvalidRequest(f"{param} has an invalid port.", param=param) from None
    host = parts.hostname.lower()
    allowed = {h.lower() for h in allowed_hosts}
    if host in allowed or (port and f"{host}:{port}" in allowed):
        return None
    try:
        infos = socket.getaddrinfo(host, port or 443, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:
        raise McpConnectionError(f"Cannot resolve the host '{host}'.") from exc
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not address.is_global:
            raise PermissionDenied(
                f"{param} points at a non-public address ({address}); hosts on loopback or "
                f"private networks must be allow-listed with {allow_flag}.",
                param=param,
            )
    return str(infos[0][4][0]).split("%")[0]


def load_config(path: Path) -> dict[str, Any]:
    """``mcp.json``'s ``mcpServers`` (Cursor / LM Studio format); {} when there is none."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"mcp.json cannot be read: {type(exc).__name__}") from exc
    servers = data.get("mcpServers") if isinstance(data, dict) else None
    return servers if isinstance(servers, dict) else {}


def config_spec(label: str, entry: Any, allowed_tools: frozenset[str] | None) -> ServerSpec:
    """The spec of ``mcp.json`` server ``label``."""
    provider = (("type", "plugin"), ("plugin_id", f"mcp/{label}"))
    if not isinstance(entry, dict):
        raise InvalidRequest(f"mcp.json entry '{label}' is not an object.", param="integrations")
    if isinstance(entry.get("command"), str):
        args = entry.get("args") or []
        env = entry.get("env")
        return ServerSpec(
            label,
            provider,
            command=entry["command"],
            args=tuple(str(a) for a in args),
            env=tuple((str(k), str(v)) for k, v in env.items()) if isinstance(env, dict) else None,
            allowed_tools=allowed_tools,
        )
    if isinstance(entry.get("url"), str):
        headers = entry.get("headers") or {}
        return ServerSpec(
            label,
            provider,
            url=entry["url"],
            headers=tuple((str(k), str(v)) for k, v in headers.items()),
            allowed_tools=allowed_tools,
        )
    raise InvalidRequest(
        f"mcp.json entry '{label}' has neither 'command' nor 'url'.", param="integrations"
    )


@dataclass(frozen=True)
class Requested:
    """An MCP server as a request names it: by URL (ephemeral) or by its mcp.json label."""

    kind: Literal["ephemeral", "plugin"]
    label: str
    url: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    allowed_tools: frozenset[str] | None = None


async def specs_for(settings: Settings, requested: list[Requested]) -> list[ServerSpec]:
    """The servers a request may use, refusing (403) what the settings do not allow."""
    specs: list[ServerSpec] = []
    allowed_hosts = [h.strip() for h in settings.mcp_allowed_hosts.split(",") if h.strip()]
    config: dict[str, Any] | None = None
    for item in requested:
        if item.kind == "ephemeral":
            if not settings.allow_ephemeral_mcp:
                raise PermissionDenied(
                    "Per-request MCP servers are not allowed on this server; start it with "
                    "--allow-ephemeral-mcp (MLXSERVE_ALLOW_EPHEMERAL_MCP=true) to allow them.",
                    param="server_url",
                )
            assert item.url is not None
            pinned = await asyncio.to_thread(check_url, item.url, allowed_hosts)
            provider = (("type", "ephemeral_mcp"), ("server_label", item.label))
            specs.append(
                ServerSpec(
                    item.label,
                    provider,
                    url=item.url,
                    headers=item.headers,
                    allowed_tools=item.allowed_tools,
                    pinned=pinned,
                )
            )
            continue
        if not settings.allow_mcp_json:
            raise PermissionDenied(
                "Calling servers from mcp.json is not allowed on this server; start it with "
                "--allow-mcp-json (MLXSERVE_ALLOW_MCP_JSON=true) to allow it.",
                param="integrations",
            )
        if not settings.require_auth:
            raise PermissionDenied(
                "Servers from mcp.json run commands on this machine, so they are offered only "
                "while authentication is required (--require-auth).",
                param="integrations",
            )
        if config is None:
            config = await asyncio.to_thread(load_config, settings.home / "mcp.json")
        if item.label not in config:
            raise InvalidRequest(
                f"mcp.json has no server named '{item.label}'.", param="integrations"
            )
        specs.append(config_spec(item.label, config[item.label], item.allowed_tools))
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise InvalidRequest("Each MCP server must have its own label.", param="server_label")
    return specs


@dataclass
class McpClients:
    """The app's MCP state: kept-alive sessions to ``mcp.json`` servers, by label."""

    settings: Settings
    _kept: dict[ServerSpec, Connection] = field(default_factory=dict)
    _locks: dict[ServerSpec, asyncio.Lock] = field(default_factory=dict)

    @property
    def config_path(self) -> Path:
        return self.settings.home / "mcp.json"

    async def _new(self, spec: ServerSpec) -> Connection:
        # The SDK's first import takes about a second: in a thread, not on the event loop
        # where every other request's tokens would wait for it.
        module = await asyncio.to_thread(importlib.import_module, "mlxserve.core.mcp_session")

        s = self.settings
        conn: Connection = module.Connection(spec, s.mcp_connect_timeout, s.mcp_call_timeout)
        return conn

    async def kept(self, spec: ServerSpec) -> Connection:
        """The kept-alive session for a configured server, started (or restarted) if needed."""
        key = spec.endpoint()
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            conn = self._kept.get(key)
            if conn is not None and conn.alive:
                return conn
            if conn is not None:
                await conn.close()
            conn = await self._new(key)
            await conn.open()
            self._kept[key] = conn
            return conn

    @contextlib.asynccontextmanager
    async def session(self, specs: list[ServerSpec]) -> AsyncIterator[Toolset]:
        """Connections to ``specs`` and their tools for one request; the ephemeral ones are
        closed when it ends."""
        ephemeral: list[Connection] = []
        toolset = Toolset()
        try:
            for spec in specs:
                if spec.provider.get("type") == "plugin":
                    conn = await self.kept(spec)
                else:
                    conn = await self._new(spec)
                    ephemeral.append(conn)
                    await conn.open()
                tools = await conn.list_tools()
                if spec.allowed_tools is not None:
                    tools = [t for t in tools if t.name in spec.allowed_tools]
                toolset.add(spec, conn, tools)
            yield toolset
        finally:
            for conn in ephemeral:
                await conn.close()

    async def close(self) -> None:
        for conn in self._kept.values():
            await conn.close()
        self._kept.clear()


@dataclass
class Toolset:
    """The MCP tools one request offers the model, by name, with the session of each."""

    listed: list[tuple[ServerSpec, list[McpTool]]] = field(default_factory=list)
    tools: dict[str, tuple[McpTool, Connection]] = field(default_factory=dict)

    def add(self, spec: ServerSpec, conn: Connection, tools: list[McpTool]) -> None:
        for tool in tools:
            if tool.name in self.tools:
                other = self.tools[tool.name][0].server.label
                raise InvalidRequest(
                    f"MCP servers '{other}' and '{spec.label}' both offer a tool named "
                    f"'{tool.name}'; narrow one with allowed_tools.",
                    param="allowed_tools",
                )
            self.tools[tool.name] = (tool, conn)
        self.listed.append((spec, tools))

    def functions(self) -> list[dict[str, Any]]:
        return [tool.function() for tool, _ in self.tools.values()]

    def provider(self, name: str) -> dict[str, str] | None:
        entry = self.tools.get(name)
        return entry[0].server.provider if entry else None
