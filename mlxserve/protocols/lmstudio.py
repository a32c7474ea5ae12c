"""LM Studio's native REST API (v1) wire schemas: requests only; the routes render replies.

The management requests (load, unload) reject unknown fields, so that a misspelt option is
an error rather than silently ignored; the chat request ignores them, as inference requests
do everywhere.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    Tag,
    field_validator,
)

from mlxserve.core import images
from mlxserve.core.instance import LoadRequest
from mlxserve.core.mcp import Requested
from mlxserve.core.types import CoreRequest, SamplingParams
from mlxserve.errors import InvalidRequest
from mlxserve.protocols.openai import MAX_TTL_SECONDS

MAX_CONTEXT_LENGTH = 1 << 24
# Parallel sequences an instance may be loaded with (as many as the server's max batch size).
MAX_PARALLEL = 64
# llama.cpp KV-cache types (backends.base.GGML_CACHE_TYPES).
CacheType = Literal["f32", "f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl"]
Ttl = Annotated[float, Field(gt=0, le=MAX_TTL_SECONDS)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class LoadModelRequest(_Strict):
    """``POST /api/v1/models/load``. ``identifier`` and ``ttl`` are ``lms load``'s options."""

    model: str = Field(min_length=1, max_length=512)
    context_length: int | None = Field(default=None, ge=1, le=MAX_CONTEXT_LENGTH)
    eval_batch_size: int | None = Field(default=None, ge=1, le=65_536)
    flash_attention: StrictBool | None = None
    num_experts: int | None = Field(default=None, ge=1, le=4096)
    offload_kv_cache_to_gpu: StrictBool | None = None
    parallel: int | None = Field(default=None, ge=1, le=MAX_PARALLEL, strict=True)
    # KV-cache quantization: bits (MLX models) and llama.cpp cache types (GGUF models).
    kv_cache_quantization: Literal[2, 3, 4, 6, 8] | None = None
    cache_type_k: CacheType | None = None
    cache_type_v: CacheType | None = None
    # The default draft model for speculative decoding (a model key of the same format).
    draft_model: str | None = Field(default=None, min_length=1, max_length=512)
    echo_load_config: StrictBool = False
    identifier: str | None = Field(default=None, min_length=1, max_length=256)
    ttl: Ttl | None = None

    def to_load_request(self) -> LoadRequest:
        return LoadRequest(
            context_length=self.context_length,
            eval_batch_size=self.eval_batch_size,
            flash_attention=self.flash_attention,
            offload_kv_cache_to_gpu=self.offload_kv_cache_to_gpu,
            num_experts=self.num_experts,
            parallel=self.parallel,
            kv_cache_quantization=self.kv_cache_quantization,
            cache_type_k=self.cache_type_k,
            cache_type_v=self.cache_type_v,
            draft_model=self.draft_model,
            identifier=self.identifier,
            ttl=self.ttl,
        )


class UnloadModelRequest(_Strict):
    """``POST /api/v1/models/unload``."""

    instance_id: str = Field(min_length=1, max_length=512)


class TextInput(_Lenient):
    # The docs call the text item "message"; their examples also send "text".
    type: Literal["message", "text"]
    content: str


class ImageInput(_Lenient):
    type: Literal["image"]
    data_url: str


def _input_kind(value: Any) -> str:
    return "[items]" if isinstance(value, list) else "[text]"


def _item_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return "[image]" if kind == "image" else "[text]"


Label = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
ToolNames = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=128)]], Field(max_length=512)
]
Headers = Annotated[dict[str, Annotated[str, Field(max_length=8192)]], Field(max_length=64)]


class EphemeralMcp(_Lenient):
    """An MCP server the request names by URL, connected for this request only."""

    type: Literal["ephemeral_mcp"]
    server_label: Label
    server_url: str = Field(min_length=1, max_length=2048)
    allowed_tools: ToolNames | None = None
    headers: Headers | None = None

    def requested(self) -> Requested:
        return Requested(
            "ephemeral",
            self.server_label,
            self.server_url,
            tuple((self.headers or {}).items()),
            frozenset(self.allowed_tools) if self.allowed_tools is not None else None,
        )


class PluginIntegration(_Lenient):
    """A server from ``mcp.json``: ``{"type": "plugin", "id": "mcp/<label>"}``."""

    type: Literal["plugin"]
    id: Annotated[str, Field(pattern=r"^mcp/[A-Za-z0-9_.-]{1,64}$")]
    allowed_tools: ToolNames | None = None

    def requested(self) -> Requested:
        tools = frozenset(self.allowed_tools) if self.allowed_tools is not None else None
        return Requested("plugin", self.id.removeprefix("mcp/"), allowed_tools=tools)


def _integration_kind(value: Any) -> str:
    if isinstance(value, str):
        return "[id]"
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return "[plugin]" if kind == "plugin" else "[ephemeral_mcp]"


# A plugin id alone ("mcp/<label>") or an object.
Integration = Annotated[
    Annotated[Annotated[str, Field(pattern=r"^mcp/[A-Za-z0-9_.-]{1,64}$")], Tag("[id]")]
    | Annotated[PluginIntegration, Tag("[plugin]")]
    | Annotated[EphemeralMcp, Tag("[ephemeral_mcp]")],
    Discriminator(_integration_kind),
]


# Validated by the shape the client sent, so that an error names the item and field at fault
# (the bracketed tags are not identifiers: error locations leave them out).
InputItem = Annotated[
    Annotated[TextInput, Tag("[text]")] | Annotated[ImageInput, Tag("[image]")],
    Discriminator(_item_kind),
]
ChatInput = Annotated[
    Annotated[str, Field(min_length=1), Tag("[text]")]
    | Annotated[list[InputItem], Field(min_length=1, max_length=10_000), Tag("[items]")],
    Discriminator(_input_kind),
]


class NamedTool(_Lenient):
    name: str = Field(min_length=1, max_length=128)


class ChatRequest(_Lenient):
    """``POST /api/v1/chat``."""

    model: str = Field(min_length=1, max_length=512)
    input: ChatInput
    system_prompt: str | None = None
    integrations: Annotated[list[Integration], Field(max_length=16)] | None = None
    # Our extension (LM Studio's chat has none): how the first round may use the
    # integrations' tools, "auto" (default), "none", "required" or {"name": <tool>}.
    tool_choice: Literal["auto", "none", "required"] | NamedTool | None = None
    stream: StrictBool = False
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=100_000)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repeat_penalty: float | None = Field(default=None, gt=0, le=10)
    max_output_tokens: int | None = Field(default=None, ge=1)
    reasoning: Literal["off", "low", "medium", "high", "on"] | None = None
    context_length: int | None = Field(default=None, ge=1, le=MAX_CONTEXT_LENGTH)
    store: StrictBool = True
    previous_response_id: str | None = Field(
        default=None, pattern=r"^resp_[A-Za-z0-9_-]{1,128}$", max_length=133
    )
    ttl: Ttl | None = None
    # Speculative decoding, as on the OpenAI-compatible routes.
    draft_model: str | None = Field(default=None, min_length=1, max_length=512)

    def check_supported(self) -> None:
        """Refuse what cannot be honoured yet, naming the field."""
        if self.tool_choice not in (None, "auto", "none") and not self.integrations:
            raise InvalidRequest(
                "tool_choice needs tools: add MCP servers under 'integrations'.",
                param="tool_choice",
            )

    @field_validator("integrations", mode="before")
    @classmethod
    def _as_list(cls, value: Any) -> Any:
        return value if value is None or isinstance(value, list) else [value]

    def requested_servers(self) -> list[Requested]:
        """The MCP servers this request names."""
        out: list[Requested] = []
        for item in self.integrations or []:
            if isinstance(item, str):
                out.append(Requested("plugin", item.removeprefix("mcp/")))
            else:
                out.append(item.requested())
        return out

    def user_messages(self) -> list[dict[str, Any]]:
        """This turn's input as chat-template messages: one user message."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        parts: list[dict[str, Any]] = []
        for i, item in enumerate(self.input):
            if isinstance(item, ImageInput):
                if not item.data_url.lstrip().lower().startswith("data:"):
                    raise InvalidRequest(
                        "data_url must be a base64 data URL (data:image/png;base64,...).",
                        param=f"input[{i}].data_url",
                    )
                parts.append(images.part(images.from_url(item.data_url, f"input[{i}]")))
            else:
                # Text items are separate lines, as LM Studio joins them.
                if any(p["type"] == "text" for p in parts):
                    parts.append({"type": "text", "text": "\n"})
                parts.append({"type": "text", "text": item.content})
        return [{"role": "user", "content": images.message_content(parts)}]

    def to_core(
        self, model: str, messages: list[dict[str, Any]], default_temperature: float
    ) -> CoreRequest:
        return CoreRequest(
            model=model,
            sampling=SamplingParams(
                temperature=default_temperature if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=self.top_k or 0,
                min_p=self.min_p or 0.0,
                repeat_penalty=self.repeat_penalty or 1.0,
            ),
            messages=tuple(messages),
            max_tokens=self.max_output_tokens,
            reasoning=self.reasoning,
            ttl=self.ttl,
            draft_model=self.draft_model,
            tool_choice=self._tool_choice(),
            # A forced choice makes one call: a grammar allowing several would let a model
            # (a random-weight one does) go on calling until it runs out of tokens.
            parallel_tool_calls=False,
        )

    def _tool_choice(self) -> str | dict[str, str]:
        if isinstance(self.tool_choice, NamedTool):
            return {"name": self.tool_choice.name}
        return self.tool_choice or "auto"
