"""What the web app (and any script) needs beyond LM Studio's routes: the stored chats (list,
get, rename, delete), OpenAI's ``GET``/``DELETE /v1/responses/{id}``, hub search, cancelling
a download, deleting a downloaded model, and API tokens (list, create, revoke)."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlxserve.core.deletion import delete_model
from mlxserve.core.hubsearch import FORMATS, MAX_RESULTS, HubSearch, machine_memory
from mlxserve.errors import Forbidden, InvalidRequest, NotFoundRoute
from mlxserve.http.middleware import presented_tokens
from mlxserve.protocols.library import CreateToken, DeleteModel, RenameChat
from mlxserve.routes.common import parse, read_json
from mlxserve.state import AppState


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.mlxserve
    return state


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query_params.get(name)
    if text is None:
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        raise InvalidRequest(f"{name} must be an integer from {low} to {high}.", param=name)
    return int(text)


# --- stored chats -----------------------------------------------------------------------


async def list_chats(request: Request) -> Response:
    """Stored chats, the most recently continued first."""
    limit = _int_param(request, "limit", 200, 1, 1000)
    chats = await asyncio.to_thread(_state(request).chats.chats, limit)
    return JSONResponse({"object": "list", "data": [c.as_json() for c in chats]})


async def get_chat(request: Request) -> Response:
    """One chat with every turn of every branch."""
    summary, turns = await asyncio.to_thread(
        _state(request).chats.chat, request.path_params["chat_id"]
    )
    return JSONResponse({**summary.as_json(), "responses": [t.as_json() for t in turns]})


async def rename_chat(request: Request) -> Response:
    body = parse(RenameChat, await read_json(request))
    title = " ".join(body.title.split())
    if not title:
        raise InvalidRequest("title must hold some text.", param="title")
    summary = await asyncio.to_thread(
        _state(request).chats.rename_chat, request.path_params["chat_id"], title
    )
    return JSONResponse(summary.as_json())


async def delete_chat(request: Request) -> Response:
    chat_id = request.path_params["chat_id"]
    await asyncio.to_thread(_state(request).chats.delete_chat, chat_id)
    return JSONResponse({"id": chat_id, "object": "chat.deleted", "deleted": True})


# --- OpenAI's stored responses ------------------------------------------------------------


async def get_response(request: Request) -> Response:
    """A response stored by ``POST /v1/responses`` (``store`` true), as it was returned."""
    reply = await asyncio.to_thread(_state(request).chats.reply, request.path_params["id"])
    return JSONResponse(reply)


async def delete_response(request: Request) -> Response:
    """Delete a stored response; responses continuing from it keep their history."""
    response_id = request.path_params["id"]
    await asyncio.to_thread(_state(request).chats.delete_response, response_id)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


# --- models: search, cancel a download, delete --------------------------------------------


async def search_models(request: Request) -> Response:
    """Hugging Face MLX and GGUF repositories matching ``q``, most downloaded first."""
    state = _state(request)
    query = request.query_params.get("q", "")
    fmt = request.query_params.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise InvalidRequest("format must be 'mlx' or 'gguf'.", param="format")
    formats = FORMATS if fmt is None else (fmt,)
    limit = _int_param(request, "limit", 20, 1, MAX_RESULTS)
    search = HubSearch(state.downloads, state.settings.guardrail_memory_gb)
    found = await asyncio.to_thread(search.search, query, formats, limit)
    body: dict[str, Any] = {
        "object": "list",
        "memory_bytes": machine_memory(),
        "data": [m.as_json() for m in found],
    }
    return JSONResponse(body)


async def list_downloads(request: Request) -> Response:
    """This server's download jobs (the last 200), newest first."""
    jobs = list(_state(request).downloads.jobs.values())
    return JSONResponse({"object": "list", "data": [j.status() for j in reversed(jobs)]})


async def cancel_download(request: Request) -> Response:
    """Stop a download; asking for the model again resumes where it stopped."""
    job = await _state(request).downloads.cancel(request.path_params["job_id"])
    return JSONResponse(job.status())


async def remove_model(request: Request) -> Response:
    """Delete a downloaded model from the models directory."""
    body = parse(DeleteModel, await read_json(request))
    state = _state(request)
    info = await delete_model(state.manager, body.model)
    return JSONResponse({"id": info.key, "object": "model", "deleted": True})


# --- API tokens -----------------------------------------------------------------------------


def _token_holder(request: Request) -> AppState:
    """Tokens are managed by token holders only, even while authentication is off."""
    state = _state(request)
    if not any(state.tokens.verify(t) for t in presented_tokens(request.scope)):
        raise Forbidden(
            "Managing API tokens needs a live API token in the request (create the first one "
            "with 'mlxserve token create')."
        )
    return state


async def list_tokens(request: Request) -> Response:
    tokens = await asyncio.to_thread(_token_holder(request).tokens.list)
    data = [{"id": t.id, "name": t.name, "created_at": t.created_at} for t in tokens]
    return JSONResponse({"object": "list", "data": data})


async def create_token(request: Request) -> Response:
    """A new token; the token itself is in this reply only."""
    state = _token_holder(request)
    body = parse(CreateToken, await read_json(request))
    info, token = await asyncio.to_thread(state.tokens.create, body.name)
    return JSONResponse({"id": info.id, "name": info.name, "created_at": info.created_at,
                         "token": token})  # fmt: skip


async def revoke_token(request: Request) -> Response:
    state = _token_holder(request)
    token_id = request.path_params["token_id"]
    if not await asyncio.to_thread(state.tokens.revoke_id, token_id):
        raise NotFoundRoute("No API token with this id.", param="token_id")
    return JSONResponse({"id": token_id, "object": "token", "deleted": True})


routes = [
    Route("/api/v1/chats", list_chats, methods=["GET"]),
    Route("/api/v1/chats/{chat_id}", get_chat, methods=["GET"]),
    Route("/api/v1/chats/{chat_id}", rename_chat, methods=["PATCH"]),
    Route("/api/v1/chats/{chat_id}", delete_chat, methods=["DELETE"]),
    Route("/v1/responses/{id}", get_response, methods=["GET"]),
    Route("/v1/responses/{id}", delete_response, methods=["DELETE"]),
    Route("/api/v1/models/search", search_models, methods=["GET"]),
    Route("/api/v1/models/download", list_downloads, methods=["GET"]),
    Route("/api/v1/models/download/{job_id}", cancel_download, methods=["DELETE"]),
    Route("/api/v1/models/delete", remove_model, methods=["POST"]),
    Route("/api/v1/tokens", list_tokens, methods=["GET"]),
    Route("/api/v1/tokens", create_token, methods=["POST"]),
    Route("/api/v1/tokens/{token_id}", revoke_token, methods=["DELETE"]),
]
