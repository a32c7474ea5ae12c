"""One SDK websocket: the authentication handshake, then rpc calls and channels.

Framing follows LM Studio's ``Transport.ts``: text JSON frames; ``rpcCall`` is answered by
``rpcResult`` (no ``result`` key for void results: the clients reject ``null``) or ``rpcError``;
``channelCreate`` runs a handler that sends ``channelSend`` messages and is ended with
``channelClose`` (or ``channelError``); the client's ``{"type": "cancel"}`` reaches the handler.
Every request gets an answer: the clients wait forever for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from mlxserve.auth import TOKEN_PREFIX
from mlxserve.errors import InstanceNotFound, MlxServeError, ModelNotFound
from mlxserve.http.middleware import presented_tokens, websocket_authorized
from mlxserve.state import AppState

log = logging.getLogger("mlxserve.sdk")

# The reference server's limit for the first frame (``AuthenticatedWsServer.ts``).
AUTH_TIMEOUT_SECONDS = 10.0
# What one connection may have in flight at once; more is refused, not queued, so that one
# client cannot pile up unbounded work (LM Studio's clients keep a handful open).
MAX_CALLS_PER_CONNECTION = 64
MAX_CHANNELS_PER_CONNECTION = 32
# The same, per token (or per client identifier when authentication is off) across all its
# connections: more connections do not buy more work in flight.
MAX_CALLS_PER_TOKEN = 256
MAX_CHANNELS_PER_TOKEN = 128
_MAX_ID_LENGTH = 256


class SdkError(Exception):
    """An error as the SDKs show it (``SerializedLMSExtendedError``)."""

    def __init__(
        self,
        title: str,
        *,
        cause: str | None = None,
        suggestion: str | None = None,
        display_data: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(title)
        self.title = title
        self.cause = cause
        self.suggestion = suggestion
        self.display_data = display_data

    def serialize(self) -> dict[str, Any]:
        out: dict[str, Any] = {"title": self.title, "rootTitle": self.title}
        if self.cause:
            out["cause"] = self.cause
        if self.suggestion:
            out["suggestion"] = self.suggestion
        if self.display_data is not None:
            out["displayData"] = self.display_data
        return out


def no_model_matching(query: dict[str, Any], loaded: list[str]) -> SdkError:
    """``generic.noModelMatchingQuery``: the SDKs turn it into their model-not-found error."""
    name = query.get("identifier") or query.get("path")
    what = f"'{name}'" if isinstance(name, str) else "the query"
    return SdkError(
        f"No loaded model matches {what}.",
        suggestion="Load the model first, or use one of the loaded models.",
        display_data={
            "code": "generic.noModelMatchingQuery",
            "query": query,
            "loadedModelsSample": loaded[:10],
            "totalLoadedModels": len(loaded),
        },
    )


def unsupported(namespace: str, endpoint: str, kind: str) -> SdkError:
    return SdkError(
        f"The {kind} endpoint '{namespace}.{endpoint}' is not supported by mlxserve.",
        suggestion="mlxserve implements the model, inference and embedding endpoints of the "
        "LM Studio SDKs; see its README.",
    )


def _too_many(what: str, limit: int) -> dict[str, Any]:
    return SdkError(
        f"Too many {what} in flight on this connection (at most {limit}); wait for some to "
        "finish, or open another connection."
    ).serialize()


def _too_many_for_token(what: str, limit: int) -> dict[str, Any]:
    return SdkError(
        f"Too many {what} in flight for this API token across its connections (at most "
        f"{limit}); wait for some to finish."
    ).serialize()


def serialize_error(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, SdkError):
        return exc.serialize()
    if isinstance(exc, (ModelNotFound, InstanceNotFound)):
        return SdkError(
            exc.message,
            display_data={
                "code": "generic.noModelMatchingQuery",
                "query": {},
                "loadedModelsSample": [],
                "totalLoadedModels": 0,
            },
        ).serialize()
    if isinstance(exc, MlxServeError):
        return SdkError(exc.message).serialize()
    log.exception("SDK request failed", exc_info=exc)
    return SdkError(
        f"Internal server error ({type(exc).__name__}); the server log has details."
    ).serialize()


class Channel:
    """A channel as its handler sees it: send messages, and learn of the client's cancel."""

    def __init__(self, conn: Connection, channel_id: int) -> None:
        self._conn = conn
        self.id = channel_id
        self.cancelled = asyncio.Event()

    async def send(self, message: dict[str, Any]) -> None:
        await self._conn.send({"type": "channelSend", "channelId": self.id, "message": message})

    def received(self, message: Any) -> None:
        if isinstance(message, dict) and message.get("type") == "cancel":
            self.cancelled.set()


RpcHandler = Callable[["Context", Any], Awaitable[Any]]
ChannelHandler = Callable[["Context", Channel, Any], Awaitable[None]]


@dataclass
class Namespace:
    """The endpoints one websocket path serves; any other endpoint gets an error."""

    name: str
    rpc: dict[str, RpcHandler] = field(default_factory=dict)
    channels: dict[str, ChannelHandler] = field(default_factory=dict)


@dataclass
class Context:
    """What a handler gets besides its parameter."""

    state: AppState
    namespace: str


class Connection:
    def __init__(self, websocket: WebSocket, namespace: Namespace) -> None:
        self.ws = websocket
        self.namespace = namespace
        self.state: AppState = websocket.app.state.mlxserve
        self._send_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._channels: dict[int, Channel] = {}
        self._calls = 0
        self._principal = ""

    async def send(self, frame: dict[str, Any]) -> None:
        text = json.dumps(frame, ensure_ascii=False, allow_nan=False)
        async with self._send_lock:
            await self.ws.send_text(text)

    async def _authenticate(self) -> bool:
        try:
            text = await asyncio.wait_for(self.ws.receive_text(), AUTH_TIMEOUT_SECONDS)
            hello = json.loads(text)
        except (asyncio.TimeoutError, ValueError, KeyError):
            hello = None
        ok = (
            isinstance(hello, dict)
            and hello.get("authVersion") == 1
            and isinstance(hello.get("clientIdentifier"), str)
            and isinstance(hello.get("clientPasskey"), str)
            and len(hello["clientIdentifier"]) <= _MAX_ID_LENGTH
            and len(hello["clientPasskey"]) <= _MAX_ID_LENGTH
        )
        if not ok:
            error = (
                'The first message must be {"authVersion": 1, "clientIdentifier", "clientPasskey"}.'
            )
        else:
            assert isinstance(hello, dict)
            ok = websocket_authorized(
                self.ws.scope, self.state, hello["clientIdentifier"], hello["clientPasskey"]
            )
            error = (
                "This server requires an API token (create one with 'mlxserve token create' "
                "and pass it to the client as its apiToken)."
            )
        if ok:
            assert isinstance(hello, dict)
            self._principal = self._principal_of(hello["clientIdentifier"], hello["clientPasskey"])
            await self.send({"success": True})
            return True
        await self.send({"success": False, "error": error})
        await self.ws.close(code=1008)
        return False

    def _principal_of(self, client_identifier: str, client_passkey: str) -> str:
        """Whom the per-token caps count against: the header token that authorized the
        connection, else the token of the first frame; the client identifier when
        authentication is off."""
        tokens = self.state.tokens
        if not self.state.settings.require_auth:
            credential = f"client:{client_identifier}"
        else:
            verified = [t for t in presented_tokens(self.ws.scope) if tokens.verify(t)]
            credential = (verified or [f"{TOKEN_PREFIX}{client_identifier}:{client_passkey}"])[0]
        return self.state.sdk_quota.principal(credential)

    async def serve(self) -> None:
        await self.ws.accept()
        try:
            if not await self._authenticate():
                return
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                if text is None:
                    text = (message.get("bytes") or b"").decode("utf-8", "replace")
                try:
                    frame = json.loads(text)
                except ValueError:
                    frame = None
                await self._dispatch(frame)
        except WebSocketDisconnect:
            pass
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _dispatch(self, frame: Any) -> None:
        kind = frame.get("type") if isinstance(frame, dict) else None
        ns = self.namespace
        if kind == "rpcCall" and isinstance(frame.get("callId"), int):
            error = None
            if self._calls >= MAX_CALLS_PER_CONNECTION:
                error = _too_many("calls", MAX_CALLS_PER_CONNECTION)
            elif not self.state.sdk_quota.acquire(self._principal, "calls", MAX_CALLS_PER_TOKEN):
                error = _too_many_for_token("calls", MAX_CALLS_PER_TOKEN)
            if error is not None:
                await self.send({"type": "rpcError", "callId": frame["callId"], "error": error})
                return
            handler = ns.rpc.get(frame.get("endpoint"))
            self._calls += 1
            self._spawn(
                self._rpc(
                    frame["callId"], str(frame.get("endpoint")), handler, frame.get("parameter")
                )
            )
        elif kind == "channelCreate" and isinstance(frame.get("channelId"), int):
            quota = self.state.sdk_quota
            error = None
            if len(self._channels) >= MAX_CHANNELS_PER_CONNECTION:
                error = _too_many("channels", MAX_CHANNELS_PER_CONNECTION)
            elif not quota.acquire(self._principal, "channels", MAX_CHANNELS_PER_TOKEN):
                error = _too_many_for_token("channels", MAX_CHANNELS_PER_TOKEN)
            if error is not None:
                frame = {"type": "channelError", "channelId": frame["channelId"], "error": error}
                await self.send(frame)
                return
            channel = Channel(self, frame["channelId"])
            self._channels[channel.id] = channel
            chandler = ns.channels.get(frame.get("endpoint"))
            self._spawn(
                self._channel(
                    channel, str(frame.get("endpoint")), chandler, frame.get("creationParameter")
                )
            )
        elif kind == "channelSend":
            target = self._channels.get(frame.get("channelId"))
            if target is not None:
                target.received(frame.get("message"))
        elif kind in ("signalSubscribe", "writableSignalSubscribe"):
            error = unsupported(ns.name, str(frame.get("endpoint")), "signal").serialize()
            error_type = "signalError" if kind == "signalSubscribe" else "writableSignalError"
            await self.send(
                {"type": error_type, "subscribeId": frame.get("subscribeId"), "error": error}
            )
        elif kind == "keepAlive":
            await self.send({"type": "keepAliveAck"})
        elif kind in (
            "channelAck",
            "signalUnsubscribe",
            "writableSignalUnsubscribe",
            "communicationWarning",
        ):
            # Nothing of ours needs acks, and we open no signals.
            return
        else:
            await self.send(
                {
                    "type": "communicationWarning",
                    "warning": f"Unrecognized message of type {kind!r}; it was ignored.",
                }
            )

    async def _rpc(
        self, call_id: int, endpoint: str, handler: RpcHandler | None, parameter: Any
    ) -> None:
        try:
            await self._answer(call_id, endpoint, handler, parameter)
        finally:
            self._calls -= 1
            self.state.sdk_quota.release(self._principal, "calls")

    async def _answer(
        self, call_id: int, endpoint: str, handler: RpcHandler | None, parameter: Any
    ) -> None:
        try:
            if handler is None:
                raise unsupported(self.namespace.name, endpoint, "rpc")
            result = await handler(Context(self.state, self.namespace.name), parameter)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure is answered: the client waits for one
            await self._send_quietly(
                {"type": "rpcError", "callId": call_id, "error": serialize_error(exc)}
            )
            return
        frame: dict[str, Any] = {"type": "rpcResult", "callId": call_id}
        if result is not None:
            frame["result"] = result
        try:
            await self._send_quietly(frame)
        except (TypeError, ValueError) as exc:  # not JSON (a NaN in an embedding, say)
            error = SdkError(f"The result could not be encoded as JSON: {exc}").serialize()
            await self._send_quietly({"type": "rpcError", "callId": call_id, "error": error})

    async def _channel(
        self, channel: Channel, endpoint: str, handler: ChannelHandler | None, parameter: Any
    ) -> None:
        try:
            if handler is None:
                raise unsupported(self.namespace.name, endpoint, "channel")
            await handler(Context(self.state, self.namespace.name), channel, parameter)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._send_quietly(
                {"type": "channelError", "channelId": channel.id, "error": serialize_error(exc)}
            )
        else:
            await self._send_quietly({"type": "channelClose", "channelId": channel.id})
        finally:
            self._channels.pop(channel.id, None)
            self.state.sdk_quota.release(self._principal, "channels")

    async def _send_quietly(self, frame: dict[str, Any]) -> None:
        # The client may have gone; there is no one left to tell.
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            await self.send(frame)
