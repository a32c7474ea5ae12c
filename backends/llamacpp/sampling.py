"""The GGUF engine's decodes and samples: the batch it fills, each sequence's sample from its
row (grammar, penalties, log probabilities), and the speculative round of a drafted one."""

from __future__ import annotations

from typing import Any

import llama_cpp
import numpy as np

from backends.base import TokenLogprobs
from backends.llamacpp.adapter import LlamaContext
from backends.llamacpp.draft import SMALL_BATCH, decode_threads
from backends.llamacpp.kept import KeptSequences
from backends.llamacpp.sequence import _Seq
from backends.logprobs import RowLogprobs, penalize


class NoRoom(RuntimeError):
    """llama.cpp found no free cells for a decode's batch (``llama_decode`` returned 1): the
    context is as it was before the call, and so are the sequences put in the batch."""


class SampledDecoding(KeptSequences):
    """Decoding and sampling on the shared context (see LlamaCppEngine._step)."""

    _ctx: LlamaContext
    _batch: Any
    _n_vocab: int
    # Each sequence put in the batch since the last decode: its tokens and pending token
    # before, to put back if llama.cpp finds no room for the batch.
    _marks: dict[int, tuple[_Seq, int, int | None]]

    def _take_samples(self, outputs: list[tuple[_Seq, int]]) -> None:
        """Sample each sequence's next token from its row of the last decode. The step's
        tokens reach the event loop in one wake-up; ended sequences are put away after that
        (keeping one may evict others to disk)."""
        ended = []
        with self.relayed():
            for s, i in outputs:
                token, lp = self._sample(s, i)
                self.batched_tokens += 1
                if self._accept(s.job, token, lp):
                    ended.append(s)
                else:
                    s.pending = token
        for s in ended:
            self._finish_seq(s)

    def _put(self, s: _Seq, token: int, logits: bool) -> int:
        """Append ``token`` of sequence ``s`` to the batch at its next position; its index."""
        self._marks.setdefault(s.seq, (s, len(s.tokens), s.pending))
        batch = self._batch
        i = batch.n_tokens
        batch.token[i] = token
        batch.pos[i] = len(s.tokens) - s.pos_shift
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = s.seq
        batch.logits[i] = logits
        batch.n_tokens = i + 1
        s.tokens.append(token)
        return i

    def _decode(self) -> None:
        rc = llama_cpp.llama_decode(self._ctx.ctx, self._batch)
        marks, self._marks = self._marks, {}
        if rc == 1:
            for s, n, pending in marks.values():
                del s.tokens[n:]
                s.pending = pending
            self._batch.n_tokens = 0
            raise NoRoom("llama.cpp found no free KV cells for the batch")
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _sample(self, s: _Seq, i: int) -> tuple[int, TokenLogprobs | None]:
        """Sample ``s``'s next token from row ``i`` of the last decode: grammar mask, then the
        sequence's sampler chain (which takes the token into its penalty window)."""
        request = s.job.request
        constraint = request.constraint
        logits = None
        if constraint is not None or request.logprobs is not None:
            logits = np.ctypeslib.as_array(
                llama_cpp.llama_get_logits_ith(self._ctx.ctx, i), shape=(self._n_vocab,)
            )
        if constraint is not None and logits is not None:
            constraint.mask_inplace(logits)
        if logits is not None and request.logprobs is not None:
            # The chain's penalty sampler works on its own copy: apply them here too.
            logits = penalize(logits, s.recent, request.sampling)
        token = s.sampler.sample(self._ctx, i)
        if constraint is not None:
            constraint.advance(token)
        lp = None
        if logits is not None and request.logprobs is not None:
            lp = RowLogprobs(logits, token, request.logprobs)
            s.recent.append(token)
        return token, lp

    def _catch_up_drafts(self, budget: float | None, cap: int) -> tuple[int, float, set[int]]:
        """Drafts that lack more of their requests' tokens than a round evaluates (the prompt
        chunks the model took, a prompt read from the prompt cache, a resumed request) catch
        up a chunk each, within the step's ``budget`` of prompt work (the model's cell units;
        None: none) and ``cap`` tokens, so that no step runs a long prompt through the draft
        at once while streams wait. The first chunk of a step takes at least one token, as a
        prompt's does. Returns the tokens evaluated, their cost and the sequences whose draft
        had no room (their round proposes nothing rather than wait)."""
        spent, cost, full = 0, 0.0, set()
        for s in self._running:
            if s.draft is None or spent >= cap or not self._proposals(s):
                continue
            behind = s.draft.behind(s.seq, s.tokens)
            if behind <= SMALL_BATCH:
                continue
            n = min(behind, cap - spent)
            if budget is not None:
                n = s.draft.chunk_tokens(budget - cost, n)
                n = max(n, 1) if not spent else n
            if not n:
                continue
            # Only what the draft evaluated is spent: a draft without room tries each step,
            # and charging its whole chunk left no budget to any prompt, its own included.
            done, price = s.draft.catch_up(s.seq, s.tokens, n)
            cost += price
            spent += done
            if done < n:
                full.add(s.seq)
        return spent, cost, full

    def _ready(self, s: _Seq, full: set[int]) -> bool:
        """Whether drafted ``s`` takes a speculative round now: its draft is within a round's
        reach of its tokens, or had no room to catch up (then it proposes nothing)."""
        assert s.draft is not None
        if s.seq in full or not self._proposals(s):
            return True
        return s.draft.behind(s.seq, s.tokens) <= SMALL_BATCH

    def _proposals(self, s: _Seq) -> int:
        """How many tokens drafted ``s``'s next round asks its draft for: never past
        max_tokens (a round yields at most that many + 1; one reading its prompt first
        samples its first token without the draft); 0: its draft need not catch up."""
        request, job = s.job.request, s.job
        room = request.max_tokens - job.generated - 1 - (s.pending is None)
        return max(0, min(request.num_draft_tokens, room))

    def _spec_round(self, s: _Seq) -> None:
        """One speculative round: the draft proposes up to ``num_draft_tokens`` greedy tokens
        after the pending one, the model evaluates them all in one decode, and its own samples
        are taken row by row while they match the proposals. Every token is sampled from the
        model's row for exactly the prefix it follows, through the same grammar and sampler
        state as without a draft, so the output is the same; the cache cells past the last
        accepted proposal are removed."""
        assert s.draft is not None and s.pending is not None and s.job.draft is not None
        job, stats = s.job, s.job.draft
        k = self._proposals(s)
        pending = s.pending
        proposed = s.draft.propose(s.seq, [*s.tokens, pending], k) if k else []
        start = len(s.tokens)
        self._batch.n_tokens = 0
        for token in [pending, *proposed]:
            self._put(s, token, True)
        with decode_threads(self._ctx.ctx):
            self._decode()
        s.pending = None
        stats.total += len(proposed)
        accepted, done = 0, False
        # The accepted tokens reach the event loop in one wake-up.
        with self.relayed():
            for i in range(len(proposed) + 1):
                token, lp = self._sample(s, i)
                # The stream's last item carries the stats: proposals not judged yet count as
                # ignored before a token that may end the reply is taken, and are judged after.
                stats.ignored += len(proposed) - i
                done = self._accept(job, token, lp)
                if done:
                    break
                stats.ignored -= len(proposed) - i
                if i == len(proposed):
                    s.pending = token
                    break
                if token != proposed[i]:
                    stats.rejected += len(proposed) - i
                    s.pending = token
                    break
                accepted += 1
                stats.accepted += 1
        keep = start + 1 + accepted
        if keep < len(s.tokens):
            llama_cpp.llama_memory_seq_rm(self._mem, s.seq, keep - s.pos_shift, -1)
            del s.tokens[keep:]
        if done:
            s.pending = None
            self._finish_seq(s)
