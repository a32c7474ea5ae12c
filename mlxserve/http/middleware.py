"""Pure ASGI middleware in front of every route: host guard, CORS, authentication, body limit.

Outermost first, and why in this order:

1. :class:`HostGuardMiddleware` refuses a ``Host`` that is not this machine while bound to
   loopback (DNS rebinding, Ollama's CVE-2024-28224) and an ``Origin`` nobody allowed (a page
   on another site posting to the API; browsers send "simple" POSTs without a preflight).
2. :class:`CORSMiddleware` answers preflights (they never carry credentials) and labels the
   responses for allowed origins; off unless ``--cors``.
3. :class:`AuthMiddleware` requires a live API token when ``require_auth``.
   :class:`~mlxserve.http.requestlog.LogTap` comes next, so refused requests are never published.
4. :class:`BodyLimitMiddleware` counts the body as it arrives and stops at ``max_body_bytes``.

Refusals are rendered in the dialect of the path (OpenAI, Anthropic, LM Studio), like every
other error.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlxserve.errors import Forbidden, PayloadTooLarge, Unauthorized
from mlxserve.http.errors import reject
from mlxserve.settings import Settings
from mlxserve.state import AppState

log = logging.getLogger("mlxserve.security")

# Answer without a token: the liveness probe, the probes the LM Studio SDKs and ``lms`` use
# to find a server, and the API's description; none tells anything about models or chats.
OPEN_PATHS = frozenset({"/health", "/lmstudio-greeting", "/lms-status", "/openapi.json", "/"})
# The web app's files: they hold no data, and the app asks for a token before it calls the API.
OPEN_PREFIXES = ("/app/",)
# Origins that are this machine's own apps, allowed like Ollama's defaults. ``file:`` pages
# send ``Origin: null``, which sandboxed iframes of any site send too, so it is not here.
_APP_SCHEMES = frozenset({"app", "tauri", "vscode-webview", "vscode-file"})
_CORS_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _is_loopback_name(name: str) -> bool:
    name = name.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def binds_loopback(host: str) -> bool:
    """Whether the server's bind address only answers this machine."""
    return _is_loopback_name(host.strip("[]"))


def host_name(host_header: str) -> str:
    """The name in a ``Host`` header, without its port; an IPv6 address without brackets."""
    host = host_header.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else ""
    return host.split(":", 1)[0].rstrip(".")


def origin_is_local(origin: str) -> bool:
    """A page served by this machine (``http://localhost:5173``) or a local app's webview."""
    try:
        parts = urlsplit(origin)
        hostname = parts.hostname
    except ValueError:
        return False
    if parts.scheme in _APP_SCHEMES:
        return True
    return (
        parts.scheme in ("http", "https") and hostname is not None and _is_loopback_name(hostname)
    )


class OriginPolicy:
    """Which browser origins may call the API, and which get CORS headers."""

    def __init__(self, settings: Settings) -> None:
        self.cors = settings.cors
        origins = _split_list(settings.cors_origins)
        self.any_origin = "*" in origins
        self.origins = frozenset(o.rstrip("/") for o in origins if o != "*")

    def allows(self, origin: str) -> bool:
        if origin_is_local(origin):
            return True
        return self.cors and (self.any_origin or origin.rstrip("/") in self.origins)


def _arrived_on_loopback(scope: Scope) -> bool:
    """Whether the connection came in on a loopback address: always so under a loopback bind,
    but not under an in-process test client (``testserver``)."""
    server = scope.get("server")
    return not server or _is_loopback_name(str(server[0]))


class HostGuardMiddleware:
    """403 for a foreign ``Host`` while bound to loopback, and for an ``Origin`` not allowed."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.guard_host = binds_loopback(settings.host)
        self.policy = OriginPolicy(settings)
        names = {n.lower().rstrip(".") for n in _split_list(settings.allowed_hosts)}
        self.extra_names = frozenset(n for n in names if not n.startswith("*."))
        self.extra_suffixes = tuple(n[1:] for n in names if n.startswith("*."))
        self.hostname = socket.gethostname().lower()

    def host_allowed(self, host_header: str) -> bool:
        name = host_name(host_header)
        return (
            _is_loopback_name(name)
            or name == self.hostname
            or name in self.extra_names
            or (bool(self.extra_suffixes) and name.endswith(self.extra_suffixes))
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host")
        if (
            self.guard_host
            and host is not None
            and _arrived_on_loopback(scope)
            and not self.host_allowed(host)
        ):
            log.info("refused a request for host %r (DNS-rebinding guard)", host[:80])
            exc = Forbidden(
                "This server answers only requests addressed to localhost while it is bound to "
                "a loopback address; add the host name to allowed_hosts "
                "(MLXSERVE_ALLOWED_HOSTS) to serve it."
            )
            await reject(scope, receive, send, exc)
            return
        origin = headers.get("origin")
        if origin is not None and not self.policy.allows(origin):
            log.info("refused a request from origin %r", origin[:80])
            exc = Forbidden(
                "Requests from this web origin are refused; start the server with "
                "--cors ORIGIN to allow it."
            )
            await reject(scope, receive, send, exc)
            return
        await self.app(scope, receive, send)


class CORSMiddleware:
    """Cross-origin headers for allowed origins when ``cors`` is on; never credentials."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.policy = OriginPolicy(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.policy.cors:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if origin is None or not self.policy.allows(origin):
            await self.app(scope, receive, send)
            return
        allow = "*" if self.policy.any_origin else origin
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            preflight = {
                "Access-Control-Allow-Origin": allow,
                "Access-Control-Allow-Methods": _CORS_METHODS,
                "Access-Control-Max-Age": "600",
                "Vary": "Origin",
            }
            requested = headers.get("access-control-request-headers")
            if requested:
                preflight["Access-Control-Allow-Headers"] = requested
            await Response(status_code=204, headers=preflight)(scope, receive, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                out["Access-Control-Allow-Origin"] = allow
                out["Access-Control-Expose-Headers"] = "Retry-After, x-should-retry"
                out.add_vary_header("Origin")
            await send(message)

        await self.app(scope, receive, send_with_cors)


def presented_tokens(scope: Scope) -> list[str]:
    """The credentials a request carries: ``Authorization: Bearer``, and ``x-api-key`` on the
    Anthropic routes (the Anthropic SDK's header)."""
    headers = Headers(scope=scope)
    found: list[str] = []
    scheme, _, value = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        found.append(value.strip())
    if scope.get("path", "").startswith("/v1/messages"):
        key = headers.get("x-api-key", "").strip()
        if key:
            found.append(key)
    return found


def authorized(scope: Scope, state: AppState) -> bool:
    """Whether a request (an HTTP or websocket scope) may use the API: authentication is off,
    the path is open, or the request carries a live token in its headers."""
    path = scope.get("path", "")
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES) or authenticated(scope, state)


def authenticated(scope: Scope, state: AppState) -> bool:
    """Authentication is off, or the request carries a live token, whatever its path."""
    if not state.settings.require_auth:
        return True
    return any(state.tokens.verify(token) for token in presented_tokens(scope))


def websocket_authorized(
    scope: Scope, state: AppState, client_identifier: str, client_passkey: str
) -> bool:
    """For websocket endpoints: the LM Studio SDKs send no header but put the token, split in
    two, in their first frame (``clientIdentifier``, ``clientPasskey``). Either suffices."""
    if authorized(scope, state):
        return True
    return state.tokens.verify_client(client_identifier, client_passkey)


class AuthMiddleware:
    """401 without a live token when ``require_auth``. Websocket scopes pass: their endpoints
    authenticate the handshake with :func:`websocket_authorized`."""

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or authorized(scope, self.state):
            await self.app(scope, receive, send)
            return
        if presented_tokens(scope):
            log.info("refused %s %r: the API token is not valid", scope["method"], scope["path"])
            message = "The API token is not valid (revoked, or never issued by this server)."
        else:
            message = (
                "This server requires an API token: send 'Authorization: Bearer <token>' "
                "(create one with 'mlxserve token create')."
            )
        await reject(scope, receive, send, Unauthorized(message))


class BodyLimitMiddleware:
    """413 for a body over ``limit`` bytes: at once when ``Content-Length`` says so, else as
    soon as the bytes received pass it (chunked bodies have no length to trust)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"The request body is larger than this server's limit of {self.limit} bytes "
            "(setting max_body_bytes, flag --max-body-bytes)."
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            await reject(scope, receive, send, self._too_large())
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # Raised into the route's body read; its error handler renders the 413.
                    raise self._too_large()
            return message

        await self.app(scope, limited_receive, send)


def warn_about_exposure(state: AppState) -> None:
    """Loud startup warnings for a server others can reach, or one nobody can use."""
    settings = state.settings
    if not binds_loopback(settings.host):
        if settings.require_auth:
            log.warning(
                "serving on %s: reachable from the network (API tokens required)", settings.host
            )
        else:
            log.warning(
                "SERVING ON %s WITHOUT AUTHENTICATION: anyone who can reach this address can "
                "use every model and management endpoint. Restart with --require-auth (and "
                "create a token with 'mlxserve token create') unless this network is yours "
                "alone.",
                settings.host,
            )
    if settings.cors and OriginPolicy(settings).any_origin and not settings.require_auth:
        log.warning(
            "CORS IS OPEN TO EVERY WEB ORIGIN WITHOUT AUTHENTICATION: any web page this "
            "machine's browser opens can use every model and management endpoint. Name the "
            "origins (--cors https://app.example) or add --require-auth."
        )
    if settings.require_auth:
        try:
            count = len(state.tokens.list())
        except (OSError, ValueError):
            count = 0
        if not count:
            log.warning(
                "authentication is required but no API token exists: every request will get "
                "401; create one with 'mlxserve token create'"
            )
