"""OpenAI wire schemas (requests only; responses are rendered by the routes).

Unknown fields are accepted and ignored, as OpenAI clients send many. Fields we cannot honour
are refused with a 400 rather than silently dropped.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from mlxserve.core import images
from mlxserve.core.types import CoreRequest, SamplingParams
from mlxserve.errors import InvalidRequest

MAX_STOPS = 16
MAX_STOP_LENGTH = 256
MAX_TTL_SECONDS = 365 * 24 * 3600
# The most alternatives a request may ask for beside each sampled token (OpenAI's limit).
MAX_TOP_LOGPROBS = 20


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImageUrl(_Lenient):
    url: str = Field(min_length=1)
    detail: str | None = None


class ImageUrlPart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageUrl | str

    def to_core(self, param: str) -> images.ImagePart:
        url = self.image_url if isinstance(self.image_url, str) else self.image_url.url
        return images.from_url(url, param)


class OtherPart(_Lenient):
    type: str


class FunctionCall(_Lenient):
    name: str
    arguments: str = ""


class ToolCall(_Lenient):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | ImageUrlPart | OtherPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(p.get("text", "")) for p in self.parts())

    def parts(self) -> list[dict[str, Any]]:
        """The content as core parts: text, and images (``image_url``) in user messages."""
        if self.content is None or isinstance(self.content, str):
            return images.content_parts(self.content)
        parts: list[dict[str, Any]] = []
        for part in self.content:
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
            elif isinstance(part, ImageUrlPart) and self.role == "user":
                parts.append(images.part(part.to_core("messages")))
            else:
                raise InvalidRequest(
                    f"Content parts of type '{part.type}' are not supported in "
                    f"{self.role} messages; only 'text' parts (and 'image_url' parts in user "
                    "messages) are.",
                    param="messages",
                )
        return parts

    def to_template(self) -> dict[str, Any]:
        """The message as chat templates expect it (HF conventions)."""
        role = "system" if self.role == "developer" else self.role
        content = images.message_content(self.parts())
        out: dict[str, Any] = {"role": role, "content": content}
        if self.name:
            out["name"] = self.name
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            calls = []
            for call in self.tool_calls:
                try:
                    arguments: Any = json.loads(call.function.arguments or "{}")
                except json.JSONDecodeError:
                    arguments = call.function.arguments
                calls.append(
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.function.name, "arguments": arguments},
                    }
                )
            out["tool_calls"] = calls
        return out


class StreamOptions(_Lenient):
    include_usage: StrictBool = False


Stop = (
    Annotated[str, Field(max_length=MAX_STOP_LENGTH)]
    | Annotated[
        list[Annotated[str, Field(max_length=MAX_STOP_LENGTH)]], Field(max_length=MAX_STOPS)
    ]
    | None
)


class _Sampling(_Lenient):
    """Sampling fields shared by chat and text completions (top_k, min_p and repeat_penalty
    are the extensions llama.cpp and LM Studio accept)."""

    model: str = Field(min_length=1, max_length=512)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=100_000)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repeat_penalty: float | None = Field(default=None, gt=0, le=10)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: Stop = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1, description="only one choice per request")
    # LM Studio's speculative decoding: a draft model (same format and vocabulary) and
    # how many tokens it proposes per step.
    draft_model: str | None = Field(default=None, min_length=1, max_length=512)
    num_draft_tokens: int | None = Field(default=None, ge=1, le=16)
    # llama.cpp's extension: keep generating past the end-of-text token (benchmarks, tests).
    ignore_eos: StrictBool = False
    # LM Studio's extension: idle seconds before a just-in-time loaded model is unloaded.
    ttl: float | None = Field(default=None, gt=0, le=MAX_TTL_SECONDS)

    def sampling(self, default_temperature: float) -> SamplingParams:
        return SamplingParams(
            temperature=default_temperature if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            repeat_penalty=self.repeat_penalty or 1.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            seed=self.seed,
        )

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class FunctionDef(_Lenient):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None

    def to_core(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["parameters"] = self.parameters or {"type": "object", "properties": {}}
        return out


class ToolDef(_Lenient):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Lenient):
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object with a 'schema'")
        return self

    def as_json_schema(self) -> dict[str, Any] | None:
        if self.type == "json_object":
            return {"type": "object"}
        if self.type == "json_schema" and self.json_schema is not None:
            return self.json_schema.schema_
        return None


class _Structured(_Sampling):
    response_format: ResponseFormat | None = None

    def json_schema(self) -> dict[str, Any] | None:
        return self.response_format.as_json_schema() if self.response_format else None


REASONING_EFFORT = {
    "none": "off",
    "minimal": "low",
    "low": "low",
    "medium": "medium",
    "high": "high",
}


class ChatCompletionRequest(_Structured):
    messages: list[ChatMessage] = Field(min_length=1, max_length=10_000)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: StrictBool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolDef] | None = Field(default=None, max_length=512)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None

    @model_validator(mode="after")
    def _tools_consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs set to true.", param="top_logprobs")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tool names must be unique")
        if isinstance(self.tool_choice, NamedToolChoice):
            if self.tool_choice.function.name not in names:
                raise ValueError(
                    f"tool_choice names '{self.tool_choice.function.name}', which is not in tools"
                )
        elif self.tool_choice in ("required",) and not names:
            raise ValueError("tool_choice 'required' needs at least one tool in tools")
        return self

    @model_validator(mode="after")
    def _contents_present(self) -> ChatCompletionRequest:
        # Required upstream on every message but an assistant's that calls tools: without it
        # a user turn is empty and the reply runs on to the end of the context.
        for i, message in enumerate(self.messages):
            if message.content is None and not (message.role == "assistant" and message.tool_calls):
                raise InvalidRequest(
                    f"Missing required parameter: 'messages[{i}].content'.",
                    param=f"messages[{i}].content",
                )
        return self

    def _tool_choice(self) -> str | dict[str, str]:
        if isinstance(self.tool_choice, NamedToolChoice):
            return {"name": self.tool_choice.function.name}
        return self.tool_choice or "auto"

    def to_core(self, default_temperature: float) -> CoreRequest:
        return CoreRequest(
            model=self.model,
            sampling=self.sampling(default_temperature),
            tools=tuple(t.function.to_core() for t in self.tools or []),
            tool_choice=self._tool_choice(),
            parallel_tool_calls=self.parallel_tool_calls is not False,
            json_schema=self.json_schema(),
            reasoning=REASONING_EFFORT[self.reasoning_effort] if self.reasoning_effort else None,
            messages=tuple(m.to_template() for m in self.messages),
            ignore_eos=self.ignore_eos,
            max_tokens=self.max_completion_tokens or self.max_tokens,
            stops=self.stop_list(),
            ttl=self.ttl,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            draft_model=self.draft_model,
            num_draft_tokens=self.num_draft_tokens,
        )


class CompletionRequest(_Structured):
    prompt: str | list[str]
    # How many most likely tokens to report beside each sampled one (OpenAI allows 5).
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS, strict=True)
    echo: StrictBool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=1)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("exactly one prompt per request is supported")
            return v[0]
        return v

    @model_validator(mode="after")
    def _refuse_unimplemented(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix (fill-in-the-middle) is not supported")
        return self

    def to_core(self, default_temperature: float) -> CoreRequest:
        assert isinstance(self.prompt, str)
        if not self.prompt:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        return CoreRequest(
            model=self.model,
            sampling=self.sampling(default_temperature),
            prompt=self.prompt,
            json_schema=self.json_schema(),
            ignore_eos=self.ignore_eos,
            max_tokens=self.max_tokens if self.max_tokens is not None else 16,
            stops=self.stop_list(),
            ttl=self.ttl,
            logprobs=self.logprobs,
            draft_model=self.draft_model,
            num_draft_tokens=self.num_draft_tokens,
        )
