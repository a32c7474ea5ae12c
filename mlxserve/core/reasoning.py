"""Reasoning separation: text between a model's thinking tags goes to ``reasoning``."""

from __future__ import annotations

from dataclasses import dataclass

from mlxserve.core.textstream import partial_suffix

THINK_START = "<think>"
THINK_END = "</think>"


@dataclass(frozen=True)
class ReasoningSupport:
    """What a chat template says about thinking."""

    supported: bool
    # The template has a switch (``enable_thinking``) that turns thinking on and off.
    switchable: bool


def reasoning_support(template_source: str) -> ReasoningSupport:
    supported = THINK_START in template_source or THINK_END in template_source
    switchable = "enable_thinking" in template_source
    return ReasoningSupport(supported or switchable, switchable)


def prompt_opens_thinking(prompt: str) -> bool:
    """Whether the rendered prompt leaves the model inside a thinking block (templates that
    open the tag themselves, like DeepSeek-R1's and Qwen3's)."""
    tail = prompt.rstrip()
    return tail.endswith(THINK_START)


class ReasoningSplitter:
    """Streams text apart into reasoning and content, holding back a tag split across chunks.

    A thinking block is recognised where the prompt opened it, or where the output opens it
    before any answer text (whitespace aside)."""

    def __init__(self, *, in_reasoning: bool = False) -> None:
        self.in_reasoning = in_reasoning
        self._pending = ""
        self._content_started = False
        self._after_think = False

    def feed(self, text: str) -> list[tuple[bool, str]]:
        """Pieces ``(is_reasoning, text)`` that are safe to emit."""
        self._pending += text
        out: list[tuple[bool, str]] = []
        while self._pending:
            if self.in_reasoning:
                at = self._pending.find(THINK_END)
                if at >= 0:
                    self._out(out, True, self._pending[:at])
                    self._pending = self._pending[at + len(THINK_END) :]
                    self.in_reasoning, self._after_think = False, True
                    continue
                keep = partial_suffix(self._pending, THINK_END)
                self._out(out, True, self._pending[: len(self._pending) - keep])
                self._pending = self._pending[len(self._pending) - keep :]
                break
            if self._content_started:
                self._out(out, False, self._pending)
                self._pending = ""
                break
            stripped = self._pending.lstrip()
            if not stripped or THINK_START.startswith(stripped):
                break  # only whitespace, or maybe the start of a tag: wait for more
            if stripped.startswith(THINK_START):
                self._pending = stripped[len(THINK_START) :]
                self.in_reasoning = True
                continue
            self._content_started = True
            self._out(out, False, stripped if self._after_think else self._pending)
            self._pending = ""
            break
        return out

    def finish(self) -> list[tuple[bool, str]]:
        out: list[tuple[bool, str]] = []
        text, self._pending = self._pending, ""
        if self.in_reasoning:
            self._out(out, True, text)
        elif self._content_started or not self._after_think:
            self._out(out, False, text)
        return out

    @staticmethod
    def _out(out: list[tuple[bool, str]], reasoning: bool, text: str) -> None:
        if text:
            out.append((reasoning, text))
