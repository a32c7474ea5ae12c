"""OpenAI embeddings request (``POST /v1/embeddings``, and LM Studio's ``/api/v0/embeddings``).

Unknown fields are accepted and ignored, as OpenAI clients send some (``user``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from mlxserve.core.embeddings import EmbeddingRequest as CoreEmbeddingRequest
from mlxserve.errors import InvalidRequest
from mlxserve.protocols.openai import MAX_TTL_SECONDS

# OpenAI's limit on the inputs of one request.
MAX_INPUTS = 2048
# Token ids are int32 in both engines; the model's own vocabulary is checked by the core.
MAX_TOKEN_ID = 2**31 - 1

_SHAPES = "a string, an array of strings, an array of token ids, or an array of token-id arrays"


def _token_id(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_TOKEN_ID


def _check_text(text: str, param: str) -> str:
    if not text:
        raise InvalidRequest(f"'{param}' must not be an empty string.", param=param)
    return text


def _check_ids(ids: list[Any], param: str) -> tuple[int, ...]:
    if not ids:
        raise InvalidRequest(f"'{param}' must not be an empty array.", param=param)
    for j, token in enumerate(ids):
        if not _token_id(token):
            raise InvalidRequest(
                f"'{param}[{j}]' must be a token id (an integer from 0 to {MAX_TOKEN_ID}).",
                param=f"{param}[{j}]",
            )
    return tuple(ids)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=512)
    input: str | list[Any]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    # Text Embeddings Inference's extension: cut over-long inputs to the model's window
    # instead of refusing them (the default, as OpenAI does).
    truncate: StrictBool = False
    # LM Studio's: idle seconds before a model loaded just in time for this request unloads.
    ttl: float | None = Field(default=None, gt=0, le=MAX_TTL_SECONDS)

    def to_core(self) -> CoreEmbeddingRequest:
        value = self.input
        if isinstance(value, str):
            return self._core((_check_text(value, "input"),), single=True)
        if not value:
            raise InvalidRequest("'input' must not be an empty array.", param="input")
        if len(value) > MAX_INPUTS:
            raise InvalidRequest(
                f"'input' has {len(value)} items; at most {MAX_INPUTS} are allowed per request.",
                param="input",
            )
        first = value[0]
        if isinstance(first, str):
            texts = []
            for i, item in enumerate(value):
                if not isinstance(item, str):
                    raise InvalidRequest(f"'input[{i}]' must be a string.", param=f"input[{i}]")
                texts.append(_check_text(item, f"input[{i}]"))
            return self._core(tuple(texts), single=False)
        if type(first) is int:
            return self._core((_check_ids(value, "input"),), single=True)
        if isinstance(first, list):
            arrays = []
            for i, item in enumerate(value):
                if not isinstance(item, list):
                    raise InvalidRequest(
                        f"'input[{i}]' must be an array of token ids.", param=f"input[{i}]"
                    )
                arrays.append(_check_ids(item, f"input[{i}]"))
            return self._core(tuple(arrays), single=False)
        raise InvalidRequest(f"'input' must be {_SHAPES}.", param="input")

    def _core(self, inputs: Any, *, single: bool) -> CoreEmbeddingRequest:
        return CoreEmbeddingRequest(
            model=self.model,
            inputs=inputs,
            single=single,
            truncate=self.truncate,
            dimensions=self.dimensions,
            ttl=self.ttl,
        )
