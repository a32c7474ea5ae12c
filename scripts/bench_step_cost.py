"""What a GGUF step costs without flash attention, in llama.cpp directly: the fit behind the
engine's prompt-chunk budget (``backends.llamacpp.engine.weight_cells``).

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
"""

from __future__ import annotations

import argparse
import time

import llama_cpp
import numpy as np
from bench_common import fmt_table, raw_gguf

from backends.llamacpp import adapter
from backends.llamacpp.engine import weight_cells

STREAMS = 3
STREAM_CELLS = 160


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="the quick model")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    f32 = llama_cpp.GGML_TYPE_F32
    llm = raw_gguf(args.quick, n_threads=1, n_threads_batch=1, type_k=f32, type_v=f32)
    params = type(llm.context_params).from_buffer_copy(llm.context_params)
    params.n_ctx = 4096 + 512 + STREAMS * (STREAM_CELLS + 1)
    params.n_batch = params.n_ubatch = 512 + STREAMS
    params.n_seq_max = STREAMS + 1
    params.kv_unified = True
    with adapter.quiet():
        ctx = adapter.new_context(llm, params)
    mem = llama_cpp.llama_get_memory(ctx.ctx)
    model = adapter.model_pointer(llm)
    words = llm.tokenize(b"stone cloud music river " * 2000, add_bos=False)
    batch = llama_cpp.llama_batch_init(512 + STREAMS, 0, 1)

    def put(i: int, pos: int, seq: int, logits: bool) -> None:
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = words[pos % len(words)], pos, 1
        batch.seq_id[i][0], batch.logits[i] = seq, logits

    def decode(n: int) -> float:
        batch.n_tokens = n
        used = time.process_time()
        assert llama_cpp.llama_decode(ctx.ctx, batch) == 0
        return time.process_time() - used

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


if __name__ == "__main__":
    main()
