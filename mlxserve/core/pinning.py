"""An HTTP transport pinned to the address a URL's host was checked at (DNS rebinding): MCP
servers' connections and image fetches use it. Only httpx2, not the MCP SDK."""

from __future__ import annotations

import httpx2


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
