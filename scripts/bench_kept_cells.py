"""What kept cells cost one GGUF prompt chunk without flash attention, in llama.cpp directly.

llama.cpp scores each micro-batch against every cell up to the highest one in use, so a
sequence kept in the unified KV cache for prefix reuse slows every other sequence's chunks.
On the benchmark model of scripts/bench.py (f16 KV, flash attention off, the engine's thread
counts), one chunk of ``--chunk`` tokens is timed: on an empty cache; as the last chunk of its
own ``--kept``-token prompt; with ``--kept`` cells of another sequence kept; after that
sequence's state is copied out to host memory and its cells freed (what the engine's
host-memory prompt cache does); and after it is copied back. The copies are timed too.
Medians of ``--rounds``.

    .venv/bin/python scripts/bench_kept_cells.py            # full model, 12,288 kept cells
    .venv/bin/python scripts/bench_kept_cells.py --quick    # quick model
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from collections.abc import Callable

import llama_cpp
from bench_common import fmt_table, gguf_threads, raw_gguf

from backends.llamacpp import adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="the quick model")
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--kept", type=int, default=12288)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    threads, threads_batch = gguf_threads()
    llm = raw_gguf(args.quick, n_threads=threads, n_threads_batch=threads_batch)
    params = type(llm.context_params).from_buffer_copy(llm.context_params)
    params.n_ctx = args.kept + 4 * args.chunk
    params.n_batch = params.n_ubatch = args.chunk
    params.n_seq_max = 4
    params.kv_unified = True
    with adapter.quiet():
        ctx = adapter.new_context(llm, params)
    mem = llama_cpp.llama_get_memory(ctx.ctx)
    words = llm.tokenize(b"stone cloud music river " * 1000, add_bos=False)
    batch = llama_cpp.llama_batch_init(args.chunk, 0, 1)

    def chunk(seq: int, start: int) -> float:
        tokens = [words[(start + j) % len(words)] for j in range(args.chunk)]
        for j, token in enumerate(tokens):
            batch.token[j], batch.pos[j], batch.n_seq_id[j] = token, start + j, 1
            batch.seq_id[j][0], batch.logits[j] = seq, j == args.chunk - 1
        batch.n_tokens = args.chunk
        t0 = time.perf_counter()
        assert llama_cpp.llama_decode(ctx.ctx, batch) == 0
        return time.perf_counter() - t0

    def fill(seq: int, n: int) -> None:
        for at in range(0, n, args.chunk):
            chunk(seq, at)

    def clear(seq: int) -> None:
        llama_cpp.llama_memory_seq_rm(mem, seq, -1, -1)

    times: dict[str, list[float]] = {}

    def timed(name: str, fn: Callable[[], float]) -> None:
        times.setdefault(name, []).append(fn())

    state_bytes = 0
    for _ in range(args.rounds):
        timed("chunk, empty cache", lambda: chunk(0, 0))
        clear(0)
        fill(0, args.kept)
        timed(f"last chunk of its own {args.kept}-token prompt", lambda: chunk(0, args.kept))
        clear(0)
        fill(1, args.kept)
        timed(f"chunk, {args.kept} cells of another sequence kept", lambda: chunk(0, 0))
        clear(0)
        t0 = time.perf_counter()
        size = llama_cpp.llama_state_seq_get_size(ctx.ctx, 1)
        buf = (ctypes.c_uint8 * size)()
        state_bytes = llama_cpp.llama_state_seq_get_data(ctx.ctx, buf, size, 1)
        clear(1)
        times.setdefault("copy the kept sequence out, free its cells", []).append(
            time.perf_counter() - t0
        )
        timed("chunk, the kept sequence out of the context", lambda: chunk(0, 0))
        clear(0)
        t0 = time.perf_counter()
        assert llama_cpp.llama_state_seq_set_data(ctx.ctx, buf, state_bytes, 1) > 0
        times.setdefault("copy it back", []).append(time.perf_counter() - t0)
        timed("chunk, the kept sequence back", lambda: chunk(0, 0))
        clear(0)
        clear(1)
    llama_cpp.llama_batch_free(batch)
    ctx.close()
    llm.close()
    rows = [(f"{name} (ms)", f"{statistics.median(v) * 1000:.1f}", "") for name, v in times.items()]
    rows.append(("kept sequence state (MB)", f"{state_bytes / 1e6:.1f}", ""))
    print(fmt_table(rows))


if __name__ == "__main__":
    main()
