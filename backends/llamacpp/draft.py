"""The draft lane of GGUF speculative decoding: a draft model in its own llama.cpp context
that proposes greedy continuations, one llama.cpp sequence per drafted request."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import Llama

from backends.base import common_prefix
from backends.llamacpp import adapter

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
    sequence of the same id, so only what changed since its last round is evaluated."""

    def __init__(self, path: Path, main: Llama, n_seq: int, cells: int, n_batch: int) -> None:
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
        except BaseException:
            self._llm.close()
            raise
        self._n_batch = n_batch
        self._mem = llama_cpp.llama_get_memory(self._ctx.ctx)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._n_vocab = self._llm.n_vocab()
        # The tokens each draft sequence holds in the draft's KV cache.
        self._held: dict[int, list[int]] = {}

    def _decode(self, seq: int, tokens: list[int], start: int) -> None:
        """Evaluate ``tokens`` at positions from ``start``; logits for the last one only."""
        batch = self._batch
        for at in range(0, len(tokens), self._n_batch):
            chunk = tokens[at : at + self._n_batch]
            batch.n_tokens = len(chunk)
            for i, token in enumerate(chunk):
                batch.token[i] = token
                batch.pos[i] = start + at + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = at + i == len(tokens) - 1
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

    def propose(self, seq: int, context: list[int], k: int) -> list[int]:
        """The draft's ``k`` greedy tokens after ``context`` (the request's tokens so far).
        The draft's cache keeps the prefix it shares with the last context, the rest goes.
        Fewer (none) when its context has no room: proposals never change the output."""
        held = self._held.setdefault(seq, [])
        keep = common_prefix(held, context, len(context) - 1)
        if keep < len(held):
            llama_cpp.llama_memory_seq_rm(self._mem, seq, keep, -1)
            del held[keep:]
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
