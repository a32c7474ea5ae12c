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
)

from mlxserve.core.manager import LoadRequest
from mlxserve.core.types import CoreRequest, SamplingParams
from mlxserve.errors import InvalidRequest
from mlxserve.protocols.openai import MAX_TTL_SECONDS

MAX_CONTEXT_LENGTH = 1 << 24
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


class ChatRequest(_Lenient):
    """``POST /api/v1/chat``."""

    model: str = Field(min_length=1, max_length=512)
    input: ChatInput
    system_prompt: str | None = None
    integrations: Any = None
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

    def check_supported(self) -> None:
        """Refuse what cannot be honoured yet, naming the field."""
        if self.integrations:
            raise InvalidRequest(
                "integrations (MCP servers and plugins) are not supported by this server yet; "
                "send the request without 'integrations'.",
                param="integrations",
            )
        if isinstance(self.input, list):
            for i, item in enumerate(self.input):
                if isinstance(item, ImageInput):
                    raise InvalidRequest(
                        f"Model '{self.model}' does not accept images (no vision support); "
                        "send text input only.",
                        param=f"input[{i}]",
                    )

    def user_messages(self) -> list[dict[str, Any]]:
        """This turn's input as chat-template messages: one user message."""
        if isinstance(self.input, str):
            text = self.input
        else:
            text = "\n".join(i.content for i in self.input if isinstance(i, TextInput))
        return [{"role": "user", "content": text}]

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
        )
