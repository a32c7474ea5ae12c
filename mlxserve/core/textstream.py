"""Token ids to text: incremental UTF-8 decoding and stop strings, identical for every backend."""

from __future__ import annotations

import codecs
from collections.abc import Callable


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``tag``: text to hold
    back because it may be the start of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class TextAssembler:
    """Turns a stream of token ids into text deltas and detects stop strings.

    Text that could be the start of a stop string is held back until it is known not to be
    one, so a stop string never reaches the client, even split across tokens.
    """

    def __init__(
        self,
        token_bytes: Callable[[int], bytes],
        stops: tuple[str, ...] = (),
        *,
        strip_leading_space: bool = False,
    ) -> None:
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = tuple(s for s in stops if s)
        self._pending = ""
        self._strip_leading_space = strip_leading_space
        self._started = False
        self.stopped = False
        # The stop string that ended the text, once one has.
        self.stop_sequence: str | None = None

    def add(self, token_id: int) -> str:
        """Feed one token; returns the text that is now safe to emit (maybe empty)."""
        if self.stopped:
            return ""
        text = self._decoder.decode(self._token_bytes(token_id))
        return self._push(text)

    def finish(self) -> str:
        """The text still held back when generation ends without a stop string."""
        if self.stopped:
            return ""
        text = self._push(self._decoder.decode(b"", final=True))
        out, self._pending = text + self._pending, ""
        return out

    def _push(self, text: str) -> str:
        if not self._started and text:
            self._started = True
            if self._strip_leading_space and text.startswith(" "):
                text = text[1:]
        self._pending += text
        if not self._stops:
            out, self._pending = self._pending, ""
            return out
        cut = self._earliest_stop()
        if cut is not None:
            self.stopped = True
            self.stop_sequence = next(s for s in self._stops if self._pending.find(s) == cut)
            out, self._pending = self._pending[:cut], ""
            return out
        keep = self._held_back()
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep :]
        return out

    def _earliest_stop(self) -> int | None:
        found = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        """Length of the longest tail of the pending text that begins some stop string."""
        return max((partial_suffix(self._pending, stop) for stop in self._stops), default=0)
