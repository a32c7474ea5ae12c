"""Dialect-neutral carriers: what a route asks the core for, and the events it gets back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from backends.base import DraftStats, SamplingParams

__all__ = [
    "Candidate",
    "CoreRequest",
    "Done",
    "Event",
    "Idle",
    "InvalidToolCall",
    "Progress",
    "ReasoningDelta",
    "ToolCallDelta",
    "ToolCallEnd",
    "ToolCallStart",
    "SamplingParams",
    "TextDelta",
    "TokenLogprob",
    "Usage",
]


@dataclass(frozen=True)
class CoreRequest:
    """One generation. Exactly one of ``messages`` (chat) and ``prompt`` (raw text) is set."""

    model: str
    sampling: SamplingParams
    messages: tuple[dict[str, Any], ...] | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    stops: tuple[str, ...] = ()
    ignore_eos: bool = False
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    # Function tools ({"name", "description", "parameters"}) and how they may be used:
    # "auto", "none", "required", or {"name": ...} for one named function.
    tools: tuple[dict[str, Any], ...] = ()
    tool_choice: str | dict[str, str] = "auto"
    parallel_tool_calls: bool = True
    # Structured output: the reply is JSON matching this schema (enforced while decoding).
    json_schema: dict[str, Any] | None = None
    # "off", "on", "low", "medium", "high"; None leaves the model's default.
    reasoning: str | None = None
    # A wish rather than a demand (an agent's adaptive thinking): a model that cannot reason
    # ignores ``reasoning`` instead of refusing the request.
    reasoning_optional: bool = False
    # Idle seconds before a just-in-time loaded model is unloaded (LM Studio's ``ttl``).
    ttl: float | None = None
    # Log probabilities of each generated token and of this many most likely alternatives;
    # None reports none.
    logprobs: int | None = None
    # Speculative decoding: the draft model's key and its tokens proposed per step.
    draft_model: str | None = None
    num_draft_tokens: int | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int = 0
    # Prompt tokens served from the engine's prompt cache.
    cached_tokens: int = 0
    # Prompt tokens computed for this request and kept in the engine's prompt cache after it
    # (0 with the prompt cache off, or when the request was stopped before its end).
    cache_written: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class InvalidToolCall(TextDelta):
    """A tool call the model wrote that cannot be read (an unknown tool, arguments that do not
    parse). ``text`` is the call with the family's control markers removed, so a dialect with no
    place for invalid calls shows it as content; LM Studio v1 reports it as an
    ``invalid_tool_call``."""

    reason: str = ""
    # Set when the call named a tool that is not offered (LM Studio's ``invalid_name``);
    # None when the call itself cannot be read (``invalid_arguments``).
    unknown_name: str | None = None


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A fragment of a call's arguments (JSON text); the fragments join to the whole."""

    index: int
    arguments: str


@dataclass(frozen=True)
class ToolCallEnd:
    """A call is complete. ``parsed`` is its arguments, parsed once by the output pipeline:
    the JSON object, or None when its text is not one (a call cut off by max_tokens)."""

    index: int
    parsed: dict[str, Any] | None = None


@dataclass(frozen=True)
class Candidate:
    """A token and its log probability. ``token`` is its text, or ``bytes:\\x..`` when its
    bytes are not whole UTF-8 (OpenAI's convention)."""

    token: str
    bytes: bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """The log probabilities of one generated token, sent just before that token's text
    events (its text may come later: stop strings and partial characters are held back)."""

    sampled: Candidate
    # The most likely tokens, most likely first.
    top: tuple[Candidate, ...]


@dataclass(frozen=True)
class Progress:
    """Prompt processing progress."""

    processed: int
    total: int
    # Of ``processed``, the tokens served from the prompt cache.
    cached: int = 0


@dataclass(frozen=True)
class Done:
    finish_reason: Literal["stop", "length", "tool_calls"]
    usage: Usage
    # The stop string that ended the reply (finish_reason "stop"); None for end-of-text.
    stop_sequence: str | None = None
    # Speculative decoding: the draft model's key and what it proposed.
    draft_model: str | None = None
    draft: DraftStats | None = None


@dataclass(frozen=True)
class Idle:
    """Nothing happened for a while (a long prompt or a queue): streams send a keep-alive."""


Event = (
    TextDelta
    | ReasoningDelta
    | ToolCallStart
    | ToolCallDelta
    | ToolCallEnd
    | Progress
    | Idle
    | Done
    | TokenLogprob
)
