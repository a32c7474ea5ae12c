"""The GGUF prompt cache's kept sequences on disk (see :mod:`backends.spill`): llama.cpp's
per-sequence state, restored into a free sequence on a hit.

Vision models spill too. An entry is keyed by its cells' token ids, where an image's cells
hold a mark of its pixels' SHA-256 (see ``Projector.tokenize``), so a prompt reuses an
entry only with the same images at the same places; the projector file is part of the
model's identity, and each entry records its position shift (an M-RoPE image takes fewer
positions than cells)."""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import llama_cpp

from backends.base import LoadOptions
from backends.llamacpp.hostcache import sequence_state
from backends.spill import SpillStore, open_store

log = logging.getLogger("mlxserve.backends")


class GGUFSpill:
    """Saves kept sequences the context has no room for (and all of them at unload), and
    restores the longest stored prefix of a prompt into a free sequence."""

    def __init__(self, store: SpillStore, ctx: Any) -> None:
        self.store = store
        self._ctx = ctx

    @classmethod
    def open(
        cls,
        path: Path,
        options: LoadOptions,
        kv: dict[str, Any],
        ctx: Any,
        *,
        trimmable: bool,
        projector: Path | None = None,
    ) -> GGUFSpill | None:
        """The model's spill store for the context ``ctx`` (whose KV layout ``kv`` names;
        ``trimmable`` false for recurrent state; ``projector``: a vision model's), or None
        when spilling is off (see :func:`open_store`)."""
        kv = {"format": "gguf", **kv}
        files = [path] if projector is None else [path, projector]
        store = open_store(options, path.stem, files, kv, trimmable=trimmable)
        return cls(store, ctx) if store is not None else None

    def save(self, seq: int, tokens: Sequence[int], pos_shift: int = 0) -> None:
        """Copy sequence ``seq``'s state (its cells hold ``tokens``, ``pos_shift`` more than
        the positions they take) and queue it for writing."""
        if not self.store.wants(tokens):
            return
        state = sequence_state(self._ctx, seq)
        if state is not None:
            self.save_state(tokens, state, pos_shift)

    def save_state(self, tokens: Sequence[int], state: memoryview, pos_shift: int = 0) -> None:
        """Queue a sequence state already copied out of the context (see
        :class:`~backends.llamacpp.hostcache.HostCache`) for writing."""

        def write(f: IO[bytes]) -> None:
            f.write(state)

        self.store.put(tokens, {"state_bytes": len(state), "pos_shift": pos_shift}, write)

    def restore(self, key: tuple[int, ...], seq: int) -> int | None:
        """Load the entry for ``key`` into the empty sequence ``seq``; its position shift, or
        None (and the entry gone) if its file is bad or llama.cpp refuses its state."""
        got = self.store.read(key)
        if got is None:
            return None
        meta, payload = got
        buf = (ctypes.c_uint8 * len(payload)).from_buffer_copy(payload)
        if llama_cpp.llama_state_seq_set_data(self._ctx, buf, len(payload), seq) == 0:
            log.warning("llama.cpp refused a spilled sequence of %d tokens", len(key))
            self.store.discard(key)
            return None
        return int(meta.get("pos_shift", 0))

    def close(self) -> None:
        """Finish the queued writes."""
        self.store.close()
