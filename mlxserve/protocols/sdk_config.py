"""LM Studio's KV configs, the SDKs' prediction and load settings: pydantic models with
``to_core()`` like every other dialect's.

A config stack is ``{layers: [{layerName, config: {fields: [{key, value}]}}]}``, collapsed in
order with later layers winning (:meth:`KVConfigStack.collapse`). The collapsed fields are then
read by :class:`PredictionConfig` (``llm.prediction.*``) or :class:`LoadConfig`
(``llm.load.*``, ``embedding.load.*``), under the keys the SDKs write (``lms-kv-config``'s
``schema.ts``: the JS SDK's ``maxParallelPredictions`` is ``llm.load.numParallelSessions``).
Keys we do not use are ignored, as LM Studio ignores the other engine's. "Checkbox" values are
``{checked, value}``, unchecked meaning off. A value of the wrong shape is an ``rpcError``
naming its key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Generic, Literal, TypeVar, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
)

from mlxserve.core.instance import LoadRequest
from mlxserve.protocols.lmstudio import MAX_PARALLEL, CacheType
from mlxserve.sdk.transport import SdkError

P = "llm.prediction."
# The layer the SDKs add for ``.complete()``: the prompt is the raw text, no chat template.
RAW_COMPLETION_LAYER = "completeModeFormatting"
CACHE_TYPES = get_args(CacheType)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


def parse_parameter(model: type[M], value: Any) -> M:
    """``value`` as ``model``; what does not fit is an ``rpcError`` naming the field."""
    if not isinstance(value, dict):
        raise SdkError("The parameter must be an object.")
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "parameter"
        raise SdkError(f"Invalid '{where}': {first['msg']}.") from None


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class KVField(_Wire):
    key: str
    value: Any = None


class KVConfig(_Wire):
    fields: list[KVField]


class KVLayer(_Wire):
    layerName: str | None = None
    config: KVConfig


class KVConfigStack(_Wire):
    layers: list[KVLayer]

    def collapse(self) -> tuple[dict[str, Any], set[str]]:
        """The fields, later layers winning, and the names of the layers."""
        fields = {f.key: f.value for layer in self.layers for f in layer.config.fields}
        return fields, {str(layer.layerName) for layer in self.layers}


class Checkbox(_Wire, Generic[T]):
    checked: StrictBool
    value: T | None = None


def _on(box: Checkbox[Any] | None) -> Any:
    """A checkbox's value when it is on; None when off or absent."""
    if box is None or not box.checked or box.value is False:
        return None
    return box.value


Number = StrictFloat
# A checkbox around a number, or around false / null for "no value" (JS sends ``maxTokens:
# false`` that way). Left to right, so that 0 is a number, not false.
NumberBox = Checkbox[
    Annotated[StrictFloat | Literal[False] | None, Field(union_mode="left_to_right")]
]


class ToolFunction(_Wire):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDefinition(_Wire):
    type: Literal["function"]
    function: ToolFunction

    def to_core(self) -> dict[str, Any]:
        f = self.function
        entry: dict[str, Any] = {"name": f.name}
        if f.description is not None:
            entry["description"] = f.description
        schema = dict(f.parameters or {"type": "object", "properties": {}})
        # The SDKs build the schema from a function's signature and never close it; a forced
        # call would otherwise run on with invented arguments until it runs out of tokens.
        if schema.get("type") == "object" and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        entry["parameters"] = schema
        return entry


class Tools(_Wire):
    """``llm.prediction.tools``: ``{type: "none"}`` or ``{type: "toolArray", tools}``."""

    type: Literal["none", "toolArray"]
    tools: list[ToolDefinition] = []

    def to_core(self) -> tuple[dict[str, Any], ...]:
        return tuple(t.to_core() for t in self.tools) if self.type == "toolArray" else ()


class ToolChoice(_Wire):
    type: Literal["generic"]
    mode: Literal["none", "auto", "required"]


class Structured(_Wire):
    type: Literal["none", "json", "gbnf"]
    jsonSchema: Any = None

    def to_core(self) -> dict[str, Any] | None:
        if self.type == "gbnf":
            raise SdkError(
                "GBNF grammars are not supported by mlxserve; use a JSON schema (structured: "
                "{type: 'json', jsonSchema}) instead."
            )
        if self.type == "none":
            return None
        if not isinstance(self.jsonSchema, dict):
            raise SdkError("A structured prediction of type 'json' needs a jsonSchema object.")
        return self.jsonSchema


@dataclass(frozen=True)
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


class PredictionConfig(_Wire):
    """The ``llm.prediction.*`` keys we act on."""

    temperature: Number | None = Field(None, alias="llm.prediction.temperature")
    max_tokens: NumberBox | None = Field(None, alias="llm.prediction.maxPredictedTokens")
    top_k: Number | None = Field(None, alias="llm.prediction.topKSampling")
    top_p: NumberBox | None = Field(None, alias="llm.prediction.topPSampling")
    min_p: NumberBox | None = Field(None, alias="llm.prediction.minPSampling")
    repeat_penalty: NumberBox | None = Field(None, alias="llm.prediction.repeatPenalty")
    presence_penalty: NumberBox | None = Field(None, alias="llm.prediction.llama.presencePenalty")
    stops: list[str] | None = Field(None, alias="llm.prediction.stopStrings")
    structured: Structured | None = Field(None, alias="llm.prediction.structured")
    tools: Tools | None = Field(None, alias="llm.prediction.tools")
    tool_choice: ToolChoice | None = Field(None, alias="llm.prediction.toolChoice")
    draft_model: str | None = Field(
        None, alias="llm.prediction.speculativeDecoding.draftModel", min_length=1
    )
    num_draft_tokens: Number | None = Field(
        None, alias="llm.prediction.speculativeDecoding.numDraftTokensExact", ge=1, le=16
    )

    def to_core(self, *, raw: bool) -> Prediction:
        max_tokens = _on(self.max_tokens)
        if max_tokens is not None and max_tokens < 1:
            raise SdkError("maxTokens must be at least 1.")
        return Prediction(
            temperature=self.temperature,
            max_tokens=int(max_tokens) if max_tokens is not None else None,
            top_k=int(self.top_k) if self.top_k is not None and self.top_k > 0 else None,
            top_p=_on(self.top_p),
            min_p=_on(self.min_p),
            repeat_penalty=_on(self.repeat_penalty),
            presence_penalty=_on(self.presence_penalty),
            stops=tuple(s for s in self.stops or () if s),
            json_schema=self.structured.to_core() if self.structured else None,
            tools=self.tools.to_core() if self.tools else (),
            tool_choice=self.tool_choice.mode if self.tool_choice else "auto",
            raw=raw,
            draft_model=self.draft_model,
            num_draft_tokens=_int(self.num_draft_tokens),
        )


class MlxKVQuantization(_Wire):
    enabled: StrictBool = False
    bits: StrictInt | None = None


class LoadConfig(_Wire):
    """The load keys we act on; ``contextLength`` is read under the domain's prefix."""

    llm_context: Number | None = Field(None, alias="llm.load.contextLength", ge=1)
    embedding_context: Number | None = Field(None, alias="embedding.load.contextLength", ge=1)
    flash_attention: StrictBool | None = Field(None, alias="llm.load.llama.flashAttention")
    eval_batch_size: Number | None = Field(None, alias="llm.load.llama.evalBatchSize")
    # The JS SDK's maxParallelPredictions (``lms load --parallel``).
    parallel: Number | None = Field(
        None, alias="llm.load.numParallelSessions", ge=1, le=MAX_PARALLEL
    )
    cache_type_k: Checkbox[str] | None = Field(None, alias="llm.load.llama.kCacheQuantizationType")
    cache_type_v: Checkbox[str] | None = Field(None, alias="llm.load.llama.vCacheQuantizationType")
    mlx_kv: MlxKVQuantization | None = Field(None, alias="llm.load.mlx.kvCacheQuantization")

    def to_core(self, *, identifier: str | None, ttl: float | None, embedding: bool) -> LoadRequest:
        context = self.embedding_context if embedding else self.llm_context
        if embedding:
            return LoadRequest(context_length=_int(context), identifier=identifier, ttl=ttl)
        return LoadRequest(
            kv_cache_quantization=self._mlx_bits(),
            cache_type_k=_cache_type(self.cache_type_k, "kCacheQuantizationType"),
            cache_type_v=_cache_type(self.cache_type_v, "vCacheQuantizationType"),
            context_length=_int(context),
            eval_batch_size=_int(self.eval_batch_size),
            flash_attention=self.flash_attention,
            parallel=_int(self.parallel),
            identifier=identifier,
            ttl=ttl,
        )

    def _mlx_bits(self) -> int | None:
        quantization = self.mlx_kv
        if quantization is None or not quantization.enabled:
            return None
        if quantization.bits not in (2, 3, 4, 6, 8):
            raise SdkError("llm.load.mlx.kvCacheQuantization.bits must be 2, 3, 4, 6 or 8.")
        return quantization.bits


def _int(value: float | None) -> int | None:
    return int(value) if value is not None else None


def _cache_type(box: Checkbox[str] | None, name: str) -> str | None:
    value = _on(box)
    if value is not None and value not in CACHE_TYPES:
        raise SdkError(f"llm.load.llama.{name} must be one of {', '.join(CACHE_TYPES)}.")
    return value


class LoadOptions(_Wire):
    """A load's own options beside its config stack (``loadModel``, ``getOrLoad``)."""

    identifier: str | None = None
    ttlMs: StrictFloat | None = Field(None, ge=1)

    def ttl(self) -> float | None:
        return self.ttlMs / 1000 if self.ttlMs is not None else None
