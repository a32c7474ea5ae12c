"""The MCP SDK side of :mod:`mlxserve.core.mcp`: one client session per server, through the
official ``mcp`` SDK. Imported when a request first connects to an MCP server: the SDK's
modules take ≈30 MB of a server's memory, which requests that use no MCP never need.

A :class:`Connection` runs its SDK session in a task of its own: the SDK's transports are
anyio task groups, which must be left by the task that entered them, while requests that
use a kept-alive server come and go on other tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import httpx2
from mcp.client.session import ClientSession
from mcp.client.sse import sse_client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, TextContent

from mlxserve.core.mcp_spec import CallOutcome, McpTool, ServerSpec
from mlxserve.core.pinning import PinnedTransport
from mlxserve.errors import McpConnectionError

log = logging.getLogger(__name__)

MAX_TOOLS = 512
MAX_LIST_PAGES = 32


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
