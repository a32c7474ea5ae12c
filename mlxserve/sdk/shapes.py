"""Model and instance descriptions in the SDKs' shapes (``ModelInfo``, ``*InstanceInfo``),
and finding the loaded instance a ``ModelSpecifier`` names.

The payloads carry the union of what ``@lmstudio/sdk`` 1.5 and 2.0 and ``lmstudio`` (Python)
require: one invalid entry makes a whole list call fail in the clients.
"""

from __future__ import annotations

import hashlib
from typing import Any

from mlxserve.core.instance import EmbeddingInstance, Instance, Loaded
from mlxserve.core.registry import ModelInfo
from mlxserve.sdk.transport import SdkError, no_model_matching
from mlxserve.state import AppState


def model_path(info: ModelInfo) -> str:
    """LM Studio's relative path: ``publisher/repo/file.gguf``, or the MLX folder."""
    if info.format == "gguf":
        return f"{info.key}/{info.weights.name}"
    return info.key


def model_info(info: ModelInfo) -> dict[str, Any]:
    path = model_path(info)
    out: dict[str, Any] = {
        "type": info.type,
        "modelKey": info.key,
        "format": "gguf" if info.format == "gguf" else "safetensors",
        "displayName": info.display_name,
        "publisher": info.publisher,
        "path": path,
        "sizeBytes": int(info.size_bytes),
        "indexedModelIdentifier": path,
        "deviceIdentifier": None,
        "architecture": info.architecture,
        "maxContextLength": int(info.max_context_length),
    }
    if info.params_string:
        out["paramsString"] = info.params_string
    if info.quantization:
        bits = max(1, round(info.bits_per_weight or 16))
        out["quantization"] = {"name": info.quantization, "bits": int(bits)}
    if info.type == "llm":
        out["vision"] = bool(info.vision)
        out["trainedForToolUse"] = bool(info.trained_for_tool_use)
    return out


def instance_reference(instance: Loaded) -> str:
    """An opaque id unique to this loaded instance (a reload under the same id differs)."""
    seed = f"{instance.id}\0{instance.loaded_at!r}".encode()
    return hashlib.sha256(seed).hexdigest()[:24]


def instance_info(instance: Loaded) -> dict[str, Any]:
    return model_info(instance.info) | {
        "identifier": instance.id,
        "instanceReference": instance_reference(instance),
        "ttlMs": int(instance.ttl * 1000) if instance.ttl else None,
        "lastUsedTime": None,
        "contextLength": int(instance.context_length),
    }


def load_config(instance: Loaded) -> dict[str, Any]:
    """The instance's load config as a KV config (JS ``getContextLength()`` reads it)."""
    prefix = "embedding" if isinstance(instance, EmbeddingInstance) else "llm"
    fields = [{"key": f"{prefix}.load.contextLength", "value": instance.context_length}]
    parallel = instance.load_config.get("parallel")
    if parallel is not None:
        fields.append({"key": "llm.load.numParallelSessions", "value": parallel})
    return {"fields": fields}


def domain_instances(state: AppState, namespace: str) -> list[Loaded]:
    manager = state.manager
    if namespace == "embedding":
        return list(manager.loaded_embedders())
    return list(manager.loaded())


def find_loaded(state: AppState, namespace: str, specifier: Any) -> Loaded | None:
    """The loaded instance a ``ModelSpecifier`` names, or None. A query's identifier may be
    an instance id, a model key, a folder name, or a path (``publisher/repo/file.gguf``)."""
    if not isinstance(specifier, dict):
        raise SdkError("The model specifier must be an object.")
    instances = domain_instances(state, namespace)
    if specifier.get("type") == "instanceReference":
        ref = specifier.get("instanceReference")
        return next((i for i in instances if instance_reference(i) == ref), None)
    query = specifier.get("query")
    if specifier.get("type") != "query" or not isinstance(query, dict):
        raise SdkError("The model specifier must be a query or an instance reference.")
    domain = query.get("domain")
    if domain is not None and domain != ("embedding" if namespace == "embedding" else "llm"):
        return None
    name = query.get("identifier") or query.get("path")
    if name is None:
        return instances[0] if instances else None
    if not isinstance(name, str):
        raise SdkError("The model query's identifier must be a string.")
    for match in (
        lambda i: i.id == name,
        lambda i: i.info.key == name,
        lambda i: model_path(i.info) == name,
        lambda i: i.info.name == name,
        lambda i: i.info.key.lower().startswith(name.lower()),
    ):
        found = [i for i in instances if match(i)]
        if found:
            return found[0]
    return None


def resolve_loaded(state: AppState, namespace: str, specifier: Any) -> Loaded:
    found = find_loaded(state, namespace, specifier)
    if found is not None:
        return found
    if isinstance(specifier, dict) and specifier.get("type") == "instanceReference":
        raise SdkError(
            "This model instance has been unloaded.",
            display_data={"code": "generic.specificModelUnloaded"},
        )
    query = specifier.get("query") if isinstance(specifier, dict) else None
    loaded = [i.id for i in domain_instances(state, namespace)]
    raise no_model_matching(query if isinstance(query, dict) else {}, loaded)


def resolve_llm(state: AppState, specifier: Any) -> Instance:
    found = resolve_loaded(state, "llm", specifier)
    assert isinstance(found, Instance)
    return found


def resolve_embedder(state: AppState, specifier: Any) -> EmbeddingInstance:
    found = resolve_loaded(state, "embedding", specifier)
    assert isinstance(found, EmbeddingInstance)
    return found
