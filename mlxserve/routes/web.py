"""The web app: static files from the package (``mlxserve/web``), served at ``/`` and
``/app/...`` under a strict Content-Security-Policy. The app is a client of the public API
and holds no data: its files are open like ``/health``; everything it shows comes from the
API, with the token the person gives it."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from mlxserve.errors import NotFoundRoute

WEB_ROOT = Path(__file__).resolve().parents[1] / "web"
# Scripts and styles from this server only, never inline; no remote origins at all.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'; object-src 'none'"
)
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".json": "application/json",
}
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


def _file(relative: str) -> Response:
    path = (WEB_ROOT / relative).resolve()
    media = _TYPES.get(path.suffix)
    if media is None or not path.is_relative_to(WEB_ROOT) or not path.is_file():
        raise NotFoundRoute(f"No file {relative!r} in the web app.")
    return FileResponse(path, media_type=media, headers=HEADERS)


async def index(request: Request) -> Response:
    """The web app."""
    return _file("index.html")


async def asset(request: Request) -> Response:
    """One of the web app's files."""
    return _file(request.path_params["path"])


# Pages, not API: left out of /openapi.json.
routes = [
    Route("/", index, methods=["GET"], include_in_schema=False),
    Route("/app/{path:path}", asset, methods=["GET"], include_in_schema=False),
]
