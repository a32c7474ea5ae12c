"""Reasoning separation: text between a model's thinking tags goes to ``reasoning``."""

from __future__ import annotations

from mlxserve.core.textstream import partial_suffix

THINK_START = "<think>"
THINK_END = "</think>"


def prompt_opens_thinking(prompt: str, start: str = THINK_START) -> bool:
    """Whether the rendered prompt leaves the model inside a thinking block (templates that
    open the tag themselves, like DeepSeek-R1's and Qwen3's)."""
    tail = prompt.rstrip()
    return tail.endswith(start)


class ReasoningSplitter:
    """Streams text apart into reasoning and content, holding back a tag split across chunks.

    A thinking block is recognised where the prompt opened it, or where the output opens it
    before any answer text (whitespace aside)."""

    def __init__(
        self, *, in_reasoning: bool = False, start: str = THINK_START, end: str = THINK_END
    ) -> None:
        self.in_reasoning = in_reasoning
        self.start, self.end = start, end
        self._pending = ""
        self._content_started = False
        self._after_think = False

    def feed(self, text: str) -> list[tuple[bool, str]]:
        """Pieces ``(is_reasoning, text)`` that are safe to emit."""
        self._pending += text
        out: list[tuple[bool, str]] = []
        while self._pending:
            if self.in_reasoning:
                at = self._pending.find(self.end)
                if at >= 0:
                    self._out(out, True, self._pending[:at])
                    self._pending = self._pending[at + len(self.end) :]
                    self.in_reasoning, self._after_think = False, True
                    continue
                keep = partial_suffix(self._pending, self.end)
                self._out(out, True, self._pending[: len(self._pending) - keep])
                self._pending = self._pending[len(self._pending) - keep :]
                break
            if self._content_started:
                self._out(out, False, self._pending)
                self._pending = ""
                break
            stripped = self._pending.lstrip()
            if not stripped or self.start.startswith(stripped):
                break  # only whitespace, or maybe the start of a tag: wait for more
            if stripped.startswith(self.start):
                self._pending = stripped[len(self.start) :]
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
