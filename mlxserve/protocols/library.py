"""Wire models of the routes the web app needs beyond LM Studio's: stored chats, model
deletion and hub search."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RenameChat(BaseModel):
    """``PATCH /api/v1/chats/{chat_id}``."""

    model_config = ConfigDict(extra="forbid")
    title: str = Field(min_length=1, max_length=200)


class DeleteModel(BaseModel):
    """``POST /api/v1/models/delete``: a downloaded model's key."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=512)


class CreateToken(BaseModel):
    """``POST /api/v1/tokens``."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(default="", max_length=100)


class TokenInfo(BaseModel):
    id: str
    name: str
    created_at: int


class TokenList(BaseModel):
    object: Literal["list"]
    data: list[TokenInfo]


class CreatedToken(TokenInfo):
    token: str


class ChatSummary(BaseModel):
    id: str
    title: str
    model: str
    created_at: float
    updated_at: float
    head_response_id: str
    turns: int


class ChatList(BaseModel):
    object: Literal["list"]
    data: list[ChatSummary]


class ChatTurn(BaseModel):
    id: str
    parent_id: str | None
    model: str
    system: str | None
    input: list[dict[str, object]]
    output: list[dict[str, object]]
    created_at: float


class ChatDetail(ChatSummary):
    """A chat with every turn of every branch, oldest first; a turn continues its parent."""

    responses: list[ChatTurn]


class Deleted(BaseModel):
    id: str
    object: str
    deleted: Literal[True]


class HubQuantization(BaseModel):
    name: str
    size_bytes: int
    fits: bool | None
    downloaded: bool


class HubModel(BaseModel):
    id: str
    format: Literal["mlx", "gguf"]
    downloads: int
    likes: int
    last_modified: str | None
    quantizations: list[HubQuantization]


class HubSearchResults(BaseModel):
    object: Literal["list"]
    memory_bytes: int | None
    data: list[HubModel]
