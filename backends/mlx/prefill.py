"""How much prompt work one step of the MLX batch takes on while other streams decode."""

from __future__ import annotations

from collections.abc import Container
from typing import Any

# Prefill chunk when no stream is decoding (small chunks slow prompt processing down).
IDLE_PREFILL_CHUNK = 2048


class PrefillBudget:
    """Prompt tokens left to prefill, by BatchGenerator uid: of prompts waiting for mlx-lm
    to take them in (in its queue order) and of prompts it is prefilling, from which each
    step's ``prefill_batch_size`` and ``prefill_step_size`` are set.

    While streams decode, one step processes at most ``chunk`` prompt tokens however many
    prompts arrive together: waiting prompts join the prefill only while every row, whole,
    still fits the chunk (short prompts go in together, long ones one at a time), and the
    rows being prefilled share the chunk. mlx-lm alone would prefill up to
    ``prefill_batch_size`` prompts a chunk each. With nothing decoding, every waiting prompt
    is prefilled together in large chunks, so the first token comes soonest."""

    def __init__(self, chunk: int, slots: int) -> None:
        self.chunk = chunk
        self.slots = slots
        self._waiting: dict[int, int] = {}
        self._prefilling: dict[int, int] = {}

    def queued(self, uid: int, tokens: int) -> None:
        """A prompt of ``tokens`` tokens to prefill was inserted into the batch."""
        self._waiting[uid] = tokens

    def clear(self) -> None:
        """The batch was replaced (a new one numbers its requests from 0 again)."""
        self._waiting.clear()
        self._prefilling.clear()

    def apply(self, batch: Any, decoding: bool, running: Container[int]) -> None:
        """Set the sizes of ``batch``'s next step; uids not ``running`` are forgotten."""
        for uid in [u for u in (*self._waiting, *self._prefilling) if u not in running]:
            self._waiting.pop(uid, None)
            self._prefilling.pop(uid, None)
        if not decoding:
            batch.prefill_batch_size = self.slots
            batch.prefill_step_size = max(self.chunk, IDLE_PREFILL_CHUNK)
            return
        rows = len(self._prefilling)
        longest = max(self._prefilling.values(), default=0)
        for left in self._waiting.values():
            if rows and (rows + 1) * max(longest, left) > self.chunk:
                break
            rows += 1
            longest = max(longest, left)
        batch.prefill_batch_size = max(1, rows)
        batch.prefill_step_size = max(1, self.chunk // max(1, rows))

    def stepped(self, prompt_responses: list[Any]) -> None:
        """Take in what a step reported of the prompts it processed."""
        for pr in prompt_responses:
            self._waiting.pop(pr.uid, None)
            if pr.end_of_prompt:
                self._prefilling.pop(pr.uid, None)
            else:
                self._prefilling[pr.uid] = pr.progress[1] - pr.progress[0]
