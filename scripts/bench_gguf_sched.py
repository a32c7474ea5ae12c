"""GGUF scheduling figures at the engine level (no HTTP), one table:

- time to first token of a 64-word prompt in process (llama-cpp-python's ``Llama.generate``),
  on our engine with an empty prompt cache, and on our engine whose prompt cache keeps what
  ``scripts/bench.py`` has sent before its TTFT figure (a warm-up and three ≈512-token
  prompts): requests alternate between the three, so load drift hits each alike;
- fairness at 8 streams (parallel 4, arrivals ``--gap`` ms apart as a server's are): the
  default step (one ``llama_decode`` for the streams' tokens and the prompts' chunks) against
  separate decodes (what flash-attention loads do), rounds alternating; and per stream, how
  many decodes holding other requests' prompt chunks fell inside its decode span.

    .venv/bin/python scripts/bench_gguf_sched.py --size quick --rounds 5

The HTTP part of the server's TTFT (request to engine, token to client) is small beside
these: see docs/benchmarks.md, "GGUF scheduling".
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench_common import REPO, SIZES, fmt_table, gguf_threads, make_model, unique_prompt

sys.path.insert(0, str(REPO))

from backends.base import (  # noqa: E402
    Finished,
    GenerationRequest,
    LoadOptions,
    SamplingParams,
    Token,
)
from backends.llamacpp.engine import LlamaCppEngine  # noqa: E402

CONTEXT = 8192  # scripts/bench.py's server context


class _Probe(LlamaCppEngine):
    """The engine with each ``llama_decode`` logged: (held a prompt chunk beside another
    sequence or alone, start, end); ``separate`` decodes each part alone as flash-attention
    loads do."""

    def __init__(self, path: Path, options: LoadOptions, separate: bool) -> None:
        self.separate = separate
        self.decodes: list[tuple[bool, float, float]] = []
        super().__init__(path, options)

    def _load(self) -> Any:
        info = super()._load()
        self._flash = self.separate or self._flash
        return info

    def _decode(self) -> None:
        batch = self._batch
        seqs = {batch.seq_id[i][0] for i in range(batch.n_tokens)}
        prompt = batch.n_tokens > len(seqs)
        t0 = time.perf_counter()
        super()._decode()
        self.decodes.append((prompt, t0, time.perf_counter()))


async def _stream(engine: LlamaCppEngine, prompt: str, n: int, delay: float = 0.0) -> list[float]:
    """Token arrival times of one greedy request (the first is its time to first token
    after ``submit`` when ``delay`` is 0 and the list starts with the submit time)."""
    await asyncio.sleep(delay)
    request = GenerationRequest(
        tuple(engine.tokenize(prompt)), SamplingParams(temperature=0.0), n, frozenset()
    )
    times = [time.perf_counter()]
    async for item in engine.submit(request):
        if isinstance(item, Token):
            times.append(time.perf_counter())
        elif isinstance(item, Finished):
            return times
    raise RuntimeError("the stream ended without Finished")


class _InProcess:
    """llama-cpp-python's ``Llama.generate`` in this process, with the engine's threads: the
    baseline of bench.py's ``ttft_added_ms``."""

    def __init__(self, path: Path) -> None:
        from llama_cpp import Llama

        threads, threads_batch = gguf_threads()
        self.llm = Llama(
            str(path), n_ctx=2048, n_threads=threads, n_threads_batch=threads_batch, verbose=False
        )
        self.ttft("warm up")

    def ttft(self, prompt: str) -> float:
        ids = self.llm.tokenize(prompt.encode(), add_bos=False)
        self.llm.reset()
        t0 = time.perf_counter()
        for _ in self.llm.generate(ids, temp=0.0, reset=True):
            break
        return time.perf_counter() - t0


async def ttft(path: Path, n: int) -> dict[str, float]:
    """Requests alternate between the three, in a rotating order: load that drifts over the
    run hits each alike."""
    inproc = _InProcess(path)
    kept = _Probe(path, LoadOptions(context_length=CONTEXT), separate=False)
    cold = _Probe(path, LoadOptions(context_length=CONTEXT, prompt_cache_bytes=0), False)
    runs: dict[str, list[float]] = {"inproc": [], "kept": [], "cold": []}

    async def engine_ttft(engine: LlamaCppEngine, prompt: str) -> float:
        times = await _stream(engine, prompt, 2)
        return times[1] - times[0]

    try:
        for engine in (kept, cold):
            await _stream(engine, "warm up", 4)
        for r in range(3):
            await _stream(kept, unique_prompt(f"chunk{r}", 512 // 3), 8)
        for i in range(n):
            prompt = unique_prompt(f"ttft{i}", 64)
            order = ["inproc", "kept", "cold"]
            for name in order[i % 3 :] + order[: i % 3]:
                if name == "inproc":
                    runs[name].append(await asyncio.to_thread(inproc.ttft, prompt))
                else:
                    runs[name].append(await engine_ttft(kept if name == "kept" else cold, prompt))
        cells = kept.call(kept._kept_cells).result()
    finally:
        kept.close()
        cold.close()
        inproc.llm.close()
    ms = {k: statistics.median(v) * 1000 for k, v in runs.items()}
    return {
        "ttft_inproc_ms": ms["inproc"],
        "ttft_engine_cold_ms": ms["cold"],
        "ttft_engine_kept_cells_ms": ms["kept"],
        "kept_cells": float(cells),
        "ttft_kept_minus_cold_ms": statistics.median(
            a - b for a, b in zip(runs["kept"], runs["cold"], strict=True)
        )
        * 1000,
    }


async def _fair_round(engine: _Probe, tag: str, out_tokens: int, gap: float) -> dict[str, Any]:
    engine.decodes.clear()
    streams = await asyncio.gather(
        *(_stream(engine, unique_prompt(f"{tag}s{i}", 64), out_tokens, i * gap) for i in range(8))
    )
    rates, inside = [], []
    for times in streams:
        first, last = times[1], times[-1]
        rates.append((len(times) - 2) / (last - first))
        inside.append(sum(1 for p, a, b in engine.decodes if p and b > first and a < last))
    return {"fairness": max(rates) / min(rates), "admissions": inside}


async def fairness(path: Path, rounds: int, out_tokens: int, gap: float) -> dict[str, float]:
    engines = {
        "one": _Probe(path, LoadOptions(context_length=CONTEXT), separate=False),
        "separate": _Probe(path, LoadOptions(context_length=CONTEXT), separate=True),
    }
    got: dict[str, list[dict[str, Any]]] = {k: [] for k in engines}
    try:
        for name, engine in engines.items():
            await _fair_round(engine, f"warm{name}", 4, gap)
        for r in range(rounds):
            names = list(engines) if r % 2 == 0 else list(reversed(engines))
            for name in names:
                got[name].append(await _fair_round(engines[name], f"r{r}", out_tokens, gap))
                print(
                    f"  round {r} {name}: fairness {got[name][-1]['fairness']:.3f}, "
                    f"admission decodes in each stream's span {got[name][-1]['admissions']}"
                )
    finally:
        for engine in engines.values():
            engine.close()
    out: dict[str, float] = {}
    for name, rs in got.items():
        fair = [r["fairness"] for r in rs]
        out[f"fairness_8_{name}_decode"] = statistics.median(fair)
        out[f"fairness_8_{name}_decode_lowest"] = min(fair)
        out[f"fairness_8_{name}_decode_highest"] = max(fair)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size", choices=list(SIZES), default="quick")
    parser.add_argument("--rounds", type=int, default=5, help="fairness rounds per step shape")
    parser.add_argument("--requests", type=int, default=10, help="TTFT requests per engine")
    parser.add_argument("--out-tokens", type=int, default=24, help="tokens per stream")
    parser.add_argument("--gap", type=float, default=3.0, help="ms between arrivals")
    args = parser.parse_args(argv)
    path = make_model(REPO / ".cache" / "bench-models", args.size)["gguf"]
    figs = asyncio.run(ttft(path, args.requests))
    figs |= asyncio.run(fairness(path, args.rounds, args.out_tokens, args.gap / 1000))
    print(fmt_table([(k, f"{v:.3f}", "reported") for k, v in figs.items()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
