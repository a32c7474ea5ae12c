"""Dialect-neutral carriers: what a route asks the core for, and the events it gets back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from backends.base import SamplingParams

__all__ = [
    "CoreRequest",
    "Done",
    "Event",
    "Idle",
    "Progress",
    "SamplingParams",
    "TextDelta",
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


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Progress:
    """Prompt processing progress."""

    processed: int
    total: int


@dataclass(frozen=True)
class Done:
    finish_reason: Literal["stop", "length"]
    usage: Usage


@dataclass(frozen=True)
class Idle:
    """Nothing happened for a while (a long prompt or a queue): streams send a keep-alive."""


Event = TextDelta | Progress | Idle | Done
