"""The in-process baselines scripts/bench.py compares our server with: the same model's
decode rate and time to first token in this process (mlx-lm, llama-cpp-python), and the peak
resident memory of a fresh bare process generating as many replies
(scripts/bench_inproc_rss.py)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from bench_common import Server, gguf_threads, server_kv_f32, stream_once, unique_prompt

INPROC_RUNS = 3
# Pairs of the server's and the in-process time to first token behind ttft_added_ms.
TTFT_PAIRS = 15


def _rates(times: list[float], t0: float) -> tuple[float, float]:
    return (len(times) - 1) / (times[-1] - times[0]), times[0] - t0


def _medians(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def inproc_mlx(folder: Path, prompt: str, out_tokens: int) -> tuple[float, float]:
    """(decode tok/s, time to first token) of mlx-lm's stream_generate in this process,
    medians of :data:`INPROC_RUNS` runs."""
    from mlx_lm import load, stream_generate

    model, tokenizer = load(str(folder))[:2]
    ids = tokenizer.encode(prompt)
    for _ in stream_generate(model, tokenizer, ids, max_tokens=4):
        pass
    runs = []
    for _ in range(INPROC_RUNS):
        t0 = time.perf_counter()
        times = [
            time.perf_counter()
            for _ in stream_generate(model, tokenizer, ids, max_tokens=out_tokens)
        ]
        runs.append(_rates(times, t0))
    return _medians(runs)


def inproc_gguf(path: Path, prompt: str, out_tokens: int) -> tuple[float, float]:
    """(decode tok/s, time to first token) of llama-cpp-python's Llama.generate, medians of
    :data:`INPROC_RUNS` runs, with mlxserve's thread counts."""
    from llama_cpp import Llama

    threads, threads_batch = gguf_threads()
    llm = Llama(
        str(path), n_ctx=2048, n_threads=threads, n_threads_batch=threads_batch, verbose=False
    )
    ids = llm.tokenize(prompt.encode(), add_bos=False)
    runs = []
    for _ in range(INPROC_RUNS):
        # Llama.generate keeps the prefix it shares with its previous call: without this, runs
        # 2 and 3 would skip the prompt that every request to a server processes cold.
        llm.reset()
        t0 = time.perf_counter()
        times = []
        for _ in llm.generate(ids, temp=0.0, reset=True):
            times.append(time.perf_counter())
            if len(times) >= out_tokens:
                break
        runs.append(_rates(times, t0))
    llm.close()
    return _medians(runs)


def inproc_peak_rss(fmt: str, path: Path, streams: int, out_tokens: int, context: int) -> int:
    """Peak resident bytes of a fresh bare process (scripts/bench_inproc_rss.py) that loads
    the model and generates ``streams`` replies of ``out_tokens`` in process (mlx-lm
    ``batch_generate``; llama-cpp-python one after the other, in one window of the server's
    ``context``, with our server's thread counts and its KV cache type for the model: f32
    for f32 weights, the loader's ``kv_cache_f32``): what our server's peak at as many
    streams is compared with."""
    job: dict[str, Any] = {
        "format": fmt,
        "path": str(path),
        "prompts": [unique_prompt(f"rss{i}", 64) for i in range(streams)],
        "tokens": out_tokens,
        "context": context,
    }
    if fmt == "gguf":
        job["threads"], job["threads_batch"] = gguf_threads()
        job["kv_f32"] = server_kv_f32(path)
    script = Path(__file__).with_name("bench_inproc_rss.py")
    out = subprocess.run(
        [sys.executable, str(script)], input=json.dumps(job), capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(f"the in-process baseline failed: {out.stderr[-2000:]}")
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_rss"])


def _first_token(fmt: str, path: Path) -> tuple[Callable[[str], float], Callable[[], None]]:
    """This process's time to first token of a prompt (the model loaded once), and a close."""
    if fmt == "mlx":
        from mlx_lm import load, stream_generate

        model, tokenizer = load(str(path))[:2]

        def mlx_first(prompt: str) -> float:
            ids = tokenizer.encode(prompt)
            t0 = time.perf_counter()
            next(iter(stream_generate(model, tokenizer, ids, max_tokens=1)))
            return time.perf_counter() - t0

        return mlx_first, lambda: None
    import llama_cpp
    from llama_cpp import Llama

    threads, threads_batch = gguf_threads()
    # The server's KV type: an f16 cache here made the f32 bench model's prompt cheaper in
    # process than on the server, and the difference read as what the server adds.
    kv = llama_cpp.GGML_TYPE_F32 if server_kv_f32(path) else llama_cpp.GGML_TYPE_F16
    llm = Llama(
        str(path),
        n_ctx=2048,
        n_threads=threads,
        n_threads_batch=threads_batch,
        type_k=kv,
        type_v=kv,
        verbose=False,
    )

    def gguf_first(prompt: str) -> float:
        ids = llm.tokenize(prompt.encode(), add_bos=False)
        llm.reset()
        t0 = time.perf_counter()
        tokens = llm.generate(ids, temp=0.0, reset=True)
        next(tokens)
        elapsed = time.perf_counter() - t0
        tokens.close()
        return elapsed

    return gguf_first, llm.close


async def ttft_added(server: Server, fmt: str, path: Path) -> tuple[float, float]:
    """What the server adds to the time to first token: the median over :data:`TTFT_PAIRS`
    pairs of one cold request to the server (a prompt of its own, as the 1-stream rounds
    send) and the same prompt in this process, the order alternating from pair to pair.
    Paired, as this machine's speed drifts by up to half over seconds (a step of one shape
    took 0.2 or 0.35 s in one run): medians taken minutes apart moved by tens of ms. Returns
    (the median difference, the median in-process time), in seconds."""
    first, close = _first_token(fmt, path)
    added, alone = [], []
    try:
        first(unique_prompt("ttft warm", 64))
        async with httpx.AsyncClient(timeout=600) as client:
            for i in range(TTFT_PAIRS):
                prompt = unique_prompt(f"ttft{i}", 64)
                if i % 2:
                    ours = (await stream_once(client, server, prompt, 2)).ttft
                    theirs = first(prompt)
                else:
                    theirs = first(prompt)
                    ours = (await stream_once(client, server, prompt, 2)).ttft
                added.append(ours - theirs)
                alone.append(theirs)
    finally:
        close()
    return statistics.median(added), statistics.median(alone)
