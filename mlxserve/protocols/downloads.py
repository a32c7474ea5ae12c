"""Download API wire schemas (``POST /api/v1/models/download``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class DownloadRequest(BaseModel):
    """A Hugging Face repository (``publisher/model``, its URL, or ``publisher/model@Q4_K_M``)
    and, as LM Studio allows with URLs, a separate ``quantization``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=512)
    quantization: str | None = Field(default=None, min_length=1, max_length=32)
