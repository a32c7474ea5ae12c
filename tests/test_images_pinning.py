"""DNS rebinding on image URLs: the host is resolved once, checked, and fetched at that
address. A resolver that answers a public address first and loopback after that must never
get the fetch to a loopback server."""

from __future__ import annotations

import asyncio
import http.server
import socket
import threading
from collections.abc import Iterator

import httpx2
import pytest

from backends.base import SamplingParams
from mlxserve.core import images
from mlxserve.core.types import CoreRequest

PUBLIC = "93.184.216.34"
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.server.hits += 1  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(PNG)))
        self.end_headers()
        self.wfile.write(PNG)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def loopback() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.hits = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_an_image_url_is_fetched_at_the_checked_address(monkeypatch, loopback):
    real = socket.getaddrinfo
    asked: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):
        if isinstance(host, bytes):  # anyio asks with the IDNA-encoded name
            host = host.decode()
        if host != "rebind.example":
            return real(host, port, *args, **kwargs)
        asked.append(host)
        address = PUBLIC if len(asked) == 1 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    seen: list[httpx2.Request] = []

    def public_host(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(200, headers={"Content-Type": "image/png"}, content=PNG)

    monkeypatch.setattr(
        images, "_transport", lambda: httpx2.MockTransport(public_host), raising=False
    )
    port = loopback.server_address[1]
    url = f"http://rebind.example:{port}/a.png"
    request = CoreRequest(
        model="m",
        sampling=SamplingParams(),
        messages=({"role": "user", "content": [images.part(images.from_url(url, "p"))]},),
    )
    fetched = asyncio.run(images.fetch_all(request, images.ImagePolicy(timeout=5)))

    assert images.images_in(fetched.messages or ())[0].data == PNG
    assert loopback.hits == 0
    (sent,) = seen
    assert sent.url.host == PUBLIC and sent.url.port == port
    assert sent.headers["Host"] == f"rebind.example:{port}"
    assert asked == ["rebind.example"]
