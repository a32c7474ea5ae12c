"""What a GGUF step costs without flash attention, in llama.cpp directly: the fit the
engine's prompt-chunk budget (``backends.llamacpp.engine.weight_cells``, ``budget.py``) was
first priced with; its ``SCORE_COST`` is now fitted to the server's own steps on its threads,
where a token's weights cost fewer cells than this one-thread fit finds.

The engine gives a step's prompt chunks beside running streams at most the cost of one
``eval_batch_size`` chunk on an empty context, counting T prompt tokens with C cells in use as
T * (W + C + T): W is a token's weight products in units of one cell's attention. Here three
streams' tokens and a chunk of T tokens whose sequence already holds C cells are decoded
together in a context shaped like the engine's (unified KV, the model's KV type), for a grid
of T and C, on ONE thread and timed in process CPU time (no spin-waits, so a busy machine
moves the figures little; the minimum of ``--rounds``). A least-squares fit
``cpu = a + b * tokens + c * tokens * cells`` gives the measured W (b / c) beside the
engine's estimate.

    .venv/bin/python scripts/bench_step_cost.py            # full model
    .venv/bin/python scripts/bench_step_cost.py --quick    # quick model

``--schedule`` replays instead the engine's steps while a ≈4k prompt is admitted beside three
streams (its chunks from ``tokens_within`` at each share of the budget, ``STEP_SHARE`` and a
whole chunk), on the engine's threads and in wall time, in a context shaped like the
admission bench's (a window per sequence), against the admission bound measured the same way:
one ``eval_batch_size`` chunk alone on an empty context plus one decode step. It reports the
longest and the median step of each share (medians over ``--rounds``) and the prompt's time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import llama_cpp
import numpy as np
from bench_common import bench_gguf, fmt_table, gguf_threads, raw_gguf, server_kv_f32

from backends.llamacpp import adapter
from backends.llamacpp.budget import STEP_SHARE, tokens_within
from backends.llamacpp.engine import cell_costs, weight_cells

STREAMS = 3
STREAM_CELLS = 160


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="the quick model")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--schedule", action="store_true", help="replay an admission's steps")
    parser.add_argument(
        "--engine-threads",
        action="store_true",
        help="the engine's threads and the KV type it gives the model, in wall time",
    )
    args = parser.parse_args()
    if args.schedule:
        schedule(args.quick, args.rounds)
        return
    if args.engine_threads:
        threads, threads_batch = gguf_threads()
        kv_type = _server_kv_type(args.quick)
        clock = time.perf_counter
    else:
        threads = threads_batch = 1
        kv_type = llama_cpp.GGML_TYPE_F32
        clock = time.process_time
    llm = raw_gguf(
        args.quick, n_threads=threads, n_threads_batch=threads_batch, type_k=kv_type, type_v=kv_type
    )
    ctx, mem = _context(llm, 4096 + 512 + STREAMS * (STREAM_CELLS + 1), 512 + STREAMS, STREAMS + 1)
    model = adapter.model_pointer(llm)
    words = llm.tokenize(b"stone cloud music river " * 2000, add_bos=False)
    batch = llama_cpp.llama_batch_init(512 + STREAMS, 0, 1)

    def put(i: int, pos: int, seq: int, logits: bool) -> None:
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = words[pos % len(words)], pos, 1
        batch.seq_id[i][0], batch.logits[i] = seq, logits

    def decode(n: int) -> float:
        batch.n_tokens = n
        used = clock()
        assert llama_cpp.llama_decode(ctx.ctx, batch) == 0
        return clock() - used

    def fill(seq: int, n: int) -> None:
        for at in range(0, n, 512):
            k = min(512, n - at)
            for j in range(k):
                put(j, at + j, seq, False)
            decode(k)

    for s in range(1, STREAMS + 1):
        fill(s, STREAM_CELLS)
    samples: list[tuple[int, int, float]] = []
    for cells in (0, 1024, 2048, 3584):
        llama_cpp.llama_memory_seq_rm(mem, 0, -1, -1)
        fill(0, cells)
        for tokens in (0, 128, 256, 512):
            best = float("inf")
            for _ in range(args.rounds):
                for s in range(1, STREAMS + 1):
                    put(s - 1, STREAM_CELLS, s, True)
                for j in range(tokens):
                    put(STREAMS + j, cells + j, 0, j == tokens - 1)
                best = min(best, decode(STREAMS + tokens))
                llama_cpp.llama_memory_seq_rm(mem, 0, cells, -1)
                for s in range(1, STREAMS + 1):
                    llama_cpp.llama_memory_seq_rm(mem, s, STREAM_CELLS, -1)
            samples.append((tokens, cells, best))
    llama_cpp.llama_batch_free(batch)
    ctx.close()
    t = np.array([s[0] + STREAMS for s in samples], dtype=float)
    kv = np.array([s[1] + s[0] + STREAMS * (STREAM_CELLS + 1) for s in samples], dtype=float)
    cpu = np.array([s[2] * 1000 for s in samples])
    fit = np.linalg.lstsq(np.stack([np.ones_like(t), t, t * kv], 1), cpu, rcond=None)[0]
    n_embd = llama_cpp.llama_model_n_embd(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(adapter.vocab_pointer(llm))
    weights = llama_cpp.llama_model_n_params(model) - n_vocab * n_embd
    n_layer, n_head = llama_cpp.llama_model_n_layer(model), llama_cpp.llama_model_n_head(model)
    llm.close()
    mads = weights // (2 * n_layer * n_embd)
    rows = [
        (f"cpu ms, {tokens} prompt + {STREAMS} stream tokens, {cells} cells", f"{ms:.1f}", "")
        for tokens, cells, ms in ((a, b, c * 1000) for a, b, c in samples)
    ]
    rows += [
        ("fit: ms per decode", f"{fit[0]:.1f}", ""),
        ("fit: ms per token", f"{fit[1]:.4f}", ""),
        ("fit: ms per token and cell", f"{fit[2]:.7f}", ""),
        ("measured W (a token's weights in cells)", f"{fit[1] / fit[2]:.0f}", "the engine's W"),
        ("the engine's W (weight_cells)", f"{weight_cells(weights, n_layer, n_embd, n_head)}", ""),
        ("multiply-adds alone (weights / 2 n_layer n_embd)", f"{mads}", "the estimate before"),
    ]
    print(fmt_table(rows))


def _server_kv_type(quick: bool) -> int:
    """The KV type the server gives the bench model (f32 for its f32 weights)."""
    f32 = server_kv_f32(bench_gguf(quick))
    return llama_cpp.GGML_TYPE_F32 if f32 else llama_cpp.GGML_TYPE_F16


def _context(llm: Any, n_ctx: int, n_batch: int, n_seq: int, n_ubatch: int = 0) -> Any:
    """A context over ``llm``'s model shaped like the engine's (unified KV), and its memory."""
    params = type(llm.context_params).from_buffer_copy(llm.context_params)
    params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_batch, n_ubatch or n_batch
    params.n_seq_max = n_seq
    params.kv_unified = True
    with adapter.quiet():
        ctx = adapter.new_context(llm, params)
    return ctx, llama_cpp.llama_get_memory(ctx.ctx)


def schedule(quick: bool, rounds: int, prompt: int = 4000, batch: int = 512) -> None:
    threads, threads_batch = gguf_threads()
    kv = _server_kv_type(quick)
    llm = raw_gguf(quick, n_threads=threads, n_threads_batch=threads_batch, type_k=kv, type_v=kv)
    ctx, mem = _context(llm, 4 * 4096, 2048 + STREAMS + 1, STREAMS + 2, batch)
    w = cell_costs(llm)[1]
    words = llm.tokenize(b"stone cloud music river " * 2000, add_bos=False)
    b = llama_cpp.llama_batch_init(2048 + STREAMS + 1, 0, 1)

    def put(i: int, pos: int, seq: int, logits: bool) -> None:
        b.token[i], b.pos[i], b.n_seq_id[i] = words[pos % len(words)], pos, 1
        b.seq_id[i][0], b.logits[i] = seq, logits

    def decode(n: int) -> float:
        b.n_tokens = n
        started = time.perf_counter()
        assert llama_cpp.llama_decode(ctx.ctx, b) == 0
        return (time.perf_counter() - started) * 1000

    def admit(share: float) -> list[float]:
        """One admission: each step the streams' tokens and the chunk the engine gives."""
        steps, done, at = [], 0, STREAM_CELLS
        cells = STREAMS * STREAM_CELLS
        while done < prompt:
            budget = share * batch * (w + batch)
            n = max(1, tokens_within(budget, w + cells, min(batch, prompt - done)))
            for s in range(STREAMS):
                put(s, at, s + 1, True)
            for j in range(n):
                put(STREAMS + j, done + j, 0, j == n - 1)
            steps.append(decode(STREAMS + n))
            done, at, cells = done + n, at + 1, cells + n + STREAMS
        llama_cpp.llama_memory_seq_rm(mem, 0, -1, -1)
        for s in range(1, STREAMS + 1):
            llama_cpp.llama_memory_seq_rm(mem, s, STREAM_CELLS, -1)
        return steps

    def bound() -> float:
        seq = STREAMS + 1
        for j in range(batch):
            put(j, j, seq, j == batch - 1)
        chunk = decode(batch)
        put(0, batch, seq, True)
        step = decode(1)
        llama_cpp.llama_memory_seq_rm(mem, seq, -1, -1)
        return chunk + step

    def streams() -> None:
        for s in range(1, STREAMS + 1):
            for j in range(STREAM_CELLS):
                put(j, j, s, False)
            decode(STREAM_CELLS)

    # The first use of a fresh context's buffers is slower: once of each, unmeasured.
    bound()
    streams()
    admit(1.0)
    ways = {"before (a whole chunk)": 1.0, f"now (STEP_SHARE {STEP_SHARE})": STEP_SHARE}
    runs: dict[str, list[list[float]]] = {way: [] for way in ways}
    bounds = []
    for r in range(rounds):
        # The bound on an empty context (as the bench measures it on a freshly loaded
        # model), then each way beside the streams, in turn: the machine's speed drifts.
        llama_cpp.llama_memory_clear(mem, True)
        bounds.append(bound())
        streams()
        for way in ways if r % 2 == 0 else reversed(ways):
            runs[way].append(admit(ways[way]))
    llama_cpp.llama_batch_free(b)
    ctx.close()
    llm.close()
    limit = statistics.median(bounds)
    rows = [
        (f"bound: {batch} tokens alone + one step, ms", f"{limit:.1f}", ""),
        ("W (weight_cells)", f"{w}", ""),
    ]
    for way, steps in runs.items():
        longest = statistics.median(max(s) for s in steps)
        median = statistics.median(x for s in steps for x in s)
        rows += [
            (f"{way}: steps", f"{statistics.median(map(len, steps)):.0f}", ""),
            (f"{way}: longest step / bound", f"{longest / limit:.3f}", "<= 1"),
            (f"{way}: median step / bound", f"{median / limit:.3f}", ""),
            (f"{way}: the prompt, ms", f"{statistics.median(map(sum, steps)):.0f}", ""),
        ]
    print(fmt_table(rows))


if __name__ == "__main__":
    main()
