"""MCP client sessions, through the official ``mcp`` SDK: servers a request names
(``ephemeral_mcp`` integrations, Responses ``mcp`` tools), connected for that request, and
servers configured in ``<home>/mcp.json``, started on demand and kept alive until shutdown.

A :class:`Connection` runs its SDK session in a task of its own: the SDK's transports are
anyio task groups, which must be left by the task that entered them, while requests that
use a kept-alive server come and go on other tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx2
from mcp.client.session import ClientSession
from mcp.client.sse import sse_client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, TextContent

from mlxserve.errors import InvalidRequest, McpConnectionError, PermissionDenied
from mlxserve.settings import Settings

log = logging.getLogger(__name__)

MAX_TOOLS = 512
MAX_LIST_PAGES = 32


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


class PinnedTransport(httpx2.AsyncBaseTransport):
    """Sends every request to ``address`` (the one :func:`check_url` checked) while keeping
    the URL's host name for the ``Host`` header and TLS (SNI and certificate checks)."""

    def __init__(self, address: str, inner: httpx2.AsyncBaseTransport | None = None) -> None:
        self.address = address
        self.inner = inner or httpx2.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        name = request.url.host
        request.headers.setdefault(
            "Host", request.headers.get("Host") or request.url.netloc.decode()
        )
        request.url = request.url.copy_with(host=self.address)
        request.extensions = {**request.extensions, "sni_hostname": name}
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _pinned(spec: ServerSpec) -> PinnedTransport | None:
    return PinnedTransport(spec.pinned) if spec.pinned is not None else None


def _client_factory(spec: ServerSpec) -> Any:
    """The SSE client's ``httpx_client_factory``: the SDK's client, pinned like the HTTP one."""

    def make(
        headers: dict[str, str] | None = None,
        timeout: httpx2.Timeout | None = None,
        auth: httpx2.Auth | None = None,
    ) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(
            headers=headers,
            timeout=timeout or httpx2.Timeout(30.0),
            auth=auth,
            follow_redirects=True,
            transport=_pinned(spec),
        )

    return make


def _result_text(result: CallToolResult) -> str:
    parts: list[str] = []
    for block in result.content:
        if isinstance(block, TextContent):
            parts.append(block.text)
        else:
            parts.append(json.dumps(block.model_dump(mode="json", exclude_none=True)))
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content))
    return "\n".join(parts)


class Connection:
    """One initialised MCP client session to one server."""

    def __init__(self, spec: ServerSpec, connect_timeout: float, call_timeout: float) -> None:
        self.spec = spec
        self.connect_timeout = connect_timeout
        self.call_timeout = call_timeout
        self._session: ClientSession | None = None
        self._ready = asyncio.Event()
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None

    @property
    def alive(self) -> bool:
        return self._session is not None and self._task is not None and not self._task.done()

    def _fail(self, what: str) -> McpConnectionError:
        return McpConnectionError(f"MCP server '{self.spec.label}': {what}")

    async def open(self) -> None:
        """Connect and initialise; streamable HTTP first, then SSE for an older HTTP server
        (one that answered, but not as a streamable HTTP server does)."""
        if self.spec.command:
            await self._open("stdio")
            return
        try:
            await self._open("http")
        except McpConnectionError:
            if not _answered(self._error):
                raise
            try:
                await self._open("sse")
            except McpConnectionError:
                pass
            else:
                return
            raise

    async def _open(self, transport: str) -> None:
        self._ready = asyncio.Event()
        self._closing = asyncio.Event()
        self._error = None
        self._task = asyncio.create_task(self._run(transport))
        try:
            await asyncio.wait_for(self._ready.wait(), self.connect_timeout)
        except asyncio.TimeoutError:
            # A silent server: stop now rather than wait another timeout in close().
            await self._abandon()
            raise self._fail(
                f"no answer within {self.connect_timeout:g} seconds of connecting"
            ) from None
        if self._session is None:
            await self.close()
            reason = _describe(self._error) if self._error else "the connection closed"
            raise self._fail(f"cannot connect ({reason})")

    async def _run(self, transport: str) -> None:
        spec = self.spec
        try:
            async with contextlib.AsyncExitStack() as stack:
                if transport == "stdio":
                    assert spec.command is not None
                    params = StdioServerParameters(
                        command=spec.command,
                        args=list(spec.args),
                        env=dict(spec.env) if spec.env is not None else None,
                    )
                    read, write = await stack.enter_async_context(stdio_client(params))
                elif transport == "http":
                    assert spec.url is not None
                    http = await stack.enter_async_context(
                        httpx2.AsyncClient(
                            headers=dict(spec.headers),
                            timeout=httpx2.Timeout(self.connect_timeout, read=self.call_timeout),
                            transport=_pinned(spec),
                        )
                    )
                    read, write = await stack.enter_async_context(
                        streamable_http_client(spec.url, http_client=http)
                    )
                else:
                    assert spec.url is not None
                    read, write = await stack.enter_async_context(
                        sse_client(
                            spec.url,
                            headers=dict(spec.headers),
                            timeout=self.connect_timeout,
                            sse_read_timeout=self.call_timeout,
                            httpx_client_factory=_client_factory(spec),
                        )
                    )
                session = await stack.enter_async_context(
                    ClientSession(read, write, read_timeout_seconds=self.call_timeout)
                )
                await session.initialize()
                self._session = session
                self._ready.set()
                await self._closing.wait()
        except Exception as exc:  # the SDK raises transport errors in many shapes
            self._error = exc
            log.debug("MCP server %s: session ended", spec.label, exc_info=exc)
        finally:
            self._session = None
            self._ready.set()

    async def close(self) -> None:
        self._closing.set()
        task = self._task
        if task is None or task.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), self.connect_timeout)
        except asyncio.TimeoutError:
            await self._abandon()
        except asyncio.CancelledError:
            await self._abandon()
            current = asyncio.current_task()
            cancelling = getattr(current, "cancelling", None)  # Python 3.11+
            if cancelling() if cancelling is not None else not task.cancelled():
                raise  # our caller is being cancelled: that must not be swallowed

    async def _abandon(self) -> None:
        """Cancel the connection task and wait for it to end."""
        self._closing.set()
        task = self._task
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(BaseException):
            await task

    async def _call(self, what: str, work: Any, timeout: float) -> Any:
        if self._session is None:
            raise self._fail("the connection is closed")
        try:
            return await asyncio.wait_for(work, timeout)
        except asyncio.TimeoutError:
            raise self._fail(f"{what} got no answer within {timeout:g} seconds") from None
        except Exception as exc:
            if not self.alive:
                raise self._fail(f"the connection was lost during {what}") from exc
            raise self._fail(f"{what} failed ({_describe(exc)})") from exc

    async def list_tools(self) -> list[McpTool]:
        """The server's tools, filtered by the spec's ``allowed_tools``."""
        return await self._call("listing tools", self._list(), self.connect_timeout)

    async def _list(self) -> list[McpTool]:
        tools: list[McpTool] = []
        cursor: str | None = None
        for _ in range(MAX_LIST_PAGES):
            session = self._session
            if session is None:
                raise self._fail("the connection was lost while listing tools")
            params = {"cursor": cursor} if cursor else None
            page = await session.list_tools(params=params)  # type: ignore[arg-type]
            for tool in page.tools:
                annotations = (
                    tool.annotations.model_dump(exclude_none=True) if tool.annotations else None
                )
                tools.append(
                    McpTool(self.spec, tool.name, tool.description, tool.input_schema, annotations)
                )
            cursor = page.next_cursor
            if not cursor or len(tools) >= MAX_TOOLS:
                break
        return tools[:MAX_TOOLS]

    async def call(self, name: str, arguments: dict[str, Any]) -> CallOutcome:
        session = self._session
        if session is None:
            raise self._fail("the connection is closed")
        result = await self._call(
            f"calling '{name}'", session.call_tool(name, arguments), self.call_timeout
        )
        return CallOutcome(_result_text(result), bool(result.is_error))


def _first_cause(exc: BaseException) -> BaseException:
    while getattr(exc, "exceptions", None):  # an ExceptionGroup: its first cause
        exc = exc.exceptions[0]  # type: ignore[attr-defined]
    return exc


def _answered(exc: BaseException | None) -> bool:
    """Whether a failed connection got an answer from the server (not refused, no timeout)."""
    return exc is not None and isinstance(_first_cause(exc), (httpx2.HTTPStatusError, MCPError))


def _describe(exc: BaseException) -> str:
    """A short reason from the SDK's (often grouped) transport errors, without tracebacks."""
    exc = _first_cause(exc)
    if isinstance(exc, httpx2.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, httpx2.ConnectError):
        return "connection refused or host unreachable"
    if isinstance(exc, (httpx2.TimeoutException, TimeoutError)):
        return "timed out"
    if isinstance(exc, MCPError):
        return f"MCP error {exc.code}: {exc.message[:200]}"
    if isinstance(exc, FileNotFoundError):
        return "the server command was not found"
    return type(exc).__name__


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

    def _new(self, spec: ServerSpec) -> Connection:
        s = self.settings
        return Connection(spec, s.mcp_connect_timeout, s.mcp_call_timeout)

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
            conn = self._new(key)
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
                    conn = self._new(spec)
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
