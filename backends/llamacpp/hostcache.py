"""The GGUF prompt cache's kept sequences in host memory: llama-server's ``--cache-ram``.

All parallel sequences share one unified KV cache, and without flash attention llama.cpp
computes every micro-batch's attention over all cells up to the highest one in use (its
``n_kv``), masking other sequences' cells only after scoring them. A finished request kept
in the context for prefix reuse therefore slows every later prompt chunk and decode step
that does not use it, in proportion to its length. So a kept sequence that a newly admitted
request does not use leaves the context: llama.cpp's per-sequence state (its cells' keys and
values and positions) is copied here and its cells are freed, and a later prompt that shares
its prefix copies it back into a free sequence. The bytes are llama.cpp's own, so a restored
sequence holds the values it held (placed in the same order, possibly at other cells)."""

from __future__ import annotations

import ctypes
import logging
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp

from backends.llamacpp.reuse import RunFilter, served
from backends.spill import longest_prefix

log = logging.getLogger("mlxserve.backends")


def sequence_state(ctx: Any, seq: int) -> memoryview | None:
    """A copy of sequence ``seq``'s llama.cpp state (None if it holds nothing)."""
    size = llama_cpp.llama_state_seq_get_size(ctx, seq)
    buf = (ctypes.c_uint8 * size)()
    n = llama_cpp.llama_state_seq_get_data(ctx, buf, size, seq)
    if n == 0:
        return None
    return memoryview(buf).cast("B")[:n]


def restore_state(ctx: Any, state: memoryview, seq: int) -> bool:
    """Copy a state from :func:`sequence_state` into the empty sequence ``seq``; False if
    llama.cpp found no room for its cells."""
    buf = (ctypes.c_uint8 * len(state)).from_buffer(state)
    return llama_cpp.llama_state_seq_set_data(ctx, buf, len(state), seq) != 0


class StateFile:
    """A sequence state written to an unnamed temporary file instead of held in memory (the
    kernel keeps it in its page cache while memory allows, and may drop it when not)."""

    def __init__(self, state: memoryview) -> None:
        # Closed by close(), when the state is taken back or its request ends.
        self._file = tempfile.TemporaryFile(prefix="mlxserve-state-")  # noqa: SIM115
        self._file.write(state)
        self.nbytes = len(state)

    def load(self) -> memoryview:
        self._file.seek(0)
        data = bytearray(self.nbytes)
        self._file.readinto(data)
        return memoryview(data)

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True)
class Parked:
    """One sequence's state out of the context: ``pos_shift`` is how many more cells than
    positions it holds (an M-RoPE image)."""

    state: memoryview
    pos_shift: int


class HostCache:
    """Kept sequences moved out of the context, keyed by the tokens their cells hold, least
    recently used first. ``trimmable`` false (a recurrent state): an entry serves only
    prompts that hold it whole."""

    def __init__(self, ctx: Any, *, trimmable: bool) -> None:
        self._ctx = ctx
        self.trimmable = trimmable
        self._entries: OrderedDict[tuple[int, ...], Parked] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _covers(self, longer: tuple[int, ...], key: tuple[int, ...]) -> bool:
        if not self.trimmable:
            return longer == key
        return len(longer) >= len(key) and longer[: len(key)] == key

    def park(self, seq: int, tokens: Sequence[int], pos_shift: int) -> None:
        """Copy sequence ``seq``'s state here (the caller then frees its cells). An entry
        already holding these tokens, or more after them, makes the copy unneeded; entries
        this one extends are replaced by it."""
        key = tuple(tokens)
        if any(self._covers(k, key) for k in self._entries):
            return
        state = sequence_state(self._ctx, seq)
        if state is None:
            return
        for k in [k for k in self._entries if self._covers(key, k)]:
            self._remove(k)
        self._entries[key] = Parked(state, pos_shift)
        self.bytes += len(state)

    def best(
        self, prompt: Sequence[int], have: int, min_run: int = 0
    ) -> tuple[tuple[int, ...] | None, int]:
        """The entry serving most of ``prompt`` and how many tokens it serves, if that is
        more than the ``have`` tokens the context serves: its exact prefix (see
        :func:`backends.spill.longest_prefix`), and with ``min_run`` also the runs past it
        that changed-middle reuse would move (see :func:`backends.llamacpp.reuse.served`)."""
        # Copying an entry back costs far less than computing even one token of it.
        key, n = longest_prefix(self._entries, prompt, have, trimmable=self.trimmable, min_gain=1)
        if not min_run:
            return key, n
        # The prompt indexed once for every entry: most share no run with it.
        wanted = list(prompt)
        runs_filter = RunFilter(wanted, min_run)
        for k, entry in self._entries.items():
            if entry.pos_shift:
                continue
            tokens = list(k)
            one = {0: tokens}
            gets = served(one, one, wanted, min_run, runs_filter)
            if gets > max(have, n):
                key, n = k, gets
        return key, n

    def restore(self, key: tuple[int, ...], seq: int) -> int | None:
        """Copy the entry for ``key`` back into the empty sequence ``seq`` and forget it; its
        position shift, or None if llama.cpp found no room for its cells."""
        entry = self._remove(key)
        if not restore_state(self._ctx, entry.state, seq):
            log.warning("llama.cpp could not take back a parked sequence of %d tokens", len(key))
            return None
        return entry.pos_shift

    def oldest(self) -> tuple[tuple[int, ...], Parked] | None:
        """Remove and return the least recently parked entry (None when empty)."""
        if not self._entries:
            return None
        key = next(iter(self._entries))
        return key, self._remove(key)

    def _remove(self, key: tuple[int, ...]) -> Parked:
        entry = self._entries.pop(key)
        self.bytes -= len(entry.state)
        return entry
