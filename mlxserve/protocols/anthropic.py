"""Anthropic Messages API wire schemas (``POST /v1/messages``, ``/v1/messages/count_tokens``;
responses are rendered by ``routes/anthropic.py``).

Unknown fields (``metadata``, ``cache_control``, ...) are accepted and ignored. Content blocks
and tools of a kind we cannot honour (documents, server tools) are refused with a 400
naming them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, StrictBool, Tag, field_validator, model_validator

from mlxserve.core import images
from mlxserve.core.types import CoreRequest, SamplingParams
from mlxserve.errors import InvalidRequest
from mlxserve.protocols.openai import (
    MAX_STOP_LENGTH,
    MAX_STOPS,
    MAX_TTL_SECONDS,
    _Lenient,
)

_BLOCK_TAGS = {
    "text": "Text",
    "tool_use": "ToolUse",
    "tool_result": "ToolResult",
    "thinking": "Thinking",
    "redacted_thinking": "RedactedThinking",
    "image": "Image",
}


def _tag(tags: dict[str, str]) -> Any:
    # Tags are capitalised so that error locations name the client's fields, not union members.
    def pick(value: Any) -> str:
        kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
        return tags.get(kind, "Other") if isinstance(kind, str) else "Other"

    return Discriminator(pick)


def _str_or_list(value: Any) -> str:
    return "Str" if isinstance(value, str) else "List"


class TextBlock(_Lenient):
    type: Literal["text"]
    text: str


class ImageSource(_Lenient):
    type: Literal["base64", "url"]
    media_type: str | None = None
    data: str | None = Field(default=None, min_length=1)
    url: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _complete(self) -> ImageSource:
        if self.type == "base64" and self.data is None:
            raise ValueError("a base64 image source needs 'data'")
        if self.type == "url" and self.url is None:
            raise ValueError("a url image source needs 'url'")
        return self


class ImageBlock(_Lenient):
    type: Literal["image"]
    source: ImageSource

    def to_core(self) -> images.ImagePart:
        if self.source.type == "base64":
            assert self.source.data is not None
            return images.from_base64(self.source.data, self.source.media_type, "messages")
        assert self.source.url is not None
        if self.source.url.lower().startswith("data:"):
            raise InvalidRequest("Send inline images as a base64 source.", param="messages")
        return images.from_url(self.source.url, "messages")


class OtherBlock(_Lenient):
    type: str

    @field_validator("type")
    @classmethod
    def _refuse(cls, v: str) -> str:
        raise ValueError(f"content blocks of type '{v}' are not supported by this server")


class ToolUseBlock(_Lenient):
    type: Literal["tool_use"]
    id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=128)
    input: dict[str, Any]


ResultPart = Annotated[
    Annotated[TextBlock, Tag("Text")] | Annotated[OtherBlock, Tag("Other")],
    _tag({"text": "Text"}),
]


class ToolResultBlock(_Lenient):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1, max_length=256)
    content: (
        Annotated[
            Annotated[str, Tag("Str")] | Annotated[list[ResultPart], Tag("List")],
            Discriminator(_str_or_list),
        ]
        | None
    ) = None
    is_error: StrictBool | None = None

    def text(self) -> str:
        if self.content is None:
            text = ""
        elif isinstance(self.content, str):
            text = self.content
        else:
            text = "".join(p.text for p in self.content if isinstance(p, TextBlock))
        return f"Error: {text}" if self.is_error else text


class ThinkingBlock(_Lenient):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Lenient):
    type: Literal["redacted_thinking"]


Block = Annotated[
    Annotated[TextBlock, Tag("Text")]
    | Annotated[ToolUseBlock, Tag("ToolUse")]
    | Annotated[ToolResultBlock, Tag("ToolResult")]
    | Annotated[ThinkingBlock, Tag("Thinking")]
    | Annotated[RedactedThinkingBlock, Tag("RedactedThinking")]
    | Annotated[ImageBlock, Tag("Image")]
    | Annotated[OtherBlock, Tag("Other")],
    _tag(_BLOCK_TAGS),
]


class Message(_Lenient):
    role: Literal["user", "assistant"]
    # Tagged so that a bad block is reported, not "not a string".
    content: Annotated[
        Annotated[str, Tag("Str")] | Annotated[list[Block], Tag("List")],
        Discriminator(_str_or_list),
    ]

    def to_template(self) -> list[dict[str, Any]]:
        """Chat-template messages: a user turn's ``tool_result`` blocks become ``tool``
        messages (in place), an assistant turn's ``tool_use`` blocks its ``tool_calls``."""
        if isinstance(self.content, str):
            return [{"role": self.role, "content": self.content}]
        if self.role == "assistant":
            message: dict[str, Any] = {"role": "assistant", "content": ""}
            for block in self.content:
                if isinstance(block, TextBlock):
                    message["content"] += block.text
                elif isinstance(block, ThinkingBlock):
                    message["reasoning_content"] = block.thinking
                elif isinstance(block, ToolUseBlock):
                    call = {
                        "id": block.id,
                        "type": "function",
                        "function": {"name": block.name, "arguments": block.input},
                    }
                    message.setdefault("tool_calls", []).append(call)
                elif isinstance(block, ImageBlock):
                    raise InvalidRequest(
                        "Invalid value for 'messages': image blocks belong in user messages.",
                        param="messages",
                    )
                elif isinstance(block, ToolResultBlock):
                    raise InvalidRequest(
                        "Invalid value for 'messages': tool_result blocks belong in user messages.",
                        param="messages",
                    )
            return [message]
        out: list[dict[str, Any]] = []
        text: list[dict[str, Any]] = []
        for block in self.content:
            if isinstance(block, ToolResultBlock):
                if text:
                    out.append({"role": "user", "content": images.message_content(text)})
                    text = []
                out.append(
                    {"role": "tool", "tool_call_id": block.tool_use_id, "content": block.text()}
                )
            elif isinstance(block, TextBlock):
                text.append({"type": "text", "text": block.text})
            elif isinstance(block, ImageBlock):
                text.append(images.part(block.to_core()))
            elif isinstance(block, ToolUseBlock):
                raise InvalidRequest(
                    "Invalid value for 'messages': tool_use blocks belong in assistant messages.",
                    param="messages",
                )
        if text or not out:
            out.append({"role": "user", "content": images.message_content(text)})
        return out


class SystemBlock(_Lenient):
    type: Literal["text"]
    text: str


class Tool(_Lenient):
    type: Literal["custom"] | None = None
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    input_schema: dict[str, Any]

    @model_validator(mode="before")
    @classmethod
    def _refuse_server_tools(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") not in (None, "custom"):
            raise ValueError(
                f"tools of type '{data['type']}' (server tools) are not supported; "
                "only custom tools with an input_schema are"
            )
        return data

    def to_core(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "parameters": self.input_schema}
        if self.description:
            out["description"] = self.description
        return out


class ToolChoice(_Lenient):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: StrictBool | None = None


class Thinking(_Lenient):
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    # Accepted for compatibility; thinking is bounded by max_tokens only.
    budget_tokens: int | None = Field(default=None, ge=1)


class OutputFormat(_Lenient):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Lenient):
    """Structured output; ``effort`` is a hint a local model has no use for."""

    format: OutputFormat | None = None


class CountTokensRequest(_Lenient):
    """What a prompt is made of; ``/v1/messages/count_tokens`` takes exactly this."""

    model: str = Field(min_length=1, max_length=512)
    messages: list[Message] = Field(min_length=1, max_length=10_000)
    system: (
        Annotated[
            Annotated[str, Tag("Str")] | Annotated[list[SystemBlock], Tag("List")],
            Discriminator(_str_or_list),
        ]
        | None
    ) = None
    tools: list[Tool] | None = Field(default=None, max_length=512)
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    # LM Studio's: idle seconds before a just-in-time loaded model is unloaded.
    ttl: float | None = Field(default=None, gt=0, le=MAX_TTL_SECONDS)

    @model_validator(mode="after")
    def _tools_consistent(self) -> CountTokensRequest:
        names = [t.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise InvalidRequest(
                "Invalid value for 'tools': tool names must be unique.", param="tools"
            )
        choice = self.tool_choice
        if choice is not None and choice.type == "tool":
            if not choice.name:
                raise InvalidRequest(
                    "Invalid value for 'tool_choice.name': type 'tool' needs a name.",
                    param="tool_choice.name",
                )
            if choice.name not in names:
                raise InvalidRequest(
                    f"Invalid value for 'tool_choice.name': '{choice.name}' is not in tools.",
                    param="tool_choice.name",
                )
        if choice is not None and choice.type == "any" and not names:
            raise InvalidRequest(
                "Invalid value for 'tool_choice': 'any' needs at least one tool in tools.",
                param="tool_choice",
            )
        return self

    def system_text(self) -> str | None:
        if self.system is None:
            return None
        if isinstance(self.system, str):
            return self.system
        return "\n".join(b.text for b in self.system)

    def template_messages(self) -> list[dict[str, Any]]:
        out = [m for message in self.messages for m in message.to_template()]
        system = self.system_text()
        if system:
            out.insert(0, {"role": "system", "content": system})
        return out

    def _tool_choice(self) -> str | dict[str, str]:
        choice = self.tool_choice
        if choice is None or choice.type == "auto":
            return "auto"
        if choice.type == "tool":
            return {"name": choice.name or ""}
        return "required" if choice.type == "any" else "none"

    def _reasoning(self) -> str | None:
        if self.thinking is None:
            return None
        return "off" if self.thinking.type == "disabled" else "on"

    def _json_schema(self) -> dict[str, Any] | None:
        output = self.output_config
        return output.format.schema_ if output and output.format else None

    def to_core(self, default_temperature: float) -> CoreRequest:
        choice = self.tool_choice
        return CoreRequest(
            model=self.model,
            sampling=SamplingParams(temperature=default_temperature),
            messages=tuple(self.template_messages()),
            tools=tuple(t.to_core() for t in self.tools or []),
            tool_choice=self._tool_choice(),
            parallel_tool_calls=not (choice and choice.disable_parallel_tool_use),
            reasoning=self._reasoning(),
            json_schema=self._json_schema(),
            ttl=self.ttl,
        )


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=100_000)
    stop_sequences: list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]] | None = (
        Field(default=None, max_length=MAX_STOPS)
    )
    stream: StrictBool = False
    # llama.cpp's extension: keep generating past the end-of-text token (benchmarks, tests).
    ignore_eos: StrictBool = False

    def to_core(self, default_temperature: float) -> CoreRequest:
        return replace(
            super().to_core(default_temperature),
            sampling=SamplingParams(
                temperature=default_temperature if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=self.top_k or 0,
            ),
            max_tokens=self.max_tokens,
            stops=tuple(self.stop_sequences or ()),
            ignore_eos=self.ignore_eos,
        )
