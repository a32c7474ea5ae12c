"""DNS rebinding: the MCP URL's host is resolved once, checked, and connected to at that
address; a resolver that answers a public address first and loopback the second time
never gets the connection to loopback."""

from __future__ import annotations

import asyncio
import socket

import httpx2

from mlxserve.core import mcp
from mlxserve.core.mcp import Requested, specs_for
from mlxserve.core.pinning import PinnedTransport
from mlxserve.settings import Settings

PUBLIC = "93.184.216.34"


def two_faced(monkeypatch) -> list[str]:
    """getaddrinfo answers PUBLIC the first time and 127.0.0.1 after that."""
    asked: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):
        asked.append(host)
        address = PUBLIC if len(asked) == 1 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(mcp.socket, "getaddrinfo", getaddrinfo)
    return asked


def test_the_checked_address_is_the_one_connected_to(monkeypatch, tmp_path):
    asked = two_faced(monkeypatch)
    settings = Settings(home=tmp_path, models_dir=tmp_path, allow_ephemeral_mcp=True)
    url = "http://rebind.example:8000/mcp"
    (spec,) = asyncio.run(specs_for(settings, [Requested("ephemeral", "x", url)]))
    assert spec.pinned == PUBLIC and asked == ["rebind.example"]

    seen: list[httpx2.Request] = []

    def record(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(200)

    async def call() -> None:
        transport = PinnedTransport(spec.pinned, httpx2.MockTransport(record))
        async with httpx2.AsyncClient(transport=transport) as client:
            await client.post(url, json={})

    asyncio.run(call())
    (request,) = seen
    assert request.url.host == PUBLIC and request.url.port == 8000
    assert request.headers["Host"] == "rebind.example:8000"
    assert request.extensions["sni_hostname"] == "rebind.example"
    # Nothing resolved the name a second time.
    assert asked == ["rebind.example"]


def test_an_allow_listed_host_is_not_pinned(tmp_path):
    settings = Settings(
        home=tmp_path,
        models_dir=tmp_path,
        allow_ephemeral_mcp=True,
        mcp_allowed_hosts="127.0.0.1",
    )
    requested = [Requested("ephemeral", "x", "http://127.0.0.1:9/mcp")]
    (spec,) = asyncio.run(specs_for(settings, requested))
    assert spec.pinned is None
