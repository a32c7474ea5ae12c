"""``GET /openapi.json``: an OpenAPI 3.1 document for every HTTP route, generated from the
pydantic wire models (``protocols/``).

Every route of the app appears in it. A route listed in :data:`OPERATIONS` gets its request
and reply schemas, its dialect's error envelope and its summary; any other route gets a
generic entry (its docstring, any JSON), so a new route is never missing. Documenting a new
route is one entry here::

    Operation("POST", "/api/v1/models/download", "Download a model", "lmstudio",
              request=DownloadRequest, reply=DownloadJob)

with ``reply`` a model in ``protocols/replies.py`` (or the route's own protocol module) that
names the fields every reply carries. ``tests/test_openapi.py`` validates the document, and
``tests/test_openapi_fuzz.py`` fuzzes the server against it with schemathesis.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlxserve import __version__
from mlxserve.http.errors import Dialect, dialect_of
from mlxserve.protocols import library, replies
from mlxserve.protocols.anthropic import CountTokensRequest, MessagesRequest
from mlxserve.protocols.downloads import DownloadRequest
from mlxserve.protocols.embeddings import EmbeddingRequest
from mlxserve.protocols.lmstudio import ChatRequest, LoadModelRequest, UnloadModelRequest
from mlxserve.protocols.openai import ChatCompletionRequest, CompletionRequest
from mlxserve.protocols.responses import ResponsesRequest
from mlxserve.state import AppState


@dataclass(frozen=True)
class Operation:
    """One documented route: ``path`` as Starlette writes it (converters allowed)."""

    method: str
    path: str
    summary: str
    dialect: Dialect
    request: type[BaseModel] | None = None
    reply: type[BaseModel] | None = None
    # Answers ``text/event-stream`` when the request asks for a stream.
    streams: bool = False
    # Answers nothing but ``text/event-stream``.
    event_stream: bool = False
    # May load a model, whose failure is a (deterministic) 500.
    loads: bool = False
    # Answers text (Prometheus' exposition format) as well as JSON.
    text: bool = False


OPERATIONS: tuple[Operation, ...] = (
    Operation("GET", "/health", "Liveness, version and the loaded models", "openai",
              reply=replies.Health),
    Operation("GET", "/v1/models", "List models (OpenAI)", "openai", reply=replies.ModelList),
    Operation("GET", "/v1/models/{model:path}", "One model (OpenAI)", "openai",
              reply=replies.ModelObject),
    Operation("POST", "/v1/chat/completions", "Chat completion (OpenAI)", "openai",
              request=ChatCompletionRequest, reply=replies.ChatCompletion, streams=True,
              loads=True),
    Operation("POST", "/v1/completions", "Text completion (OpenAI)", "openai",
              request=CompletionRequest, reply=replies.TextCompletion, streams=True, loads=True),
    Operation("POST", "/v1/embeddings", "Embeddings (OpenAI)", "openai",
              request=EmbeddingRequest, reply=replies.EmbeddingList, loads=True),
    Operation("POST", "/v1/responses", "Responses API (OpenAI)", "openai",
              request=ResponsesRequest, reply=replies.ResponseObject, streams=True, loads=True),
    Operation("POST", "/v1/messages", "Messages (Anthropic)", "anthropic",
              request=MessagesRequest, reply=replies.AnthropicMessage, streams=True, loads=True),
    Operation("POST", "/v1/messages/count_tokens", "Count prompt tokens (Anthropic)",
              "anthropic", request=CountTokensRequest, reply=replies.TokenCount, loads=True),
    Operation("GET", "/api/v1/models", "List models and their loaded instances (LM Studio)",
              "lmstudio", reply=replies.LMStudioModels),
    Operation("POST", "/api/v1/models/load", "Load a model (LM Studio)", "lmstudio",
              request=LoadModelRequest, reply=replies.LMStudioLoaded, loads=True),
    Operation("POST", "/api/v1/models/unload", "Unload a model instance (LM Studio)",
              "lmstudio", request=UnloadModelRequest, reply=replies.LMStudioLoaded),
    Operation("POST", "/api/v1/chat", "Chat, stateful if asked (LM Studio)", "lmstudio",
              request=ChatRequest, reply=replies.LMStudioChatResult, streams=True, loads=True),
    Operation("POST", "/api/v1/models/download", "Download a model (LM Studio)", "lmstudio",
              request=DownloadRequest),
    Operation("GET", "/api/v1/logs/stream", "Live request/response log (mlxserve log stream)",
              "lmstudio", event_stream=True),
    Operation("GET", "/api/v1/chats", "List stored chats", "lmstudio",
              reply=library.ChatList),
    Operation("GET", "/api/v1/chats/{chat_id}", "One stored chat with all its turns",
              "lmstudio", reply=library.ChatDetail),
    Operation("PATCH", "/api/v1/chats/{chat_id}", "Rename a stored chat", "lmstudio",
              request=library.RenameChat, reply=library.ChatSummary),
    Operation("DELETE", "/api/v1/chats/{chat_id}", "Delete a stored chat", "lmstudio",
              reply=library.Deleted),
    Operation("GET", "/v1/responses/{id}", "Get a stored response (OpenAI)", "openai",
              reply=replies.ResponseObject),
    Operation("DELETE", "/v1/responses/{id}", "Delete a stored response (OpenAI)", "openai",
              reply=library.Deleted),
    Operation("GET", "/api/v1/models/search", "Search Hugging Face for MLX and GGUF models",
              "lmstudio", reply=library.HubSearchResults),
    Operation("GET", "/api/v1/models/download", "This server's download jobs", "lmstudio"),
    Operation("DELETE", "/api/v1/models/download/{job_id}", "Cancel a download", "lmstudio"),
    Operation("POST", "/api/v1/models/delete", "Delete a downloaded model", "lmstudio",
              request=library.DeleteModel, reply=library.Deleted),
    Operation("GET", "/api/v1/tokens", "List API tokens (token holders only)", "lmstudio",
              reply=library.TokenList),
    Operation("POST", "/api/v1/tokens", "Create an API token (token holders only)",
              "lmstudio", request=library.CreateToken, reply=library.CreatedToken),
    Operation("DELETE", "/api/v1/tokens/{token_id}", "Revoke an API token (token holders "
              "only)", "lmstudio", reply=library.Deleted),
    Operation("GET", "/metrics", "Metrics: Prometheus text, or JSON with ?format=json",
              "openai", text=True),
    Operation("GET", "/api/v0/models", "List models (LM Studio v0)", "openai",
              reply=replies.LMStudioV0Models),
    Operation("GET", "/api/v0/models/{model:path}", "One model (LM Studio v0)", "openai"),
    Operation("POST", "/api/v0/chat/completions", "Chat completion (LM Studio v0)", "openai",
              request=ChatCompletionRequest, reply=replies.ChatCompletion, streams=True,
              loads=True),
    Operation("POST", "/api/v0/completions", "Text completion (LM Studio v0)", "openai",
              request=CompletionRequest, reply=replies.TextCompletion, streams=True, loads=True),
    Operation("POST", "/api/v0/embeddings", "Embeddings (LM Studio v0)", "openai",
              request=EmbeddingRequest, reply=replies.EmbeddingList, loads=True),
)  # fmt: skip

_ERRORS: dict[Dialect, type[BaseModel]] = {
    "openai": replies.OpenAIError,
    "anthropic": replies.AnthropicError,
    "lmstudio": replies.LMStudioError,
}
_CONVERTER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(:[A-Za-z_]+)?\}")
_REF = "#/components/schemas/{model}"
# One server-sent event: a JSON ``data`` payload, named by ``event`` in the dialects that
# name their events.
_SSE_EVENT = {
    "type": "object",
    "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
    "required": ["data"],
}


def openapi_path(path: str) -> str:
    """Starlette's ``/v1/models/{model:path}`` as OpenAPI writes it: ``/v1/models/{model}``."""
    return _CONVERTER.sub(r"{\1}", path)


def _schemas() -> tuple[dict[Any, Any], dict[str, Any]]:
    models: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = []
    for op in OPERATIONS:
        if op.request is not None:
            models.append((op.request, "validation"))
        if op.reply is not None:
            models.append((op.reply, "validation"))
    models += [(m, "validation") for m in _ERRORS.values()]
    refs, defs = models_json_schema(list(dict.fromkeys(models)), ref_template=_REF)
    return refs, defs.get("$defs", {})


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _operation(
    op: Operation | None,
    method: str,
    path: str,
    doc: str | None,
    refs: dict[Any, Any],
    *,
    open_path: bool,
    require_auth: bool,
) -> dict[str, Any]:
    dialect = op.dialect if op is not None else dialect_of(path)
    error = _json(refs[(_ERRORS[dialect], "validation")])
    if op is not None and op.reply is not None:
        ok: dict[str, Any] = _json(refs[(op.reply, "validation")])
    else:
        ok = _json({})
    if op is not None and op.streams:
        ok["text/event-stream"] = {"schema": _SSE_EVENT}
    if op is not None and op.event_stream:
        ok = {"text/event-stream": {"schema": _SSE_EVENT}}
    if op is not None and op.text:
        ok["text/plain"] = {"schema": {"type": "string"}}
    responses: dict[str, Any] = {"200": {"description": "Success", "content": ok}}
    statuses = {"400": "Invalid request", "403": "Host or Origin refused (DNS-rebinding guard)",
                "404": "Unknown model or resource", "503": "Busy or shutting down; retry after "
                "Retry-After seconds"}  # fmt: skip
    if not open_path:
        statuses["401"] = "Missing or invalid API token (when authentication is required)"
    if method == "POST":
        statuses["413"] = "Request body over the limit"
    if op is not None and op.loads:
        statuses["500"] = "The model failed to load (not retryable: x-should-retry false)"
    for status, description in sorted(statuses.items()):
        responses[status] = {"description": description, "content": error}
    entry: dict[str, Any] = {
        "summary": op.summary if op is not None else (doc or path).strip().split("\n")[0],
        "operationId": f"{method.lower()}_{re.sub(r'[^A-Za-z0-9]+', '_', path).strip('_')}",
        "tags": [dialect],
        "responses": responses,
    }
    params = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name, _ in _CONVERTER.findall(path)
    ]
    if params:
        entry["parameters"] = params
    if op is not None and op.request is not None:
        schema = refs[(op.request, "validation")]
        entry["requestBody"] = {"required": True, "content": _json(schema)}
    if require_auth and not open_path:
        entry["security"] = [{"bearer": []}] + ([{"apiKey": []}] if dialect == "anthropic" else [])
    return entry


def build_document(routes: list[Any], *, require_auth: bool = False) -> dict[str, Any]:
    """The OpenAPI document for ``routes`` (an app's routes; websockets are left out)."""
    from mlxserve.http.middleware import OPEN_PATHS

    refs, defs = _schemas()
    known = {(op.method, openapi_path(op.path)): op for op in OPERATIONS}
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route) or not route.methods or not route.include_in_schema:
            continue
        path = openapi_path(route.path)
        for method in sorted(route.methods - {"HEAD"}):
            op = known.get((method, path))
            paths.setdefault(path, {})[method.lower()] = _operation(
                op,
                method,
                path,
                route.endpoint.__doc__,
                refs,
                open_path=path in OPEN_PATHS,
                require_auth=require_auth,
            )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mlxserve",
            "version": __version__,
            "description": "MLX and GGUF models behind the OpenAI, Anthropic and LM Studio APIs.",
        },
        "paths": paths,
        "components": {
            "schemas": defs,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
    }


async def openapi_json(request: Request) -> Response:
    """The OpenAPI document of this server."""
    document = getattr(request.app.state, "openapi_document", None)
    if document is None:
        state: AppState = request.app.state.mlxserve
        document = build_document(request.app.routes, require_auth=state.settings.require_auth)
        request.app.state.openapi_document = document
    return JSONResponse(document)


routes = [Route("/openapi.json", openapi_json, methods=["GET"])]
