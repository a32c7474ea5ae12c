"""Anthropic Messages API wire schemas (``POST /v1/messages``, ``/v1/messages/count_tokens``;
responses are rendered by ``routes/anthropic.py``).

Unknown fields (``metadata``, ``cache_control``, ``context_management``, ...) are accepted and
ignored, as are betas. What Claude Code sends is taken as it means it: ``system`` turns in the
middle of ``messages``, adaptive thinking (a wish, ignored by a model that does not think),
``output_config.effort``, tools with ``defer_loading`` (offered to the model once a
``tool_reference`` names them), and thinking blocks whose ``signature`` is one of our seals
(the reasoning is restored from it). Server tools (``web_search_...``) are dropped from what the
model sees, with a log line. Content blocks we cannot honour (documents) are refused
with a 400 naming them. Claude Code's billing header (``x-anthropic-billing-header: ...;
cch=<nonce>;``, sent as the first system block with a new nonce on every request) is billing
metadata for Anthropic's servers: it is dropped before the prompt is rendered, so that it
neither reaches the model nor defeats the prompt cache.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, StrictBool, Tag, field_validator, model_validator

from mlxserve.core import images
from mlxserve.core.sealed import ReasoningSeal
from mlxserve.core.types import CoreRequest, SamplingParams
from mlxserve.errors import InvalidRequest
from mlxserve.protocols.openai import (
    MAX_STOP_LENGTH,
    MAX_STOPS,
    MAX_TTL_SECONDS,
    _Lenient,
)

log = logging.getLogger("mlxserve.anthropic")

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


_BILLING_LINE = re.compile(r"x-anthropic-billing-header:[^\n]*(?:\n|$)")


def _without_billing_header(text: str) -> str:
    """``text`` without Claude Code's billing header line at its start."""
    line = _BILLING_LINE.match(text)
    return text[line.end() :] if line else text


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


class ToolReferenceBlock(_Lenient):
    """A tool search result: the named deferred tool is offered to the model from now on."""

    type: Literal["tool_reference"]
    tool_name: str = Field(min_length=1, max_length=128)


ResultPart = Annotated[
    Annotated[TextBlock, Tag("Text")]
    | Annotated[ToolReferenceBlock, Tag("ToolReference")]
    | Annotated[OtherBlock, Tag("Other")],
    _tag({"text": "Text", "tool_reference": "ToolReference"}),
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
            text = "".join(
                p.text if isinstance(p, TextBlock) else f"Tool {p.tool_name} is now available."
                for p in self.content
                if isinstance(p, TextBlock | ToolReferenceBlock)
            )
        return f"Error: {text}" if self.is_error else text

    def references(self) -> list[str]:
        if not isinstance(self.content, list):
            return []
        return [p.tool_name for p in self.content if isinstance(p, ToolReferenceBlock)]


class ThinkingBlock(_Lenient):
    type: Literal["thinking"]
    thinking: str = ""
    signature: str | None = None

    def text(self, seal: ReasoningSeal | None) -> str:
        """The reasoning: from our seal when it verifies (thinking sent with display
        ``omitted`` comes back empty), else the plain text."""
        opened = seal.open(self.signature) if seal is not None else None
        return self.thinking if opened is None else opened


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
    role: Literal["user", "assistant", "system"]
    # Tagged so that a bad block is reported, not "not a string".
    content: Annotated[
        Annotated[str, Tag("Str")] | Annotated[list[Block], Tag("List")],
        Discriminator(_str_or_list),
    ]

    def to_template(self, seal: ReasoningSeal | None = None) -> list[dict[str, Any]]:
        """Chat-template messages: a user turn's ``tool_result`` blocks become ``tool``
        messages (in place), an assistant turn's ``tool_use`` blocks its ``tool_calls``, a
        system turn's text a system message (the core places it as the template allows)."""
        if isinstance(self.content, str):
            return [{"role": self.role, "content": self.content}]
        if self.role == "system":
            texts = [b.text for b in self.content if isinstance(b, TextBlock)]
            if len(texts) != len(self.content):
                raise InvalidRequest(
                    "Invalid value for 'messages': system messages hold text blocks only.",
                    param="messages",
                )
            return [{"role": "system", "content": "".join(texts)}]
        if self.role == "assistant":
            message: dict[str, Any] = {"role": "assistant", "content": ""}
            for block in self.content:
                if isinstance(block, TextBlock):
                    message["content"] += block.text
                elif isinstance(block, ThinkingBlock):
                    message["reasoning_content"] = message.get(
                        "reasoning_content", ""
                    ) + block.text(seal)
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
    # Offered to the model only once a tool_reference block names it (tool search).
    defer_loading: StrictBool | None = None

    def to_core(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "parameters": self.input_schema}
        if self.description:
            out["description"] = self.description
        return out


class ServerTool(_Lenient):
    """A tool Anthropic's servers run (``web_search_...``, ``code_execution_...``): nothing
    here can run it, so it is left out of what the model sees."""

    type: str
    name: str | None = None


def _tool_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return "Custom" if kind in (None, "custom") else "Server"


AnyTool = Annotated[
    Annotated[Tool, Tag("Custom")] | Annotated[ServerTool, Tag("Server")],
    Discriminator(_tool_kind),
]


class ToolChoice(_Lenient):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: StrictBool | None = None


class Thinking(_Lenient):
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    # Mapped onto the model's reasoning effort; only max_tokens bounds the thinking itself.
    budget_tokens: int | None = Field(default=None, ge=1)
    # "omitted": thinking blocks carry no text, only the signature (which restores it).
    display: Literal["summarized", "omitted"] | None = None


# output_config.effort and thinking budgets as the core's reasoning levels.
EFFORT = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}


def _budget_level(budget: int | None) -> str:
    if budget is None:
        return "on"
    return "low" if budget <= 4096 else "medium" if budget <= 16384 else "high"


class OutputFormat(_Lenient):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Lenient):
    """Structured output and the reasoning effort (with thinking, or alone)."""

    format: OutputFormat | None = None
    effort: str | None = Field(default=None, max_length=32)


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
    tools: list[AnyTool] | None = Field(default=None, max_length=512)
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    # LM Studio's: idle seconds before a just-in-time loaded model is unloaded.
    ttl: float | None = Field(default=None, gt=0, le=MAX_TTL_SECONDS)

    def custom_tools(self) -> list[Tool]:
        return [t for t in self.tools or [] if isinstance(t, Tool)]

    @model_validator(mode="after")
    def _tools_consistent(self) -> CountTokensRequest:
        names = [t.name for t in self.custom_tools()]
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
            return _without_billing_header(self.system)
        texts = [b.text for b in self.system]
        first = _without_billing_header(texts[0]) if texts else ""
        if texts and first != texts[0]:
            texts = [first, *texts[1:]] if first else texts[1:]
        return "\n".join(texts)

    def template_messages(self, seal: ReasoningSeal | None = None) -> list[dict[str, Any]]:
        out = [m for message in self.messages for m in message.to_template(seal)]
        system = self.system_text()
        if system:
            out.insert(0, {"role": "system", "content": system})
        return out

    def offered_tools(self) -> list[dict[str, Any]]:
        """The tools the model sees: custom tools, deferred ones only once a tool search
        result referenced them; server tools are dropped (logged)."""
        dropped = [t.type for t in self.tools or [] if isinstance(t, ServerTool)]
        if dropped:
            log.info("server tools dropped (nothing here runs them): %s", ", ".join(dropped))
        referenced = {
            name
            for message in self.messages
            if isinstance(message.content, list)
            for block in message.content
            if isinstance(block, ToolResultBlock)
            for name in block.references()
        }
        if self.tool_choice is not None and self.tool_choice.name:
            referenced.add(self.tool_choice.name)  # a forced tool is offered, deferred or not
        return [
            t.to_core() for t in self.custom_tools() if not t.defer_loading or t.name in referenced
        ]

    def _tool_choice(self) -> str | dict[str, str]:
        choice = self.tool_choice
        if choice is None or choice.type == "auto":
            return "auto"
        if choice.type == "tool":
            return {"name": choice.name or ""}
        return "required" if choice.type == "any" else "none"

    def _reasoning(self) -> tuple[str | None, bool]:
        """The core's reasoning level, and whether it is only a wish: adaptive thinking (and
        an effort alone) lets a model that cannot think answer anyway; ``enabled`` does
        not."""
        effort = self.output_config.effort if self.output_config else None
        level = EFFORT.get(effort, "on") if effort else None
        thinking = self.thinking
        if thinking is None:
            return level, True
        if thinking.type == "disabled":
            return "off", False
        if thinking.type == "enabled":
            return level or _budget_level(thinking.budget_tokens), False
        return level or "on", True

    def _json_schema(self) -> dict[str, Any] | None:
        output = self.output_config
        return output.format.schema_ if output and output.format else None

    def to_core(self, default_temperature: float, seal: ReasoningSeal | None = None) -> CoreRequest:
        choice = self.tool_choice
        reasoning, optional = self._reasoning()
        return CoreRequest(
            model=self.model,
            sampling=SamplingParams(temperature=default_temperature),
            messages=tuple(self.template_messages(seal)),
            tools=tuple(self.offered_tools()),
            tool_choice=self._tool_choice(),
            parallel_tool_calls=not (choice and choice.disable_parallel_tool_use),
            reasoning=reasoning,
            reasoning_optional=optional,
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

    def to_core(self, default_temperature: float, seal: ReasoningSeal | None = None) -> CoreRequest:
        return replace(
            super().to_core(default_temperature, seal),
            sampling=SamplingParams(
                temperature=default_temperature if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=self.top_k or 0,
            ),
            max_tokens=self.max_tokens,
            stops=tuple(self.stop_sequences or ()),
            ignore_eos=self.ignore_eos,
        )
