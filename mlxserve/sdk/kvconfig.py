"""LM Studio's KV configs (``{fields: [{key, value}]}`` in stacks of layers) to our requests.

The SDKs turn their options (``temperature``, ``maxTokens``, ``contextLength``...) into these
keys (``lms-kv-config`` ``schema.ts``); a stack is collapsed in order, later layers winning.
"Checkbox" values are ``{"checked": bool, "value": X}``, unchecked meaning off.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, get_args

from mlxserve.core.instance import LoadRequest
from mlxserve.protocols.lmstudio import MAX_PARALLEL, CacheType
from mlxserve.sdk.transport import SdkError

P = "llm.prediction."
# The layer the SDKs add for ``.complete()``: the prompt is the raw text, no chat template.
RAW_COMPLETION_LAYER = "completeModeFormatting"


def collapse(stack: Any) -> tuple[dict[str, Any], set[str]]:
    """The collapsed fields of a ``KVConfigStack``, and the names of its layers."""
    if stack is None:
        return {}, set()
    layers = stack.get("layers") if isinstance(stack, dict) else None
    if not isinstance(layers, list):
        raise SdkError("A config stack must be {layers: [...]}.")
    fields: dict[str, Any] = {}
    names: set[str] = set()
    for layer in layers:
        config = layer.get("config") if isinstance(layer, dict) else None
        entries = config.get("fields") if isinstance(config, dict) else None
        if not isinstance(entries, list):
            raise SdkError("Each config layer must be {layerName, config: {fields: [...]}}.")
        names.add(str(layer.get("layerName")))
        for entry in entries:
            if isinstance(entry, dict) and isinstance(entry.get("key"), str):
                fields[entry["key"]] = entry.get("value")
    return fields, names


def _number(fields: dict[str, Any], key: str) -> float | None:
    value = fields.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SdkError(f"The config value of '{key}' must be a number.")
    return float(value)


def _checkbox(fields: dict[str, Any], key: str) -> float | None:
    """The value of a checkbox field when it is on; None when off or absent."""
    value = fields.get(key)
    if value is None:
        return None
    if not isinstance(value, dict) or "checked" not in value:
        raise SdkError(f"The config value of '{key}' must be {{checked, value}}.")
    inner = value.get("value")
    if not value["checked"] or inner is False or inner is None:
        return None
    if isinstance(inner, bool) or not isinstance(inner, (int, float)):
        raise SdkError(f"The config value of '{key}' must hold a number.")
    return float(inner)


@dataclass
class Prediction:
    """What a prediction config asks for, in our terms."""

    temperature: float | None = None
    max_tokens: int | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    stops: tuple[str, ...] = ()
    json_schema: dict[str, Any] | None = None
    tools: tuple[dict[str, Any], ...] = ()
    tool_choice: str = "auto"
    raw: bool = False
    # The SDK's draftModel and speculativeDecodingNumDraftTokensExact.
    draft_model: str | None = None
    num_draft_tokens: int | None = None
    echoed: list[dict[str, Any]] = field(default_factory=list)


def parse_tools(value: Any) -> tuple[dict[str, Any], ...]:
    if value is None or (isinstance(value, dict) and value.get("type") == "none"):
        return ()
    if not isinstance(value, dict) or value.get("type") != "toolArray":
        raise SdkError("llm.prediction.tools must be {type: 'none'} or {type: 'toolArray'}.")
    out = []
    for tool in value.get("tools") or []:
        function = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type") != "function" or not isinstance(function, dict):
            raise SdkError("Each tool must be {type: 'function', function: {name, ...}}.")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise SdkError("Each tool function needs a name.")
        entry: dict[str, Any] = {"name": name}
        if isinstance(function.get("description"), str):
            entry["description"] = function["description"]
        params = function.get("parameters")
        schema = dict(params) if isinstance(params, dict) else {"type": "object", "properties": {}}
        # The SDKs build the schema from a function's signature and never close it; a forced
        # call would otherwise run on with invented arguments until it runs out of tokens.
        if schema.get("type") == "object" and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        entry["parameters"] = schema
        out.append(entry)
    return tuple(out)


def prediction(stack: Any) -> Prediction:
    fields, layers = collapse(stack)
    out = Prediction()
    out.temperature = _number(fields, P + "temperature")
    max_tokens = _checkbox(fields, P + "maxPredictedTokens")
    if max_tokens is not None:
        if max_tokens < 1:
            raise SdkError("maxTokens must be at least 1.")
        out.max_tokens = int(max_tokens)
    top_k = _number(fields, P + "topKSampling")
    out.top_k = int(top_k) if top_k is not None and top_k > 0 else None
    out.top_p = _checkbox(fields, P + "topPSampling")
    out.min_p = _checkbox(fields, P + "minPSampling")
    out.repeat_penalty = _checkbox(fields, P + "repeatPenalty")
    out.presence_penalty = _checkbox(fields, P + "llama.presencePenalty")
    stops = fields.get(P + "stopStrings")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise SdkError("stopStrings must be a list of strings.")
        out.stops = tuple(s for s in stops if s)
    structured = fields.get(P + "structured")
    if isinstance(structured, dict) and structured.get("type") == "json":
        schema = structured.get("jsonSchema")
        if not isinstance(schema, dict):
            raise SdkError("A structured prediction of type 'json' needs a jsonSchema object.")
        out.json_schema = schema
    elif isinstance(structured, dict) and structured.get("type") == "gbnf":
        raise SdkError(
            "GBNF grammars are not supported by mlxserve; use a JSON schema (structured: "
            "{type: 'json', jsonSchema}) instead."
        )
    elif structured is not None and not (
        isinstance(structured, dict) and structured.get("type") == "none"
    ):
        raise SdkError("llm.prediction.structured must be of type 'none', 'json' or 'gbnf'.")
    out.tools = parse_tools(fields.get(P + "tools"))
    choice = fields.get(P + "toolChoice")
    if isinstance(choice, dict) and choice.get("type") == "generic":
        mode = choice.get("mode")
        if mode not in ("none", "auto", "required"):
            raise SdkError("toolChoice mode must be 'none', 'auto' or 'required'.")
        out.tool_choice = mode
    elif choice is not None:
        raise SdkError("llm.prediction.toolChoice must be {type: 'generic', mode}.")
    draft = fields.get(P + "speculativeDecoding.draftModel")
    if draft is not None and (not isinstance(draft, str) or not draft):
        raise SdkError("draftModel must be a model key.")
    out.draft_model = draft
    num = _number(fields, P + "speculativeDecoding.numDraftTokensExact")
    if num is not None and not 1 <= num <= 16:
        raise SdkError("speculativeDecodingNumDraftTokensExact must be between 1 and 16.")
    out.num_draft_tokens = int(num) if num is not None else None
    out.raw = RAW_COMPLETION_LAYER in layers
    return out


def echo(pred: Prediction, default_temperature: float) -> dict[str, Any]:
    """The prediction config the server used, as the ``success`` message reports it."""
    temperature = pred.temperature if pred.temperature is not None else default_temperature
    fields: list[dict[str, Any]] = [{"key": P + "temperature", "value": temperature}]
    max_tokens = pred.max_tokens
    fields.append(
        {
            "key": P + "maxPredictedTokens",
            "value": {"checked": max_tokens is not None, "value": max_tokens or 1},
        }
    )
    fields.append({"key": P + "stopStrings", "value": list(pred.stops)})
    return {"fields": fields}


CACHE_TYPES = get_args(CacheType)


def _cache_type(fields: dict[str, Any], key: str) -> str | None:
    """``llamaK/VCacheQuantizationType``: a checkbox around a llama.cpp cache type name."""
    value = fields.get(key)
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("value"), str):
        raise SdkError(f"The config value of '{key}' must be {{checked, value: type name}}.")
    if not value.get("checked"):
        return None
    name = value["value"]
    if name not in CACHE_TYPES:
        raise SdkError(f"{key} must be one of {', '.join(CACHE_TYPES)}, not '{name}'.")
    return str(name)


def _mlx_kv_bits(fields: dict[str, Any]) -> int | None:
    """The MLX KV-cache quantization field ``{enabled, bits, groupSize, quantizedStart}``."""
    key = "llm.load.mlx.kvCacheQuantization"
    value = fields.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise SdkError(f"The config value of '{key}' must be {{enabled, bits, ...}}.")
    if not value.get("enabled"):
        return None
    bits = value.get("bits")
    if bits not in (2, 3, 4, 6, 8) or isinstance(bits, bool):
        raise SdkError(f"{key}.bits must be 2, 3, 4, 6 or 8.")
    return int(bits)


def load_request(
    stack: Any, *, identifier: str | None = None, ttl_ms: Any = None, embedding: bool = False
) -> LoadRequest:
    fields, _ = collapse(stack)
    prefix = "embedding.load." if embedding else "llm.load."
    context = _number(fields, prefix + "contextLength")
    if context is not None and context < 1:
        raise SdkError("contextLength must be at least 1.")
    ttl: float | None = None
    if ttl_ms is not None:
        if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, (int, float)) or ttl_ms < 1:
            raise SdkError("ttlMs must be a positive number of milliseconds.")
        ttl = ttl_ms / 1000
    if identifier is not None and not isinstance(identifier, str):
        raise SdkError("identifier must be a string.")
    flash = fields.get("llm.load.llama.flashAttention")
    batch = _number(fields, "llm.load.llama.evalBatchSize")
    # The SDK's maxParallelPredictions (``lms load --parallel``).
    parallel = _number(fields, "llm.load.numParallelSessions")
    if parallel is not None and not 1 <= parallel <= MAX_PARALLEL:
        raise SdkError(f"numParallelSessions must be between 1 and {MAX_PARALLEL}.")
    llm = not embedding
    return LoadRequest(
        kv_cache_quantization=_mlx_kv_bits(fields) if llm else None,
        cache_type_k=_cache_type(fields, "llm.load.llama.kCacheQuantizationType") if llm else None,
        cache_type_v=_cache_type(fields, "llm.load.llama.vCacheQuantizationType") if llm else None,
        context_length=int(context) if context is not None else None,
        eval_batch_size=int(batch) if batch is not None and not embedding else None,
        flash_attention=flash if isinstance(flash, bool) and not embedding else None,
        parallel=int(parallel) if parallel is not None and not embedding else None,
        identifier=identifier,
        ttl=ttl,
    )
