"""Reply shapes, for the OpenAPI document (``mlxserve/openapi.py``) and the fuzz test that
checks real replies against it. The routes build their replies as dicts; these models name
the fields every reply of a kind carries, and allow more (clients ignore extra fields, and
the dialects grow)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# --- errors, one envelope per dialect -------------------------------------------------------


class OpenAIErrorDetail(_Open):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(_Open):
    error: OpenAIErrorDetail


class AnthropicErrorDetail(_Open):
    type: str
    message: str


class AnthropicError(_Open):
    type: Literal["error"]
    error: AnthropicErrorDetail


class LMStudioErrorDetail(_Open):
    type: str
    message: str


class LMStudioError(_Open):
    error: LMStudioErrorDetail


# --- server ----------------------------------------------------------------------------------


class Health(_Open):
    # "error" (with HTTP 503) when a distributed group has lost a rank.
    status: Literal["ok", "error"]
    version: str
    # Absent for a request without a live token when authentication is required.
    loaded: list[dict[str, Any]] = []


# --- OpenAI ----------------------------------------------------------------------------------


class ModelObject(_Open):
    id: str
    object: Literal["model"]
    owned_by: str


class ModelList(_Open):
    object: Literal["list"]
    data: list[dict[str, Any]]


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatChoice(_Open):
    index: int
    message: dict[str, Any]
    finish_reason: str | None


class ChatCompletion(_Open):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class TextChoice(_Open):
    index: int
    text: str
    finish_reason: str | None


class TextCompletion(_Open):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage


class Embedding(_Open):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str


class EmbeddingList(_Open):
    object: Literal["list"]
    data: list[Embedding]
    model: str


class ResponseObject(_Open):
    id: str
    object: Literal["response"]
    status: str
    model: str
    output: list[dict[str, Any]]


# --- Anthropic -------------------------------------------------------------------------------


class AnthropicUsage(_Open):
    input_tokens: int
    output_tokens: int


class AnthropicMessage(_Open):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    content: list[dict[str, Any]]
    model: str
    stop_reason: str | None
    usage: AnthropicUsage


class TokenCount(_Open):
    input_tokens: int


# --- LM Studio ---------------------------------------------------------------------------------


class LMStudioModels(_Open):
    models: list[dict[str, Any]]


class LMStudioLoaded(_Open):
    instance_id: str


class LMStudioChatResult(_Open):
    model_instance_id: str
    output: list[dict[str, Any]]
    stats: dict[str, Any]


class LMStudioV0Models(_Open):
    object: Literal["list"]
    data: list[dict[str, Any]]
