"""OpenAI Responses API input items and their content parts (wire schemas; the request that
holds them is ``protocols/responses.py``)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from mlxserve.core import images
from mlxserve.core.sealed import ReasoningSeal
from mlxserve.errors import InvalidRequest
from mlxserve.protocols.openai import _Lenient

# How a namespace's function is named to the model.
NAMESPACE_SEPARATOR = "__"

# Tags are capitalised so that error locations name the client's fields, not our union members.
_ITEM_TAGS = {
    "message": "Message",
    "function_call": "FunctionCall",
    "function_call_output": "FunctionCallOutput",
    "reasoning": "Reasoning",
    "mcp_call": "McpCall",
    "mcp_list_tools": "McpListTools",
}
_PART_TAGS = {
    "input_text": "Text",
    "output_text": "Text",
    "refusal": "Refusal",
    "input_image": "Image",
}


def _tag(tags: dict[str, str], default: str | None = None) -> Any:
    def pick(value: Any) -> str:
        kind = getattr(value, "type", None)
        if isinstance(value, dict):
            kind = value.get("type", default)
        return tags.get(kind, "Other") if isinstance(kind, str) else "Other"

    return Discriminator(pick)


class TextPart(_Lenient):
    type: Literal["input_text", "output_text"]
    text: str


class RefusalPart(_Lenient):
    type: Literal["refusal"]
    refusal: str


class ImagePart(_Lenient):
    type: Literal["input_image"]
    image_url: str | None = Field(default=None, min_length=1)
    file_id: str | None = None
    detail: str | None = None

    @field_validator("file_id")
    @classmethod
    def _no_files(cls, v: str | None) -> str | None:
        if v is not None:
            raise ValueError("file_id images are not supported (no Files API); send image_url")
        return v

    @model_validator(mode="after")
    def _has_url(self) -> ImagePart:
        if not self.image_url:
            raise ValueError("an input_image part needs an image_url")
        return self

    def to_core(self) -> images.ImagePart:
        assert self.image_url is not None
        return images.from_url(self.image_url, "input")


class OtherPart(_Lenient):
    type: str

    @field_validator("type")
    @classmethod
    def _refuse(cls, v: str) -> str:
        raise ValueError(
            f"content parts of type '{v}' are not supported by this server; "
            "only 'input_text', 'output_text' and 'input_image' are"
        )


Part = Annotated[
    Annotated[TextPart, Tag("Text")]
    | Annotated[RefusalPart, Tag("Refusal")]
    | Annotated[ImagePart, Tag("Image")]
    | Annotated[OtherPart, Tag("Other")],
    _tag(_PART_TAGS),
]


def _str_or_list(value: Any) -> str:
    return "Str" if isinstance(value, str) else "List"


# A string or a list of parts; tagged so that a bad part is reported, not "not a string".
Content = Annotated[
    Annotated[str, Tag("Str")] | Annotated[list[Part], Tag("List")], Discriminator(_str_or_list)
]


def _text_of(content: str | list[Any]) -> str:
    if isinstance(content, str):
        return content
    if any(isinstance(p, ImagePart) for p in content):
        raise InvalidRequest("input_image parts are accepted in user messages only.", param="input")
    return "".join(p.refusal if isinstance(p, RefusalPart) else p.text for p in content)


def _user_content(content: str | list[Any]) -> str | list[dict[str, Any]]:
    """A user message's content: text, with its images as core image parts."""
    if isinstance(content, str):
        return content
    parts: list[dict[str, Any]] = []
    for p in content:
        if isinstance(p, ImagePart):
            parts.append(images.part(p.to_core()))
        else:
            parts.append(
                {"type": "text", "text": p.refusal if isinstance(p, RefusalPart) else p.text}
            )
    return images.message_content(parts)


class MessageItem(_Lenient):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Content


class FunctionCallItem(_Lenient):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=64)
    arguments: str = ""
    # The namespace tool the function belongs to.
    namespace: str | None = Field(default=None, max_length=64)

    def model_name(self) -> str:
        """The name the model knows the function by."""
        return f"{self.namespace}{NAMESPACE_SEPARATOR}{self.name}" if self.namespace else self.name


class FunctionCallOutputItem(_Lenient):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=256)
    output: Content


class ReasoningText(_Lenient):
    type: str
    text: str = ""


class ReasoningItem(_Lenient):
    type: Literal["reasoning"]
    summary: list[ReasoningText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None

    def text(self, seal: ReasoningSeal | None = None) -> str:
        """The reasoning: from our seal when it verifies, else the text the item carries."""
        opened = seal.open(self.encrypted_content) if seal is not None else None
        if opened is not None:
            return opened
        return "".join(p.text for p in (self.content or self.summary))


class McpCallItem(_Lenient):
    """An earlier MCP call sent back as input: the call and its output, as function calls."""

    type: Literal["mcp_call"]
    id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=128)
    arguments: str = ""
    output: str | None = None
    error: Any = None

    def result_text(self) -> str:
        if self.output is not None:
            return self.output
        return json.dumps(self.error) if self.error is not None else ""


class McpListToolsItem(_Lenient):
    """An earlier tool listing sent back as input: the tools are listed afresh, so it is
    skipped."""

    type: Literal["mcp_list_tools"]


class OtherItem(_Lenient):
    type: str

    @model_validator(mode="before")
    @classmethod
    def _object(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError("each input item must be an object with a 'type'")
        return data

    @field_validator("type")
    @classmethod
    def _refuse(cls, v: str) -> str:
        raise ValueError(
            f"input items of type '{v}' are not supported; use 'message', 'function_call', "
            "'function_call_output' or 'reasoning'"
        )


InputItem = Annotated[
    Annotated[MessageItem, Tag("Message")]
    | Annotated[FunctionCallItem, Tag("FunctionCall")]
    | Annotated[FunctionCallOutputItem, Tag("FunctionCallOutput")]
    | Annotated[ReasoningItem, Tag("Reasoning")]
    | Annotated[McpCallItem, Tag("McpCall")]
    | Annotated[McpListToolsItem, Tag("McpListTools")]
    | Annotated[OtherItem, Tag("Other")],
    _tag(_ITEM_TAGS, default="message"),
]
