"""The endpoints the ``llm`` and ``embedding`` namespaces share (``baseModelBackendInterface``):
get-or-load, load, unload, list and describe instances; and the embedding endpoints."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from mlxserve.core.embeddings import EmbeddingRequest, embed
from mlxserve.core.instance import EmbeddingInstance, Loaded, LoadRequest
from mlxserve.core.registry import ModelInfo
from mlxserve.errors import ModelNotFound
from mlxserve.sdk import shapes
from mlxserve.sdk.kvconfig import load_request
from mlxserve.sdk.transport import Channel, Context, SdkError, no_model_matching
from mlxserve.state import AppState

# While a load runs, a progress message this often: the Python SDK's sync client gives up
# after 60 silent seconds. Our engines report no load progress, so the value is an estimate
# that rises towards 1 and reaches it when the load is done.
LOAD_HEARTBEAT_SECONDS = 5.0


def _params(parameter: Any) -> dict[str, Any]:
    if not isinstance(parameter, dict):
        raise SdkError("The request parameter must be an object.")
    return parameter


def _domain(ctx: Context) -> str:
    return "embedding" if ctx.namespace == "embedding" else "llm"


async def find_downloaded(state: AppState, ctx: Context, name: Any) -> ModelInfo:
    """The downloaded model a key, folder name or LM Studio path names, in this domain."""
    if not isinstance(name, str) or not name:
        raise SdkError("A model key is required.")
    manager = state.manager
    candidates = [name]
    if name.lower().endswith(".gguf") and name.count("/") >= 2:
        candidates.append(name.rsplit("/", 1)[0])
    info: ModelInfo | None = None
    for candidate in candidates:
        try:
            info = await manager.find_model(candidate)
            break
        except ModelNotFound:
            continue
    if info is None:
        raise SdkError(
            f"No downloaded model matches '{name[:128]}'.",
            suggestion="client.system.listDownloadedModels() lists the available models.",
            display_data={
                "code": "generic.noModelMatchingQuery",
                "query": {"identifier": name[:256]},
                "loadedModelsSample": [i.id for i in shapes.domain_instances(state, ctx.namespace)][
                    :10
                ],
                "totalLoadedModels": len(shapes.domain_instances(state, ctx.namespace)),
            },
        )
    if info.type != _domain(ctx):
        raise SdkError(
            f"'{info.key}' is an {info.type} model, not an {_domain(ctx)} model.",
            display_data={
                "code": "generic.domainMismatch",
                "path": shapes.model_path(info),
                "actualDomain": info.type,
                "expectedDomain": _domain(ctx),
            },
        )
    return info


async def _with_progress(channel: Channel, work: asyncio.Future[Loaded], kind: str) -> Loaded:
    started = time.monotonic()
    while True:
        done, _ = await asyncio.wait({work}, timeout=LOAD_HEARTBEAT_SECONDS)
        if done:
            loaded = work.result()
            await channel.send({"type": kind, "progress": 1.0})
            return loaded
        elapsed = time.monotonic() - started
        await channel.send({"type": kind, "progress": round(elapsed / (elapsed + 30.0), 4)})


async def get_or_load(ctx: Context, channel: Channel, parameter: Any) -> None:
    p = _params(parameter)
    state = ctx.state
    name = p.get("identifier")
    found = shapes.find_loaded(
        state, ctx.namespace, {"type": "query", "query": {"identifier": name}}
    )
    if found is not None:
        await channel.send({"type": "alreadyLoaded", "info": shapes.instance_info(found)})
        return
    info = await find_downloaded(state, ctx, name)
    request = load_request(
        p.get("loadConfigStack"), ttl_ms=p.get("loadTtlMs"), embedding=_domain(ctx) == "embedding"
    )
    manager = state.manager
    await channel.send(
        {
            "type": "startLoading",
            "identifier": manager.next_instance_id(info.key),
            "info": shapes.model_info(info),
        }
    )
    if state.settings.auto_evict and state.settings.jit_loading:
        others: list[Loaded] = [*manager.loaded(), *manager.loaded_embedders()]
        for other in others:
            if other.jit and other.info.type == info.type:
                await channel.send(
                    {"type": "unloadingOtherJITModel", "info": shapes.instance_info(other)}
                )
    work = asyncio.ensure_future(_jit_load(state, info, request))
    try:
        loaded = await _with_progress(channel, work, "loadProgress")
    finally:
        if not work.done():
            work.cancel()
    await channel.send({"type": "loadSuccess", "info": shapes.instance_info(loaded)})


async def _jit_load(state: AppState, info: ModelInfo, request: LoadRequest) -> Loaded:
    manager = state.manager
    if not state.settings.jit_loading:
        return await manager.load_any(info, request, reuse=True)
    if info.type == "embedding":
        async with manager.lease_embedder(info.key, ttl=request.ttl) as embedder:
            return embedder
    lease = manager.lease(info.key, ttl=request.ttl, context_length=request.context_length)
    async with lease as instance:
        return instance


async def load_model(ctx: Context, channel: Channel, parameter: Any) -> None:
    p = _params(parameter)
    state = ctx.state
    info = await find_downloaded(state, ctx, p.get("modelKey"))
    identifier = p.get("identifier")
    taken: list[Loaded] = [*state.manager.loaded(), *state.manager.loaded_embedders()]
    if isinstance(identifier, str) and any(i.id == identifier for i in taken):
        raise SdkError(
            f"A model instance with the identifier '{identifier[:256]}' already exists.",
            suggestion="Unload it first, or choose another identifier.",
        )
    request = load_request(
        p.get("loadConfigStack"),
        identifier=identifier,
        ttl_ms=p.get("ttlMs"),
        embedding=info.type == "embedding",
    )
    await channel.send({"type": "resolved", "info": shapes.model_info(info)})
    work = asyncio.ensure_future(state.manager.load_any(info, request))
    try:
        loaded = await _with_progress(channel, work, "progress")
    finally:
        if not work.done():
            work.cancel()
    await channel.send({"type": "success", "info": shapes.instance_info(loaded)})


async def unload_model(ctx: Context, parameter: Any) -> None:
    p = _params(parameter)
    identifier = p.get("identifier")
    instances = shapes.domain_instances(ctx.state, ctx.namespace)
    found = next((i for i in instances if i.id == identifier), None)
    if found is None:
        query = {"identifier": identifier} if isinstance(identifier, str) else {}
        raise no_model_matching(query, [i.id for i in instances])
    await ctx.state.manager.unload(found.id)
    return None


async def list_loaded(ctx: Context, parameter: Any) -> list[dict[str, Any]]:
    return [shapes.instance_info(i) for i in shapes.domain_instances(ctx.state, ctx.namespace)]


async def get_model_info(ctx: Context, parameter: Any) -> dict[str, Any] | None:
    p = _params(parameter)
    if p.get("throwIfNotFound", True):
        return shapes.instance_info(
            shapes.resolve_loaded(ctx.state, ctx.namespace, p.get("specifier"))
        )
    found = shapes.find_loaded(ctx.state, ctx.namespace, p.get("specifier"))
    return shapes.instance_info(found) if found is not None else None


async def get_load_config(ctx: Context, parameter: Any) -> dict[str, Any]:
    p = _params(parameter)
    return shapes.load_config(shapes.resolve_loaded(ctx.state, ctx.namespace, p.get("specifier")))


async def get_processing_state(ctx: Context, parameter: Any) -> dict[str, Any] | None:
    p = _params(parameter)
    if p.get("throwIfNotFound", True):
        instance = shapes.resolve_loaded(ctx.state, ctx.namespace, p.get("specifier"))
    else:
        found = shapes.find_loaded(ctx.state, ctx.namespace, p.get("specifier"))
        if found is None:
            return None
        instance = found
    pending = int(instance.engine.pending)
    if pending == 0:
        return {"status": "idle", "queued": 0}
    busy = "computingEmbedding" if isinstance(instance, EmbeddingInstance) else "generating"
    return {"status": busy, "queued": max(pending - 1, 0)}


# --- embedding ---------------------------------------------------------------------------


def _input(p: dict[str, Any]) -> str:
    text = p.get("inputString")
    if not isinstance(text, str):
        raise SdkError("inputString must be a string.")
    return text


async def embed_string(ctx: Context, parameter: Any) -> dict[str, Any]:
    p = _params(parameter)
    instance = shapes.resolve_embedder(ctx.state, p.get("modelSpecifier"))
    result = await embed(
        ctx.state.manager, EmbeddingRequest(instance.id, (_input(p),), single=True)
    )
    return {"embedding": [float(x) for x in result.vectors[0]]}


async def _embedding_tokens(ctx: Context, p: dict[str, Any]) -> tuple[list[int], EmbeddingInstance]:
    found = shapes.resolve_embedder(ctx.state, p.get("specifier"))
    async with ctx.state.manager.lease_embedder(found.id) as instance:
        lists = await asyncio.to_thread(instance.engine.tokenize, [_input(p)])
    return list(lists[0]), instance


async def embedding_tokenize(ctx: Context, parameter: Any) -> dict[str, Any]:
    # As LM Studio does, the tokens include the model's markers ([CLS] ... [SEP]).
    tokens, instance = await _embedding_tokens(ctx, _params(parameter))
    info = instance.engine.info
    return {"tokens": [*info.prefix, *tokens, *info.suffix]}


async def embedding_count_tokens(ctx: Context, parameter: Any) -> dict[str, Any]:
    tokens, _ = await _embedding_tokens(ctx, _params(parameter))
    return {"tokenCount": len(tokens)}
