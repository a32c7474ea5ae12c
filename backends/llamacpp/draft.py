"""The draft lane of GGUF speculative decoding: a draft model in its own llama.cpp context
that proposes greedy continuations, one llama.cpp sequence per drafted request."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import Llama

from backends.base import common_prefix
from backends.llamacpp import adapter
from backends.llamacpp.budget import tokens_within

# Batches of at most this many tokens are decode-sized (a speculative round): evaluated on the
# decode threads. Longer ones (a draft's first prompt) are prompt processing.
SMALL_BATCH = 32


@contextmanager
def decode_threads(ctx: Any) -> Iterator[None]:
    """Within it, ``ctx`` evaluates every batch on its decode threads. llama.cpp takes its
    prompt-processing thread count (every core) for any batch of more than one token, so a
    speculative round of a few tokens woke every core, and with one core busy elsewhere its
    spin-waiting threads stalled each other: drafted decoding ran 5-40x slower than with
    the decode threads (measured on 2 loaded cores, see docs/benchmarks.md)."""
    threads, threads_batch = llama_cpp.llama_n_threads(ctx), llama_cpp.llama_n_threads_batch(ctx)
    llama_cpp.llama_set_n_threads(ctx, threads, threads)
    try:
        yield
    finally:
        llama_cpp.llama_set_n_threads(ctx, threads, threads_batch)


class _Full(RuntimeError):
    """The draft's context has no free cells for a batch (its pool is as large as the model's,
    which preempts its own sequences; the draft's held proposals can outgrow it, and so can
    sequences that share a prefix in the model's cells, each holding its own copy here).
    ``done``: the tokens evaluated before it."""

    def __init__(self, done: int) -> None:
        super().__init__(f"no room after {done} tokens")
        self.done = done


def _vocabulary(llm: Llama) -> list[bytes]:
    vocab = adapter.vocab_pointer(llm)
    return [llama_cpp.llama_vocab_get_text(vocab, t) or b"" for t in range(llm.n_vocab())]


class DraftModel:
    """A draft model for one GGUF engine. Its context mirrors the engine's: unified KV, as
    many sequences, ``cells`` cells. Each drafted request keeps its tokens in the draft
    sequence of the same id, so only what changed since its last round is evaluated. A
    request's prompt reaches the draft a chunk per owner-thread step (``catch_up``), priced in
    the model's step budget; a speculative round evaluates at most ``SMALL_BATCH`` tokens of
    context beside its proposals.

    ``costs`` gives a loaded model's multiply-adds per cell in use and its weight_cells (see
    backends.llamacpp.engine.cell_costs)."""

    def __init__(
        self,
        path: Path,
        main: Llama,
        n_seq: int,
        cells: int,
        n_batch: int,
        costs: Callable[[Llama], tuple[int, int]],
    ) -> None:
        self._llm = Llama(
            model_path=str(path),
            n_ctx=256,
            n_batch=64,
            n_gpu_layers=-1,
            n_threads=main.n_threads,
            n_threads_batch=main.n_threads_batch,
            verbose=False,
        )
        try:
            if _vocabulary(self._llm) != _vocabulary(main):
                raise ValueError("its vocabulary differs")
            params = type(self._llm.context_params).from_buffer_copy(self._llm.context_params)
            params.n_ctx = cells
            params.n_batch = n_batch
            params.n_ubatch = min(n_batch, 512)
            params.n_seq_max = n_seq
            params.kv_unified = True
            with adapter.quiet():
                self._ctx = adapter.new_context(self._llm, params)
            cell, self._weight_cells = costs(self._llm)
            # What one of its cells costs a token, in the model's cells (the budget's unit).
            self._price = cell / costs(main)[0]
        except BaseException:
            self._llm.close()
            raise
        self._n_batch = n_batch
        self._mem = llama_cpp.llama_get_memory(self._ctx.ctx)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._n_vocab = self._llm.n_vocab()
        # The tokens each draft sequence holds in the draft's KV cache.
        self._held: dict[int, list[int]] = {}

    def _decode(self, seq: int, tokens: list[int], start: int, logits: bool = True) -> None:
        """Evaluate ``tokens`` at positions from ``start``; logits for the last one only (with
        ``logits``)."""
        batch = self._batch
        for at in range(0, len(tokens), self._n_batch):
            chunk = tokens[at : at + self._n_batch]
            batch.n_tokens = len(chunk)
            for i, token in enumerate(chunk):
                batch.token[i] = token
                batch.pos[i] = start + at + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = logits and at + i == len(tokens) - 1
            if len(chunk) <= SMALL_BATCH:
                with decode_threads(self._ctx.ctx):
                    rc = llama_cpp.llama_decode(self._ctx.ctx, batch)
            else:
                rc = llama_cpp.llama_decode(self._ctx.ctx, batch)
            if rc == 1:
                raise _Full(at)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc} on the draft model")

    def _argmax(self) -> int:
        row = llama_cpp.llama_get_logits_ith(self._ctx.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(row, shape=(self._n_vocab,))))

    def _trim(self, seq: int, context: list[int], limit: int) -> list[int]:
        """``seq``'s held tokens cut to the prefix (at most ``limit``) they share with
        ``context``; the cells past it removed."""
        held = self._held.setdefault(seq, [])
        keep = common_prefix(held, context, limit)
        if keep < len(held):
            llama_cpp.llama_memory_seq_rm(self._mem, seq, keep, -1)
            del held[keep:]
        return held

    def behind(self, seq: int, tokens: list[int]) -> int:
        """How many of ``tokens`` (a request's tokens in the model's cache) the draft's cache
        of ``seq`` lacks."""
        held = self._held.get(seq, [])
        n = min(len(held), len(tokens))
        if held[:n] == tokens[:n]:
            return len(tokens) - n
        return len(tokens) - common_prefix(held, tokens, n)

    def chunk_tokens(self, budget: float, want: int) -> int:
        """How many of ``want`` tokens the draft evaluates within ``budget`` (the model's cell
        units, see backends.llamacpp.budget), its cells in use as they are now."""
        base = self._weight_cells + self._in_use()
        return tokens_within(budget / self._price, base, want)

    def cost(self, n: int) -> float:
        """What ``n`` tokens cost the draft now, in the model's cell units."""
        return self._price * n * (self._weight_cells + self._in_use() + n)

    def _in_use(self) -> int:
        return sum(map(len, self._held.values()))

    def catch_up(self, seq: int, tokens: list[int], n: int) -> tuple[int, float]:
        """Evaluate the next at most ``n`` of ``tokens`` the draft's ``seq`` lacks (a prompt
        chunk the model took, a prompt read from the prompt cache, a resumed request): how
        many it evaluated, fewer when its context had no room (what was evaluated stays), and
        what they cost (see ``cost``)."""
        held = self._trim(seq, tokens, len(tokens))
        todo = tokens[len(held) : len(held) + n]
        done = len(todo)
        try:
            self._decode(seq, todo, len(held), logits=False)
        except _Full as full:
            done = full.done
        # Priced as they were evaluated, before their own cells joined the ones in use.
        price = self.cost(done)
        held.extend(todo[:done])
        return done, price

    def propose(self, seq: int, context: list[int], k: int) -> list[int]:
        """The draft's ``k`` greedy tokens after ``context`` (the request's tokens so far).
        The draft's cache keeps the prefix it shares with the last context, the rest goes.
        Fewer (none) when its context has no room, or when it lacks more than ``SMALL_BATCH``
        tokens of the context (``catch_up`` evaluates those a chunk per step): proposals never
        change the output."""
        held = self._trim(seq, context, len(context) - 1)
        keep = len(held)
        if len(context) - keep > SMALL_BATCH + 1:
            return []
        try:
            self._decode(seq, context[keep:], keep)
        except _Full as full:
            # What was evaluated stays: the next round goes on from there, not from the start.
            held.extend(context[keep : keep + full.done])
            return []
        held.extend(context[keep:])
        proposed = [self._argmax()]
        while len(proposed) < k:
            try:
                self._decode(seq, proposed[-1:], len(held))
            except _Full:
                break
            held.append(proposed[-1])
            proposed.append(self._argmax())
        return proposed

    def drop(self, seq: int) -> None:
        if self._held.pop(seq, None) is not None:
            llama_cpp.llama_memory_seq_rm(self._mem, seq, -1, -1)

    def close(self) -> None:
        llama_cpp.llama_batch_free(self._batch)
        self._ctx.close()
        self._llm.close()
