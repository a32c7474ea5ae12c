"""Serving benchmark: mlxserve against mlx_lm.server and llama-cpp-python's server.

Starts every server itself on loopback ports with a generated benchmark-sized Qwen2 model
(MLX folder and GGUF file, same weights), drives them with concurrent streaming clients,
prints a table and writes JSON. Each comparison alternates the servers' order round by round
after a warm-up, and reports medians. See docs/benchmarks.md for what each figure means.

    .venv/bin/python scripts/bench.py --quick          # a couple of minutes
    .venv/bin/python scripts/bench.py --formats mlx    # the full run, one format at a time
    .venv/bin/python scripts/bench.py --agent-replay   # prompt cache on an agent session
    .venv/bin/python scripts/bench.py --rss --formats gguf  # peak RSS ÷ in process alone
    .venv/bin/python scripts/bench.py --model KEY      # any model the server lists

``--model`` runs the same figures on real weights (the models directory, LM Studio's folder,
the Hugging Face cache), side by side with the peer servers on the same files. The agent
replay lives in scripts/bench_replay.py, the servers and models in scripts/bench_common.py,
the in-process baselines in scripts/bench_inproc.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import httpx
from bench_common import (
    REPO,
    SIZES,
    WINDOW_PER_SEQUENCE,
    Server,
    fmt_table,
    machine,
    our_server,
    ours_alone,
    peak_rss,
    peer_servers,
    print_timings,
    process_cpu,
    prompt_cache_held,
    stream_once,
    targets,
    timed,
    unique_prompt,
)
from bench_inproc import inproc_gguf, inproc_mlx, inproc_peak_rss, ttft_added
from bench_speculative import make_pairs, speculative


@dataclass(frozen=True)
class Mode:
    size: str
    rounds: int
    out_tokens: int
    concurrency: tuple[int, ...]
    history_tokens: int  # second-turn and admission figures
    # The logprobs and 8-bit KV-cache figures (always in --engine-features).
    engine_features: bool = True


QUICK = Mode("quick", rounds=1, out_tokens=24, concurrency=(1, 4, 8), history_tokens=768)
FULL = Mode(
    "full",
    rounds=3,
    out_tokens=64,
    concurrency=(1, 4, 8),
    history_tokens=4096,
    engine_features=False,
)
# mlx's CPU backend decodes the full model at a few tokens/s: a step is almost all the f32
# 152k-vocabulary output projection (≈0.7 s of a ≈0.73 s step, profiled under load), so
# 64 tokens per stream put its full run past 30 minutes. 16 still time 15 steps per stream.
FULL_MLX_OUT_TOKENS = 16
# Its prefill is ≈180 ms a token there: the second-turn figure's three cold 4k histories and
# the admission prompt took ≈330 s + 140 s of the 17.8-minute run. 2048 tokens is still four
# 512-token prefill chunks (the admission gap is one chunk per step) and a cold prefill 250×
# a warm one's single new chunk.
FULL_MLX_HISTORY_TOKENS = 2048


def format_mode(mode: Mode, fmt: str) -> Mode:
    """The mode a format runs in: the full run decodes fewer tokens per stream and sends
    shorter histories on MLX."""
    if mode.size == "full" and fmt == "mlx":
        return replace(mode, out_tokens=FULL_MLX_OUT_TOKENS, history_tokens=FULL_MLX_HISTORY_TOKENS)
    return mode


# ---------------------------------------------------------------- one streamed request


async def concurrent(server: Server, n: int, out_tokens: int, tag: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        streams = await asyncio.gather(
            *(
                stream_once(client, server, unique_prompt(f"{tag}{i}", 64), out_tokens)
                for i in range(n)
            )
        )
        t1 = time.perf_counter()
    rates = [s.decode_tps for s in streams if s.decode_tps > 0]
    return {
        "aggregate_tps": sum(s.tokens for s in streams) / (t1 - t0),
        "decode_tps": statistics.median(rates) if rates else 0.0,
        "ttft_p50": statistics.median(s.ttft for s in streams),
        "fairness": max(rates) / min(rates) if rates else 0.0,
    }


async def loaded_context(server: Server) -> int:
    """The context length our server loaded its current model with."""
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        loaded = (await client.get("/api/v1/models/loaded")).json()["instances"]
    return int(next(i["context_length"] for i in loaded if i["id"] == server.model))


# ---------------------------------------------------------------- figures


def median_of(rounds: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


async def alternate(
    servers: list[Server], n: int, mode: Mode, tag: str
) -> tuple[dict[str, dict[str, float]], dict[str, list[float]]]:
    """Warm-up, then ``mode.rounds`` rounds alternating the servers' order: each server's
    medians, and its aggregate tokens/s round by round."""
    results: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
    for s in servers:
        await concurrent(s, n, 4, f"warm{tag}")
    for r in range(mode.rounds):
        order = servers if r % 2 == 0 else list(reversed(servers))
        for s in order:
            results[s.name].append(await concurrent(s, n, mode.out_tokens, f"{tag}r{r}"))
    medians = {name: {k: median_of(rs, k) for k in rs[0]} for name, rs in results.items() if rs}
    per_round = {name: [r["aggregate_tps"] for r in rs] for name, rs in results.items()}
    return medians, per_round


def spread(ours: list[float], theirs: list[float]) -> str:
    """Round-by-round ratios of two servers' aggregates (each round ran both, one after the
    other), lowest and highest: how far one round's figure may stray from the median."""
    ratios = [a / b for a, b in zip(ours, theirs, strict=True) if b > 0]
    if len(ratios) < 2:
        return ""
    return f" (rounds {min(ratios):.3f}-{max(ratios):.3f})"


async def second_turn(server: Server, mode: Mode) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=600) as client:
        ratios, cached = [], []
        for r in range(mode.rounds):
            history = unique_prompt(f"hist{r}", mode.history_tokens // 3)
            cold = await stream_once(client, server, history, 8)
            warm = await stream_once(client, server, history + " and the next question", 8)
            ratios.append(warm.ttft / cold.ttft)
            cached.append(warm.cached)
    return {"ratio": statistics.median(ratios), "cached_tokens": statistics.median(cached)}


def _tagged_prompt(tag: str, mode: Mode) -> str:
    # About mode.history_tokens tokens: a word such as "long0w17" is 5 to 6 tokens.
    return " ".join(f"{tag}w{j % 97}" for j in range(mode.history_tokens // 5))


async def admission_gap(
    server: Server,
    mode: Mode,
    arriving: int = 1,
    extra: dict[str, Any] | None = None,
    tag: str = "long",
    to_end: bool = False,
) -> float:
    """Longest gap between tokens of 3 running streams while ``arriving`` long prompts (sent
    together, each with ``extra`` in its body) are admitted, until the last one's first
    token (``to_end``: its last, so that work the request does after its first token, as a
    drafted one's first speculative rounds, is inside). Every word of a long prompt carries
    its ``tag`` (give each call its own): the prompt cache's changed-middle reuse would serve
    a prompt that differs from an earlier one in its first word only. Per token (the streams
    ask for log probabilities: see ``Stream.token_gaps``)."""
    async with httpx.AsyncClient(timeout=600) as client:
        runners = [
            asyncio.create_task(
                stream_once(
                    client,
                    server,
                    unique_prompt(f"run{i}", 32),
                    4 * mode.out_tokens,
                    {"logprobs": 0},
                )
            )
            for i in range(3)
        ]
        await asyncio.sleep(1.0)
        admitted = time.perf_counter()
        longs = await asyncio.gather(
            *(
                stream_once(client, server, _tagged_prompt(f"{tag}{i}", mode), 4, extra)
                for i in range(arriving)
            )
        )
        streams = await asyncio.gather(*runners)
    end = max(s.end if to_end else s.first or s.end for s in longs) + 0.5
    return max((gap for s in streams for gap in s.token_gaps(admitted, end)), default=0.0)


async def chunk_and_step(server: Server, mode: Mode, chunk: int = 512) -> float:
    """The admission gap's bound: on the freshly loaded model (before anything else is in
    its prompt cache), the time to first token of a prompt of one prefill chunk (≈ ``chunk``
    tokens) alone plus one decode step of that stream; median of 3 runs or more."""
    async with httpx.AsyncClient(timeout=600) as client:
        await stream_once(client, server, "warm up", 4)
        bounds = []
        for r in range(max(3, mode.rounds)):
            s = await stream_once(client, server, unique_prompt(f"chunk{r}", chunk // 3), 8)
            bounds.append(s.ttft + (1 / s.decode_tps if s.decode_tps else 0.0))
    return statistics.median(bounds)


# The logprobs figure's pairs (one request with, one without): at least this many, or
# ``--rounds`` if more. One pair's ratio strays by ±10% on a busy machine; the median of many
# alternating pairs does not.
LOGPROBS_MIN_PAIRS = 8


async def logprobs_cost(server: Server, mode: Mode) -> dict[str, float]:
    """Single-stream decode tok/s with ``logprobs: 5`` (five alternatives per token) divided
    by the same without logprobs; and the server's CPU seconds per generated token without ÷
    with (what contention cannot move much: a busy machine delays a stream, it does not make
    it burn more CPU). Pairs of requests, the order alternating from pair to pair (with,
    without; without, with), each request ``4 × out_tokens`` long; medians over the pairs,
    and the lowest and highest pair's ratio beside them (how far one run may stray)."""
    rates: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    pid = server.proc.pid if server.proc is not None else None
    async with httpx.AsyncClient(timeout=600) as client:
        for r in range(max(LOGPROBS_MIN_PAIRS, mode.rounds)):
            for wanted in (r % 2 == 0, r % 2 == 1):
                extra = {"logprobs": 5} if wanted else None
                prompt = unique_prompt(f"lp{r}{int(wanted)}", 64)
                used = process_cpu(pid) if pid else 0.0
                s = await stream_once(client, server, prompt, 4 * mode.out_tokens, extra)
                if pid:
                    cpu[wanted].append((process_cpu(pid) - used) / max(1, s.tokens))
                rates[wanted].append(s.decode_tps)
    pairs = [a / b for a, b in zip(rates[True], rates[False], strict=True) if b > 0]
    figs = {
        "logprobs_5_decode_vs_none": statistics.median(rates[True])
        / statistics.median(rates[False]),
        "logprobs_5_decode_vs_none_lowest_pair": min(pairs),
        "logprobs_5_decode_vs_none_highest_pair": max(pairs),
    }
    if pid:
        figs["logprobs_5_cpu_per_token_none_vs_5"] = statistics.median(
            cpu[False]
        ) / statistics.median(cpu[True])
        figs["logprobs_5_cpu_ms_per_token_none"] = 1000 * statistics.median(cpu[False])
        figs["logprobs_5_cpu_ms_per_token_5"] = 1000 * statistics.median(cpu[True])
    return figs


async def kv_quantization(server: Server, fmt: str, mode: Mode) -> dict[str, float]:
    """An 8-bit KV cache (MLX bits, llama.cpp q8_0) beside the plain one: KV bytes per
    token (the guardrail's KV part per cell of its windows, from /api/v1/models/loaded),
    and aggregate tok/s at 8 streams, the two instances alternating, medians."""
    plain = server.model
    options = (
        {"kv_cache_quantization": 8}
        if fmt == "mlx"
        else {"cache_type_k": "q8_0", "cache_type_v": "q8_0"}
    )
    ident = f"kvq-{fmt}"
    async with httpx.AsyncClient(base_url=server.url, timeout=600) as client:
        r = await client.post(
            "/api/v1/models/load", json={"model": plain, "identifier": ident, **options}
        )
        if r.status_code != 200:
            # A model whose cache cannot be quantized (e.g. a head size of 16 on MLX).
            print(f"{fmt}: no 8-bit KV-cache figures, the load was refused: {r.text[:200]}")
            return {}
        loaded = (await client.get("/api/v1/models/loaded")).json()["instances"]
    per_token = {}
    for i in loaded:
        if i["id"] in (plain, ident):
            # The KV part alone: an instance's memory also counts its prompt cache, runtime
            # and compute, which do not shrink with the cache's bits.
            memory = i["memory"]
            cells = i["context_length"] * memory["kv_windows"]
            per_token[i["id"]] = memory["kv_cache_bytes"] / cells
    rates: dict[str, list[float]] = {plain: [], ident: []}
    try:
        for r_ in range(max(2, mode.rounds)):
            for model in (plain, ident) if r_ % 2 == 0 else (ident, plain):
                server.model = model
                result = await concurrent(server, 8, mode.out_tokens, f"kvq{r_}{model}")
                rates[model].append(result["aggregate_tps"])
    finally:
        server.model = plain
        async with httpx.AsyncClient(base_url=server.url, timeout=600) as client:
            await client.post("/api/v1/models/unload", json={"instance_id": ident})
    return {
        "kv_bytes_per_token_plain": per_token[plain],
        "kv_bytes_per_token_8bit": per_token[ident],
        "kv_8bit_aggregate_8_vs_plain": statistics.median(rates[ident])
        / statistics.median(rates[plain]),
    }


async def admission_beside(root: Path, ours: Server, fmt: str, mode: Mode) -> float:
    """The full run's admission gap. Every other figure of the run is the server's default
    (on GGUF one pool of KV cells for all sequences); this one asks for a ≈4k prompt to be
    admitted beside three running streams, which on the 4096-token bench model needs a window
    per sequence (in one pool it waits for them to end): a GGUF server of its own reserves
    them (``WINDOW_PER_SEQUENCE``, as ``--admission`` does), its model loaded first. As the
    bound is a median of three on a model that has read prompts before, the gap is the
    median of three admissions on a server that has read one such long prompt first (the
    first use of a fresh process's buffers at that size is slower; ``--admission`` too
    measures after its histories). MLX's full run is not long enough for three: one."""
    if fmt != "gguf":
        return await admission_gap(ours, mode)
    home = Path(tempfile.mkdtemp(prefix="mlxserve-bench-"))
    wide = our_server(root, home, ours.model, *WINDOW_PER_SEQUENCE)
    try:
        wide.start(home)
        async with httpx.AsyncClient(timeout=600) as client:
            await stream_once(client, wide, _tagged_prompt("ape", mode), 1)
        gaps = [await admission_gap(wide, mode, tag=tag) for tag in ("long", "cat", "dog")]
        return statistics.median(gaps)
    finally:
        wide.stop()


async def run(args: argparse.Namespace, base_mode: Mode) -> dict[str, Any]:
    root, found = targets(args, base_mode.size)
    home = Path(tempfile.mkdtemp(prefix="mlxserve-bench-"))
    ours = our_server(root, home, next(iter(found.values())).key)
    peers = peer_servers(found)
    servers = [ours] + ([] if args.skip_peers else list(peers.values()))
    timings: dict[str, float] = {}
    results: dict[str, Any] = {"mode": base_mode.size, "machine": machine(), "figures": {}}
    rows: list[tuple[str, str, str]] = []
    try:
        # Inside the try: a server that fails to start must not orphan the ones before it.
        for s in servers:
            s.start(home)
        for fmt in args.formats:
            target = found[fmt]
            ours.model = target.key
            mode = format_mode(base_mode, fmt)
            prompt = unique_prompt("single", 64)
            with timed(timings, f"{fmt} in-process decode"):
                inproc = (inproc_mlx if fmt == "mlx" else inproc_gguf)(
                    target.path, prompt, mode.out_tokens
                )
            peer = peers[fmt]
            side = [ours] + ([peer] if peer in servers else [])
            with timed(timings, f"{fmt} one chunk + one step"):
                bound = await chunk_and_step(ours, mode) * 1000
            by_n: dict[int, dict[str, dict[str, float]]] = {}
            rounds: dict[int, dict[str, list[float]]] = {}
            for n in mode.concurrency:
                held = partial(prompt_cache_held, ours)
                with timed(timings, f"{fmt} {n} streams"), peak_rss(ours, held) as peak:
                    by_n[n], rounds[n] = await alternate(side, n, mode, f"{fmt}{n}")
                by_n[n]["mlxserve"]["peak_rss"] = peak.rss
                by_n[n]["mlxserve"]["peak_rss_prompt_cache"] = peak.beside
            with timed(timings, f"{fmt} time to first token, paired"):
                added = (await ttft_added(ours, fmt, target.path))[0]
            top = max(mode.concurrency)
            one, eight = by_n[1]["mlxserve"], by_n[top]["mlxserve"]
            with timed(timings, f"{fmt} in-process peak RSS"):
                context = await loaded_context(ours)
                rss_inproc = inproc_peak_rss(fmt, target.path, top, mode.out_tokens, context)
            figs = {
                "single_decode_vs_inproc": one["decode_tps"] / inproc[0],
                "ttft_added_ms": added * 1000,
                "aggregate_8_vs_1": eight["aggregate_tps"] / one["aggregate_tps"],
                "fairness_8": eight["fairness"],
                "peak_rss_8_vs_1": eight["peak_rss"] / max(one["peak_rss"], 1),
                "peak_rss_8_vs_inproc": eight["peak_rss"] / rss_inproc,
                # Of that peak, what the prompt cache held beside the windows (GGUF: the
                # earlier phases' requests, parked in host memory when these were admitted).
                "peak_rss_8_prompt_cache_mb": eight["peak_rss_prompt_cache"] / 1e6,
                "peak_rss_8_less_prompt_cache_vs_inproc": (
                    eight["peak_rss"] - eight["peak_rss_prompt_cache"]
                )
                / rss_inproc,
            }
            spreads: dict[str, str] = {}
            if peer in side:
                # The same two figures for the peer server: what serving over HTTP costs any
                # server against the in-process baseline.
                theirs = by_n[1][peer.name]
                figs["peer_single_decode_vs_inproc"] = theirs["decode_tps"] / inproc[0]
                figs["peer_ttft_added_ms"] = (theirs["ttft_p50"] - inproc[1]) * 1000
                for n in mode.concurrency:
                    name = f"vs_{peer.name}_{n}"
                    figs[name] = (
                        by_n[n]["mlxserve"]["aggregate_tps"] / by_n[n][peer.name]["aggregate_tps"]
                    )
                    spreads[name] = spread(rounds[n]["mlxserve"], rounds[n][peer.name])
            with timed(timings, f"{fmt} second turn"):
                turn = await second_turn(ours, mode)
            figs["second_turn_ttft_vs_cold"] = turn["ratio"]
            figs["second_turn_cached_tokens"] = turn["cached_tokens"]
            with timed(timings, f"{fmt} admission gap"):
                figs["admission_max_gap_ms"] = await admission_beside(root, ours, fmt, mode) * 1000
            figs["admission_bound_ms"] = bound
            if mode.engine_features:
                with timed(timings, f"{fmt} logprobs"):
                    figs.update(await logprobs_cost(ours, mode))
                with timed(timings, f"{fmt} 8-bit KV cache"):
                    figs.update(await kv_quantization(ours, fmt, mode))
            results["figures"][fmt] = {
                "figures": figs,
                "raw": by_n,
                "aggregate_tps_by_round": rounds,
                "inproc_decode_tps": inproc[0],
                "inproc_peak_rss": rss_inproc,
                "settings": asdict(mode),
            }
            goals = {
                "single_decode_vs_inproc": ">= 0.97" if fmt == "mlx" else ">= 0.95",
                "ttft_added_ms": "<= 20",
                "peer_single_decode_vs_inproc": "reported",
                "peer_ttft_added_ms": "reported",
                "aggregate_8_vs_1": ">= 3" if fmt == "mlx" else ">= 2",
                "fairness_8": "<= 1.25",
                "peak_rss_8_vs_1": "reported",
                "peak_rss_8_vs_inproc": "<= 1.2",
                "peak_rss_8_prompt_cache_mb": "reported",
                "peak_rss_8_less_prompt_cache_vs_inproc": "reported",
                "second_turn_ttft_vs_cold": "<= 0.10",
                "second_turn_cached_tokens": "> 0",
                "admission_max_gap_ms": "<= admission_bound_ms",
                "admission_bound_ms": "1 chunk + 1 step",
                "logprobs_5_decode_vs_none": ">= 0.95",
                "logprobs_5_cpu_per_token_none_vs_5": "reported",
                "logprobs_5_decode_vs_none_lowest_pair": "reported",
                "logprobs_5_decode_vs_none_highest_pair": "reported",
                "logprobs_5_cpu_ms_per_token_none": "reported",
                "logprobs_5_cpu_ms_per_token_5": "reported",
                "kv_bytes_per_token_plain": "reported",
                "kv_bytes_per_token_8bit": "reported",
                "kv_8bit_aggregate_8_vs_plain": "reported",
            }
            for k, v in figs.items():
                goal = goals.get(k, ">= 1.0" if k.startswith("vs_mlx") else ">= 2 (at 4)")
                rows.append((f"{fmt} {k}", f"{v:.3f}", goal + spreads.get(k, "")))
    finally:
        for s in servers:
            s.stop()
    print(fmt_table(rows))
    print_timings(timings)
    results["timings"] = timings
    return results


def _feature_goal(figure: str) -> str:
    if figure == "logprobs_5_decode_vs_none":
        return ">= 0.95"
    return "> 1" if figure == "draft_high_acceptance_decode_vs_none" else "reported"


async def engine_features(args: argparse.Namespace, mode: Mode) -> dict[str, Any]:
    """Only the engine-feature figures (logprobs cost, 8-bit KV cache), mlxserve alone."""

    async def measure(ours: Server, fmt: str) -> dict[str, float]:
        figs = await logprobs_cost(ours, mode)
        figs.update(await kv_quantization(ours, fmt, mode))
        figs.update(
            await speculative(ours, fmt, mode.out_tokens, mode.rounds, pairs=not args.model)
        )
        return figs

    if not args.model:
        make_pairs(REPO / ".cache" / "bench-models")

    return await ours_alone(args, mode.size, measure, _feature_goal)


async def logprobs_only(args: argparse.Namespace, mode: Mode) -> dict[str, Any]:
    """Only the logprobs figures, mlxserve alone (a minute per format with --quick)."""

    async def measure(ours: Server, fmt: str) -> dict[str, float]:
        return await logprobs_cost(ours, mode)

    return await ours_alone(args, mode.size, measure, _feature_goal)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small model, one round")
    parser.add_argument("--formats", default="mlx,gguf", help="comma-separated: mlx,gguf")
    parser.add_argument("--skip-peers", action="store_true", help="measure mlxserve alone")
    parser.add_argument(
        "--engine-features",
        action="store_true",
        help="only the logprobs and KV-quantization figures (mlxserve alone)",
    )
    parser.add_argument(
        "--logprobs",
        action="store_true",
        help="only the logprobs figures (decode and CPU per token with top_logprobs 5 ÷ none)",
    )
    parser.add_argument(
        "--admission",
        action="store_true",
        help="only the admission gaps: one, a seeded, a drafted and four long prompts "
        "(mlxserve alone)",
    )
    parser.add_argument(
        "--rss",
        action="store_true",
        help="only the peak-RSS figures: our server idle, loaded and at 8 streams, and in "
        "process (mlxserve alone)",
    )
    parser.add_argument(
        "--agent-replay",
        action="store_true",
        help="only the agent replay: prompt-cache hits and prefill time ÷ a cold server",
    )
    parser.add_argument(
        "--replay-size",
        choices=list(SIZES),
        default="tiny",
        help="generated model of the agent replay (default tiny: the test models' size)",
    )
    parser.add_argument("--turns", type=int, default=20, help="agent replay turns")
    parser.add_argument(
        "--model",
        action="append",
        metavar="KEY",
        help="measure this model (any the server lists) instead of the generated one; once "
        "per format, e.g. --model mlx-community/Qwen3-4B-4bit --model qwen/qwen3-4b@Q4_K_M",
    )
    parser.add_argument(
        "--models-dir", type=Path, help="with --model: the models directory to look in"
    )
    parser.add_argument(
        "--concurrency", help="comma-separated stream counts (default 1,4,8); 1 must be one"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="rounds per comparison (default: 3 in the full run, 1 with --quick); the logprobs "
        "figure's pairs (at least 8)",
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / ".cache" / "bench" / "results.json", help="JSON output"
    )
    args = parser.parse_args(argv)
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    mode = QUICK if args.quick else FULL
    if args.concurrency:
        levels = tuple(int(n) for n in args.concurrency.split(","))
        if 1 not in levels:
            parser.error("--concurrency must include 1")
        mode = replace(mode, concurrency=levels)
    if args.rounds:
        mode = replace(mode, rounds=args.rounds)
    started = time.perf_counter()
    if args.agent_replay:
        from bench_replay import agent_replay

        results = asyncio.run(agent_replay(args))
    elif args.logprobs:
        results = asyncio.run(logprobs_only(args, mode))
    elif args.rss:
        from bench_rss import rss_only

        results = asyncio.run(rss_only(args, mode))
    elif args.admission:
        from bench_admission import admission_only

        results = asyncio.run(admission_only(args, mode))
    else:
        results = asyncio.run((engine_features if args.engine_features else run)(args, mode))
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["settings"] = asdict(mode)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out} ({results['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
