"""The GGUF engine's pool of KV cells: one ``context_length`` window shared by its parallel
sequences (llama-server's unified cache) unless the load reserves more. llama-server ends
requests when its cache runs out; here no request fails: kept sequences leave the context
first, then the most recently admitted running sequence is preempted (its cells copied to host
memory with ``llama_state_seq_get_data``, the bytes the prompt cache parks) and resumes from
the same bytes when room is free, so its tokens are those it would have produced alone."""

from __future__ import annotations

import bisect
import logging

import llama_cpp

from backends.llamacpp.hostcache import StateFile, restore_state, sequence_state
from backends.llamacpp.sampling import NoRoom, SampledDecoding
from backends.llamacpp.sequence import _Seq
from backends.llamacpp.vision import Projector

log = logging.getLogger("mlxserve.backends")


class PooledSequences(SampledDecoding):
    """Room in the shared pool for the running sequences (see LlamaCppEngine._step)."""

    _projector: Projector | None

    def _round_cells(self, s: _Seq) -> int:
        """Cells ``s``'s next decode takes: its pending token, and a drafted one's proposals."""
        if s.pending is None:
            return 0
        return 1 + (s.job.request.num_draft_tokens if s.draft is not None else 0)

    def _piece_cells(self, s: _Seq) -> int:
        """Cells the next piece of ``s``'s prompt needs at once: one, or the rest of an image
        the model attends to non-causally (llama.cpp decodes it whole)."""
        media, done = s.media, len(s.tokens)
        if media is None or self._projector is None:
            return 1
        image = next((i for i in media.images if i.start + i.n > done), None)
        if image is None or image.start + image.done != done:
            return 1
        return image.n - image.done if self._projector.whole(media, image) else 1

    def _make_room(self) -> None:
        """Room in the pool for this step's decodes (and a prompt chunk, when a prompt is
        being read): kept sequences leave the context first (see _park), then the most
        recently admitted running sequences are preempted."""

        def need() -> int:
            reading = [self._piece_cells(s) for s in self._running if len(s.tokens) < len(s.prompt)]
            return sum(map(self._round_cells, self._running)) + max(reading, default=0)

        if need() <= self._free_cells():
            return
        self._evict_until(lambda: need() <= self._free_cells())
        while need() > self._free_cells() and (victim := self._victim()) is not None:
            self._preempt(victim)

    def _victim(self) -> _Seq | None:
        """The running sequence to preempt: the most recently admitted one that is simple to
        park (not mid-image, holding no moved runs, with cells), never the last one running."""
        if len(self._running) < 2:
            return None
        for s in reversed(self._running):
            if s.tokens and not self._pinned(s):
                return s
        return None

    def _preempt(self, s: _Seq) -> None:
        """Copy ``s``'s cells to host memory (llama.cpp's own bytes, as the prompt cache parks
        them) and free its sequence id; it waits to resume before any new admission.

        Preempted states share the host budget with the prompt cache's parked sequences and
        come first: those go to disk to make room, and a state the budget cannot hold is
        written to a temporary file (up to ``parallel - 1`` whole contexts could otherwise
        sit in memory that no budget or guardrail counts)."""
        self._wait_preempted(s, sequence_state(self._ctx.ctx, s.seq))

    def _wait_preempted(self, s: _Seq, state: memoryview | None) -> None:
        """Take running ``s`` out with its copied ``state`` (see _preempt)."""
        if state is not None:
            room = self._host_budget() - self._preempted_bytes() - len(state)
            if room >= 0:
                self._spill_host_until(lambda: self._host.bytes <= room)
                s.parked = state
            else:
                s.parked = StateFile(state)
        self._running.remove(s)
        self._drop(s.seq)
        s.source = None
        self.preempted += 1
        bisect.insort(self._preempted, s, key=lambda r: r.order)
        log.debug("preempted a sequence of %d tokens on %s", len(s.tokens), self.path.name)

    def _relocate(self, freed: int) -> None:
        """After kept sequences of ``freed`` cells left the context beside running ones, move
        the running sequences' cells down to the lowest free ones (each copied out, then back,
        as preemption does), when they hold at most half as many cells as were freed (copied
        out and back, they then cost no more than the park did).

        llama.cpp places a batch's tokens from its last placement onwards, so the tokens a
        stream decoded while a long prompt was read sit among and above that prompt's cells;
        and without flash attention every micro-batch scores all cells up to the highest one
        in use. Once the prompt's sequence is parked its cells are free, yet the streams'
        highest cells keep that span: each later prompt chunk and decode step would attend
        over the parked prompt's length as if it were still there (four long prompts sent
        together beside streams took 2.3-2.4x the stall of one). Back from the copy, a
        sequence holds the same bytes at the same positions in the first free cells."""
        movable = [
            s
            for s in self._running
            if s.tokens and s.source is None and s.hold is None and s.media is None
        ]
        if not movable or 2 * sum(len(s.tokens) for s in movable) > freed:
            return
        states = [(s, sequence_state(self._ctx.ctx, s.seq)) for s in movable]
        for s, _ in states:
            llama_cpp.llama_memory_seq_rm(self._mem, s.seq, -1, -1)
        for s, state in states:
            if state is None or restore_state(self._ctx.ctx, state, s.seq):
                continue
            # No room for it back (a kept sequence in use holds the cells): it waits as a
            # preempted sequence does, its state under the same host budget.
            log.warning("could not move a running sequence back on %s", self.path.name)
            self._wait_preempted(s, state)

    def _release_parked(self, s: _Seq) -> None:
        if isinstance(s.parked, StateFile):
            s.parked.close()
        s.parked = None

    def _resume(self) -> None:
        """Preempted sequences come back, earliest admitted first, when their cells fit (with
        the headroom while others run, as for a new request); the first one always does once
        nothing else runs."""
        while self._preempted and not (self._stalled and self._running):
            s = self._preempted[0]
            need = len(s.tokens) + self._growth_room()

            def fits(need: int = need) -> bool:
                return need <= self._free_cells() and bool(self._free)

            self._evict_until(fits)
            if self._running and not fits():
                return
            seq = self._free.pop()
            parked = s.parked.load() if isinstance(s.parked, StateFile) else s.parked
            if parked is not None and not restore_state(self._ctx.ctx, parked, seq):
                self._free.append(seq)
                if self._kept:
                    self._evict_until(lambda: False)
                    continue
                if self._running:
                    self._stalled = True
                    return
                del self._preempted[0]
                self._release_parked(s)
                s.job.fail(RuntimeError("llama.cpp could not take back a preempted sequence"))
                continue
            del self._preempted[0]
            self._release_parked(s)
            s.seq = seq
            bisect.insort(self._running, s, key=lambda r: r.order)

    def _relieve(self) -> None:
        """After llama.cpp found no room for a batch the estimate allowed (fragmented or
        shared cells): kept sequences leave the context, else the most recently admitted
        running sequence is preempted, and the preempted then wait for one to finish."""
        if self._kept:
            self._evict_until(lambda: False)
            return
        victim = self._victim()
        if victim is None:
            raise NoRoom("no room in the KV cache and no sequence that can wait")
        self._preempt(victim)
        self._stalled = True
