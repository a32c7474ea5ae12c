"""The SDK surface: the discovery probes and one websocket per namespace.

``GET /lmstudio-greeting`` is what both SDKs probe before connecting; ``GET /lms-status`` is
what the ``lms`` CLI probes. Every namespace the clients open is accepted; those we do not
serve (``files``, ``repository``, ``diagnostics``, ``plugins``, ``runtime``) answer each
request with an error naming the endpoint, so a client never waits for nothing.
"""

from __future__ import annotations

import os
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket

from mlxserve import __version__
from mlxserve.sdk import files, models, predict, shapes
from mlxserve.sdk.transport import Connection, Context, Namespace, SdkError


async def greeting(request: Request) -> Response:
    return JSONResponse({"lmstudio": True})


async def lms_status(request: Request) -> Response:
    return JSONResponse({"package": "mlxserve", "version": __version__})


# --- system ------------------------------------------------------------------------------


async def list_downloaded(ctx: Context, parameter: Any) -> list[dict[str, Any]]:
    return [shapes.model_info(m) for m in await ctx.state.registry.models()]


async def list_variants(ctx: Context, parameter: Any) -> list[dict[str, Any]]:
    key = parameter.get("modelKey") if isinstance(parameter, dict) else None
    info = await ctx.state.registry.find(key) if isinstance(key, str) and "/" in key else None
    if info is None:
        raise SdkError(f"No downloaded model has the key {str(key)[:128]!r}.")
    return [shapes.model_info(info)]


async def version(ctx: Context, parameter: Any) -> dict[str, Any]:
    return {"version": __version__, "build": 0}


async def info(ctx: Context, parameter: Any) -> dict[str, Any]:
    return {"pid": os.getpid(), "isDaemon": False, "version": __version__}


async def base_prediction_config(ctx: Context, parameter: Any) -> dict[str, Any]:
    shapes.resolve_llm(
        ctx.state, parameter.get("specifier") if isinstance(parameter, dict) else None
    )
    return {
        "fields": [
            {"key": "llm.prediction.temperature", "value": ctx.state.settings.default_temperature}
        ]
    }


def _model_namespace(name: str) -> Namespace:
    ns = Namespace(name)
    ns.channels |= {"getOrLoad": models.get_or_load, "loadModel": models.load_model}
    ns.rpc |= {
        "unloadModel": models.unload_model,
        "listLoaded": models.list_loaded,
        "getModelInfo": models.get_model_info,
        "getLoadConfig": models.get_load_config,
        "getInstanceProcessingState": models.get_processing_state,
    }
    return ns


def namespaces() -> dict[str, Namespace]:
    llm = _model_namespace("llm")
    llm.channels["predict"] = predict.predict
    llm.rpc |= {
        "tokenize": predict.tokenize,
        "countTokens": predict.count_tokens,
        "applyPromptTemplate": predict.apply_prompt_template,
        "getBasePredictionConfig": base_prediction_config,
    }
    embedding = _model_namespace("embedding")
    embedding.rpc |= {
        "embedString": models.embed_string,
        "tokenize": models.embedding_tokenize,
        "countTokens": models.embedding_count_tokens,
    }
    system = Namespace(
        "system",
        rpc={
            "listDownloadedModels": list_downloaded,
            "listDownloadedModelVariants": list_variants,
            "version": version,
            "info": info,
        },
    )
    files_ns = Namespace("files", rpc={"uploadFileBase64": files.upload_base64})
    out = {ns.name: ns for ns in (llm, embedding, system, files_ns)}
    for name in ("repository", "diagnostics", "plugins", "runtime"):
        out[name] = Namespace(name)
    return out


def _endpoint(namespace: Namespace) -> Any:
    async def serve(websocket: WebSocket) -> None:
        await Connection(websocket, namespace).serve()

    return serve


def routes() -> list[BaseRoute]:
    out: list[BaseRoute] = [
        Route("/lmstudio-greeting", greeting, methods=["GET"]),
        Route("/lms-status", lms_status, methods=["GET"]),
    ]
    out += [WebSocketRoute(f"/{name}", _endpoint(ns)) for name, ns in namespaces().items()]
    return out
