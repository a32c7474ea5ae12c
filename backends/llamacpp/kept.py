"""The GGUF engine's prompt cache in its shared context: finished sequences kept for prefix
reuse, their eviction, spill and restore, the search for a new request's source, and the
prompt checkpoints of models whose memory cannot be cut back."""

from __future__ import annotations

import random
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp import Llama

from backends.base import CHECKPOINT_TAIL, DraftStats, Engine, Job, common_prefix
from backends.llamacpp import adapter
from backends.llamacpp.draft import DraftModel
from backends.llamacpp.hostcache import HostCache
from backends.llamacpp.reuse import attach, best_source, prepare_hold, served
from backends.llamacpp.sequence import _Seq
from backends.llamacpp.spill import GGUFSpill
from backends.llamacpp.vision import Chunks


class KeptSequences(Engine):
    """Sequence ids and kept sequences of the shared context (see LlamaCppEngine, which
    opens the context and sets this state)."""

    _llm: Llama
    _mem: Any
    _spill: GGUFSpill | None
    _drafts: dict[Path, DraftModel]
    _running: list[_Seq]
    _free: list[int]
    _kept: OrderedDict[int, list[int]]
    _kept_shift: dict[int, int]
    # Running sequences preempted for room (see PooledSequences): their states out of the
    # context share the host budget with parked kept sequences.
    _preempted: list[_Seq]
    _host: HostCache
    _whole_only: bool
    _reuse: int
    _cells: int
    _headroom: int
    # Admission numbers (see _Seq.order).
    _admissions: Iterator[int]
    # Set when a request did not fit the free cells, or llama.cpp found no room where the
    # estimate did: waiting and preempted sequences then wait for a running one to finish.
    _stalled: bool

    def _drop(self, seq: int) -> None:
        llama_cpp.llama_memory_seq_rm(self._mem, seq, -1, -1)
        for draft in self._drafts.values():
            draft.drop(seq)
        if self._kept.pop(seq, None) is not None:
            for s in self._running:
                if s.source == seq:
                    s.source = None
        self._kept_shift.pop(seq, None)
        self._free.append(seq)

    def _cells_used(self) -> int:
        """The pool's cells in use: kept sequences', running ones' (but what they share with
        a kept one) and the moved runs still held for them."""
        used = self._kept_cells()
        for s in self._running:
            used += len(s.tokens) - (s.borrowed if s.source is not None else 0)
            used += sum(r.n for r in s.runs)
        return used

    def _free_cells(self) -> int:
        return self._cells - self._cells_used()

    def _growth_room(self) -> int:
        """Free cells a new request must leave beside its prompt: the headroom while other
        sequences run (growth past it is met by preemption); none when it would run alone,
        since its prompt and reply fit the context (a chat's next turn whose history nearly
        fills the pool then still reuses it, where the headroom would have evicted it)."""
        return self._headroom if self._running else 0

    def _pinned(self, s: _Seq) -> bool:
        """Whether running ``s`` cannot be preempted now: it reads an image or holds moved
        runs (see PooledSequences._victim)."""
        mid_image = s.media is not None and len(s.tokens) < len(s.prompt)
        return s.hold is not None or mid_image

    def _pinned_unread(self) -> int:
        """Cells the prompts of running sequences that cannot be preempted will still take
        (a moved run's are held already): a new request must leave them free, or both may
        wait on each other with no cell free and nothing to preempt."""
        return sum(
            len(s.prompt) - len(s.tokens) - sum(r.n for r in s.runs)
            for s in self._running
            if self._pinned(s)
        )

    def _evict_until(self, fits: Any, keep: int | None = None) -> None:
        """Move kept sequences out of the context (least recently used first) until
        ``fits()``."""
        for seq in [s for s in self._kept if s != keep]:
            if fits():
                return
            self._park(seq)

    def _park(self, seq: int) -> None:
        """Move kept sequence ``seq`` out of the context into host memory, freeing its cells
        (see backends.llamacpp.hostcache); over the host budget the least recently parked
        entries go to disk."""
        budget = self._host_budget()
        if budget:
            self._host.park(seq, self._kept[seq], self._kept_shift.get(seq, 0))
        else:
            self._spill_kept(seq)
        self._drop(seq)
        self._spill_host_until(lambda: self._host.bytes + self._preempted_bytes() <= budget)

    def _preempted_bytes(self) -> int:
        """Host memory the preempted sequences' states take (not those written to files)."""
        return sum(len(s.parked) for s in self._preempted if isinstance(s.parked, memoryview))

    def _host_budget(self) -> int:
        """The host memory parked sequences may take: the prompt cache's budget, or the
        guardrail's cut of it. Kept sequences in the context take none beyond the cells
        llama.cpp reserved at load, so the budget does not bound them."""
        cut = self.options.host_cache_bytes
        return self.options.prompt_cache_bytes if cut is None else cut

    def _spill_host_until(self, fits: Callable[[], bool]) -> None:
        """Move host-memory entries to disk (least recently parked first; without a disk
        cache they are dropped) until ``fits()`` or none is left."""
        while not fits() and (old := self._host.oldest()) is not None:
            if self._spill is not None:
                self._spill.save_state(old[0], old[1].state, old[1].pos_shift)

    def _spill_kept(self, seq: int) -> None:
        tokens = self._kept[seq]
        if self._spill is not None:
            self._spill.save(seq, tokens, self._kept_shift.get(seq, 0))

    def _restore_spilled(self, job: Job) -> None:
        """Bring back the longest prefix of the prompt kept out of the context (in host
        memory or on disk) as a kept sequence when no kept sequence shares as much of it: the
        search below then reuses it like the others."""
        request = job.request
        prompt = request.prompt
        kept = [
            n
            for t in self._kept.values()
            if (n := common_prefix(t, prompt, len(prompt) - 1)) == len(t) or not self._whole_only
        ]
        have = max(kept, default=0)
        min_run = self._reuse if request.vision is None else 0
        if min_run:
            movable = {k: t for k, t in self._kept.items() if not self._kept_shift.get(k)}
            have = max(have, served(self._kept, movable, list(prompt), min_run))
        key, n = self._host.best(prompt, have, min_run)
        from_disk = False
        if self._spill is not None:
            on_disk, disk_n = self._spill.store.longest(prompt, max(have, n))
            if on_disk is not None:
                key, n, from_disk = on_disk, disk_n, True
        if key is None:
            return
        # The entry's cells and the prompt's tokens it does not serve.
        need = len(key) + max(0, len(prompt) - n) + self._growth_room()

        def fits() -> bool:
            # One free sequence for the entry, one for the request.
            return need <= self._free_cells() and len(self._free) >= 2

        self._evict_until(fits)
        if not fits():
            return
        seq = self._free.pop()
        if from_disk:
            assert self._spill is not None
            pos_shift = self._spill.restore(key, seq)
        else:
            pos_shift = self._host.restore(key, seq)
        if pos_shift is None:
            self._drop(seq)
            return
        self._kept[seq] = list(key)
        self._kept_shift[seq] = pos_shift

    def _kept_cells(self) -> int:
        return sum(len(t) for t in self._kept.values())

    def _start_seq(self, job: Job, used: set[int]) -> bool:
        """Start ``job`` in a free sequence, from the kept sequence that serves most of its
        prompt; that sequence joins ``used`` if the prompt shares at least half of it. False
        (nothing started) while other sequences run and the prompt's uncached tokens and a
        headroom do not fit the pool's free cells: later growth is met by preemption."""
        self._restore_spilled(job)
        request = job.request
        prompt = list(request.prompt)
        # The kept sequence that serves most of the prompt: its exact shared prefix, then the
        # runs past it that can be moved (none for image prompts or after an image).
        min_run = self._reuse if request.vision is None else 0
        movable = {k: t for k, t in self._kept.items() if not self._kept_shift.get(k)}
        busy = [r.tokens for r in self._running]
        kept: Mapping[int, list[int]] = self._kept
        if self._whole_only:
            kept = {k: t for k, t in kept.items() if len(t) < len(prompt) and prompt[: len(t)] == t}
        source, shared, runs = best_source(kept, movable, busy, prompt, min_run)
        # Image cells are marked by their image's hash (negative ids): a prefix shared with a
        # kept sequence holds the same images, and is reused up to an image boundary.
        media: Chunks | None = request.vision
        if media is not None:
            shared = media.boundary(shared)
            if not shared:
                source = None
        first_media = next((i for i, t in enumerate(prompt) if t < 0), len(prompt))

        pinned = self._pinned_unread()

        def fits() -> bool:
            # The source's cells are counted already (it is kept), the runs moved out of it
            # too: the request adds the prompt tokens neither serves.
            moved = sum(r.n for r in runs) if source is not None else 0
            new = len(prompt) - shared - moved
            return new + self._growth_room() + pinned <= self._free_cells()

        self._evict_until(fits, keep=source)
        if not self._free:
            self._evict_until(lambda: bool(self._free), keep=source)
        if not fits() or not self._free:
            source, shared, runs = None, 0, []
            self._evict_until(lambda: fits() and bool(self._free))
        if self._running and not (fits() and self._free):
            return False
        seq = self._free.pop()
        try:
            pos_shift = 0
            if source is not None and shared > first_media:
                pos_shift = self._kept_shift.get(source, 0)
                if media is not None:
                    pos_shift = media.shift_at(shared)
            if source is not None:
                self._kept.move_to_end(source)
                # Unified KV: the copy shares the source's cells, nothing is duplicated. The
                # range is in positions: after an image they lag the cells by its shift.
                llama_cpp.llama_memory_seq_cp(self._mem, source, seq, 0, shared - pos_shift)
            p = request.sampling
            seed = p.seed % (1 << 32) if p.seed is not None else random.getrandbits(31)
            self._llm.set_seed(seed)
            # llama-cpp-python's sampler chain (penalties, top-k/p, min-p, temperature, seeded
            # draw), one per sequence; a grammar masks the logits in place before it samples.
            sampler = adapter.sampler_chain(
                self._llm,
                top_k=p.top_k,
                top_p=p.top_p,
                min_p=p.min_p,
                temp=p.temperature,
                repeat_penalty=p.repeat_penalty,
                frequency_penalty=p.frequency_penalty,
                presence_penalty=p.presence_penalty,
            )
        except BaseException:
            # The sequence id goes back, its cells cleared, so that no slot leaks.
            self._drop(seq)
            raise
        state = _Seq(job, seq, prompt, shared, sampler, prompt[:shared], pos_shift=pos_shift)
        state.order = next(self._admissions)
        if source is not None and shared:
            state.source, state.borrowed = source, shared
        if media is not None:
            if any(i.start >= shared for i in media.images):
                state.media = media
            else:
                media.free()
        if source is not None and runs:
            # The kept sequence gives up its place in the cache and holds the moved runs.
            del self._kept[source]
            self._kept_shift.pop(source, None)
            state.source = None
            prepare_hold(self._mem, source, shared, runs)
            state.hold, state.runs = source, deque(runs)
            state.cached += sum(r.n for r in runs)
        # Image prompts decode without their draft: its context holds no images. Nor do
        # recurrent models: rejected proposals cannot be removed from their state.
        if request.draft is not None and request.vision is None and not self._whole_only:
            state.draft = self._drafts[request.draft]
            job.draft = DraftStats()
        self._running.append(state)
        if source is not None and source in self._kept and len(self._kept[source]) <= 2 * shared:
            used.add(source)
        if self.options.prompt_cache_bytes:
            job.cache_written = len(prompt) - state.cached
        job.progress(shared, len(prompt), state.cached)
        return True

    def _attach_runs(self, s: _Seq) -> None:
        """Give ``s`` the moved runs that start where its decoding has reached."""
        assert s.hold is not None
        while s.runs and s.runs[0].new == len(s.tokens):
            run = s.runs.popleft()
            attach(self._mem, s.hold, s.seq, run)
            s.tokens.extend(s.prompt[run.new : run.new + run.n])
        if not s.runs:
            self._release_hold(s)
        s.job.progress(len(s.tokens), len(s.prompt), s.cached)

    def _release_hold(self, s: _Seq) -> None:
        if s.hold is not None:
            llama_cpp.llama_memory_seq_rm(self._mem, s.hold, -1, -1)
            self._free.append(s.hold)
            s.hold = None
            s.runs.clear()

    def _finish_seq(self, s: _Seq) -> None:
        self._running.remove(s)
        self._stalled = False
        if s.media is not None:
            s.media.free()
        self._release_hold(s)
        if s.draft is not None:
            s.draft.drop(s.seq)
        tokens = s.tokens
        if not tokens or not self.options.prompt_cache_bytes:
            self._drop(s.seq)
            return
        # A kept sequence this one extends is covered by it, unless it cannot be cut back.
        for seq, kept in list(self._kept.items()):
            if len(kept) <= len(tokens) and tokens[: len(kept)] == kept and not self._whole_only:
                self._drop(seq)
        self._keep(s.seq, tokens, s.pos_shift)

    def _keep(self, seq: int, tokens: list[int], pos_shift: int) -> None:
        self._kept[seq] = tokens
        self._kept_shift[seq] = pos_shift

    def _checkpoint_at(self, s: _Seq) -> int:
        """Where the prompt checkpoint of a model whose memory cannot be cut back is taken (0:
        none): the next turn's prompt extends this prompt but for its generation prompt,
        while the reply may come back re-rendered."""
        if not self._whole_only or s.pending is not None or s.job.generated:
            return 0
        return max(0, len(s.prompt) - CHECKPOINT_TAIL)

    def _checkpoint_prompt(self, s: _Seq) -> None:
        """Keep a copy of ``s`` as it is at its prompt checkpoint. The copy shares the KV
        cells; llama.cpp copies the recurrent state to a cell of its own when ``s`` next
        writes to it."""
        if not self.options.prompt_cache_bytes:
            return
        if any(t == s.tokens for t in self._kept.values()):
            return
        # A fresh checkpoint is worth more than the least recently used kept sequence.
        self._evict_until(lambda: bool(self._free))
        if not self._free:
            return
        seq = self._free.pop()
        llama_cpp.llama_memory_seq_cp(self._mem, s.seq, seq, -1, -1)
        self._keep(seq, list(s.tokens), s.pos_shift)
        if seq in self._kept:
            s.source, s.borrowed = seq, len(s.tokens)
