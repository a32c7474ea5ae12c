"""Serving benchmark: mlxserve against mlx_lm.server and llama-cpp-python's server.

Starts every server itself on loopback ports with a generated benchmark-sized Qwen2 model
(MLX folder and GGUF file, same weights), drives them with concurrent streaming clients,
prints a table and writes JSON. Each comparison alternates the servers' order round by round
after a warm-up, and reports medians. See docs/benchmarks.md for what each figure means.

    .venv/bin/python scripts/bench.py --quick          # a couple of minutes
    .venv/bin/python scripts/bench.py                  # the full run (<= 15 minutes, 2 cores)
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
PUBLISHER = "mlxserve-bench"
# (hidden, intermediate, layers, heads, kv heads): large enough that the model, not Python,
# dominates a decode step, small enough for a 2-core CPU.
SIZES = {"quick": (256, 704, 4, 4, 2), "full": (512, 1408, 8, 8, 2)}


@dataclass(frozen=True)
class Mode:
    size: str
    rounds: int
    out_tokens: int
    concurrency: tuple[int, ...]
    history_tokens: int  # second-turn and admission figures


QUICK = Mode("quick", rounds=1, out_tokens=24, concurrency=(1, 4, 8), history_tokens=768)
FULL = Mode("full", rounds=3, out_tokens=64, concurrency=(1, 4, 8), history_tokens=4096)


# ---------------------------------------------------------------- models and servers


def make_model(root: Path, size: str) -> dict[str, Path]:
    spec = importlib.util.spec_from_file_location("mtm", REPO / "scripts" / "make_test_models.py")
    assert spec and spec.loader
    mtm: Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mtm)
    mtm.HIDDEN, mtm.INTERMEDIATE, mtm.LAYERS, mtm.HEADS, mtm.KV_HEADS = SIZES[size]
    mtm.CONTEXT = 8192
    return mtm.generate(root, publisher=PUBLISHER, name=f"bench-qwen2-{size}", seed=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    model: str  # the "model" field requests send
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    peak_rss: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_dir: Path) -> None:
        argv = [a.replace("{port}", str(self.port)) for a in self.argv]
        log = open(log_dir / f"{self.name}.log", "wb")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            argv, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {log_dir / self.name}.log")
            try:
                httpx.get(self.url + "/v1/models", timeout=2)
                return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError(f"{self.name} did not start")

    def rss(self) -> int:
        if self.proc is None:
            return 0
        try:
            pages = int(Path(f"/proc/{self.proc.pid}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            return 0
        return pages * os.sysconf("SC_PAGE_SIZE")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@contextmanager
def peak_rss(server: Server) -> Iterator[Callable[[], int]]:
    """Samples the server's resident memory while the block runs; yields the peak getter."""
    peak = [server.rss()]
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], server.rss())

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        yield lambda: peak[0]
    finally:
        stop.set()
        t.join()


# ---------------------------------------------------------------- one streamed request


@dataclass
class Stream:
    start: float
    first: float | None = None
    end: float = 0.0
    times: list[float] = field(default_factory=list)
    tokens: int = 0
    cached: int = 0
    chunks: int = 0

    @property
    def ttft(self) -> float:
        return (self.first or self.end) - self.start

    @property
    def decode_tps(self) -> float:
        # Only tokens streamed after the first chunk count, and a server may hold text back
        # and send several tokens in one chunk (the first among them): the usage count would
        # then credit the span with tokens decoded before it. Chunks after the first are the
        # tokens known to arrive inside the span (exact when each chunk is one token).
        if self.first is None or self.chunks < 2 or self.times[-1] <= self.first:
            return 0.0
        return (self.chunks - 1) / (self.times[-1] - self.first)


async def stream_once(
    client: httpx.AsyncClient,
    server: Server,
    prompt: str,
    max_tokens: int,
    extra: dict[str, Any] | None = None,
) -> Stream:
    body = {
        "model": server.model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(extra or {}),
    }
    s = Stream(time.perf_counter())
    chunks = 0
    async with client.stream("POST", server.url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("choices") and data["choices"][0].get("text"):
                now = time.perf_counter()
                s.first = s.first or now
                s.times.append(now)
                chunks += 1
            usage = data.get("usage")
            if usage:
                s.tokens = usage.get("completion_tokens", 0)
                details = usage.get("prompt_tokens_details") or {}
                s.cached = details.get("cached_tokens") or 0
    s.end = time.perf_counter()
    s.tokens = s.tokens or chunks
    s.chunks = chunks
    return s


def unique_prompt(tag: str, words: int) -> str:
    # A distinct first word per request keeps prompt caches from serving it.
    return f"{tag} " + " ".join(f"w{i % 97}" for i in range(words))


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


# ---------------------------------------------------------------- in-process baselines


INPROC_RUNS = 3


def gguf_threads() -> tuple[int, int]:
    """The decode and prompt threads mlxserve's GGUF engine uses: every GGUF figure (ours, the
    in-process baseline, llama_cpp.server) runs with the same, or the comparison measures the
    thread count."""
    from backends.llamacpp.engine import _threads

    return _threads()


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
        t0 = time.perf_counter()
        times = []
        for _ in llm.generate(ids, temp=0.0, reset=True):
            times.append(time.perf_counter())
            if len(times) >= out_tokens:
                break
        runs.append(_rates(times, t0))
    llm.close()
    return _medians(runs)


# ---------------------------------------------------------------- figures


def median_of(rounds: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


async def alternate(
    servers: list[Server], n: int, mode: Mode, tag: str
) -> dict[str, dict[str, float]]:
    """Warm-up, then ``mode.rounds`` rounds alternating the servers' order; medians."""
    results: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
    for s in servers:
        await concurrent(s, n, 4, f"warm{tag}")
    for r in range(mode.rounds):
        order = servers if r % 2 == 0 else list(reversed(servers))
        for s in order:
            results[s.name].append(await concurrent(s, n, mode.out_tokens, f"{tag}r{r}"))
    return {name: {k: median_of(rs, k) for k in rs[0]} for name, rs in results.items() if rs}


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


async def admission_gap(server: Server, mode: Mode) -> float:
    """Longest gap between tokens of 3 running streams while a long prompt is admitted."""
    async with httpx.AsyncClient(timeout=600) as client:
        runners = [
            asyncio.create_task(
                stream_once(client, server, unique_prompt(f"run{i}", 32), 4 * mode.out_tokens)
            )
            for i in range(3)
        ]
        await asyncio.sleep(1.0)
        admitted = time.perf_counter()
        long = await stream_once(client, server, unique_prompt("long", mode.history_tokens // 3), 4)
        streams = await asyncio.gather(*runners)
    window = (admitted, long.first or long.end)
    gaps = []
    for s in streams:
        inside = [t for t in s.times if window[0] <= t <= window[1] + 0.5]
        gaps += [b - a for a, b in zip(inside, inside[1:], strict=False)]
    return max(gaps, default=0.0)


async def logprobs_cost(server: Server, mode: Mode) -> float:
    """Single-stream decode tok/s with ``logprobs: 5`` (five alternatives per token) divided
    by the same without logprobs; the two alternate, medians of several runs each."""
    rates: dict[bool, list[float]] = {False: [], True: []}
    async with httpx.AsyncClient(timeout=600) as client:
        for r in range(max(3, 2 * mode.rounds)):
            for wanted in (r % 2 == 0, r % 2 == 1):
                extra = {"logprobs": 5} if wanted else None
                prompt = unique_prompt(f"lp{r}{int(wanted)}", 64)
                s = await stream_once(client, server, prompt, 2 * mode.out_tokens, extra)
                rates[wanted].append(s.decode_tps)
    return statistics.median(rates[True]) / statistics.median(rates[False])


async def kv_quantization(server: Server, fmt: str, mode: Mode) -> dict[str, float]:
    """An 8-bit KV cache (MLX bits, llama.cpp q8_0) beside the plain one: KV bytes per
    token (the guardrail's count, from /api/v1/models/loaded), and aggregate tok/s at 8
    streams, the two instances alternating, medians."""
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
        r.raise_for_status()
        loaded = (await client.get("/api/v1/models/loaded")).json()["instances"]
    per_token = {}
    for i in loaded:
        if i["id"] in (plain, ident):
            per_token[i["id"]] = (i["memory_bytes"] - i["size_bytes"]) / i["context_length"]
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


async def speculative(server: Server, mode: Mode) -> dict[str, float]:
    """The model drafting for itself (acceptance 100%): one stream's decode tok/s with
    the draft ÷ without; and a non-drafted stream's decode tok/s beside a drafted one ÷
    alone (the cost a drafted request puts on the batch). Alternating, medians."""
    n = 2 * mode.out_tokens
    draft = {"draft_model": server.model, "num_draft_tokens": 4}
    rates: dict[str, list[float]] = {"plain": [], "draft": [], "alone": [], "beside": []}
    async with httpx.AsyncClient(timeout=600) as client:
        for r in range(max(3, 2 * mode.rounds)):
            for drafted in (r % 2 == 0, r % 2 == 1):
                prompt = unique_prompt(f"sd{r}{int(drafted)}", 64)
                s = await stream_once(client, server, prompt, n, draft if drafted else None)
                rates["draft" if drafted else "plain"].append(s.decode_tps)
            alone = await stream_once(client, server, unique_prompt(f"sa{r}", 64), n)
            rates["alone"].append(alone.decode_tps)
            _, beside = await asyncio.gather(
                stream_once(client, server, unique_prompt(f"sx{r}", 64), 2 * n, draft),
                stream_once(client, server, unique_prompt(f"sb{r}", 64), n),
            )
            rates["beside"].append(beside.decode_tps)
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "draft_self_decode_vs_none": med["draft"] / med["plain"],
        "plain_stream_beside_drafted_vs_alone": med["beside"] / med["alone"],
    }


def fmt_table(rows: list[tuple[str, str, str]]) -> str:
    width = max(len(r[0]) for r in rows)
    lines = [f"{'figure':<{width}}  {'value':>12}  goal", "-" * (width + 30)]
    lines += [f"{a:<{width}}  {b:>12}  {c}" for a, b, c in rows]
    return "\n".join(lines)


async def run(args: argparse.Namespace, mode: Mode) -> dict[str, Any]:
    root = REPO / ".cache" / "bench-models"
    paths = make_model(root, mode.size)
    home = Path(tempfile.mkdtemp(prefix="mlxserve-bench-"))
    py = sys.executable
    key = f"{PUBLISHER}/bench-qwen2-{mode.size}"
    threads, threads_batch = gguf_threads()
    ours = Server(
        "mlxserve",
        f"{key}-mlx",
        [
            py,
            "-m",
            "mlxserve",
            "serve",
            "--port",
            "{port}",
            "--models-dir",
            str(root),
            "--no-auto-evict",
        ],
        {"MLXSERVE_HOME": str(home), "MLXSERVE_DEFAULT_CONTEXT_LENGTH": "8192"},
    )
    peers = {
        "mlx_lm.server": Server(
            "mlx_lm.server",
            str(paths["mlx"]),
            [py, "-m", "mlx_lm.server", "--model", str(paths["mlx"]), "--port", "{port}"],
        ),
        "llama_cpp.server": Server(
            "llama_cpp.server",
            str(paths["gguf"]),
            [
                py,
                "-m",
                "llama_cpp.server",
                "--model",
                str(paths["gguf"]),
                "--port",
                "{port}",
                "--n_ctx",
                "8192",
                # Its default aborts the running stream whenever another request arrives.
                "--interrupt_requests",
                "False",
                "--n_threads",
                str(threads),
                "--n_threads_batch",
                str(threads_batch),
            ],
        ),
    }
    servers = [ours] + ([] if args.skip_peers else list(peers.values()))
    results: dict[str, Any] = {"mode": mode.size, "machine": machine(), "figures": {}}
    rows: list[tuple[str, str, str]] = []
    try:
        # Inside the try: a server that fails to start must not orphan the ones before it.
        for s in servers:
            s.start(home)
        for fmt in args.formats:
            ours.model = f"{key}-{fmt}"
            prompt = unique_prompt("single", 64)
            inproc = (inproc_mlx if fmt == "mlx" else inproc_gguf)(
                paths[fmt], prompt, mode.out_tokens
            )
            peer = peers["mlx_lm.server" if fmt == "mlx" else "llama_cpp.server"]
            side = [ours] + ([peer] if peer in servers else [])
            by_n: dict[int, dict[str, dict[str, float]]] = {}
            for n in mode.concurrency:
                with peak_rss(ours) as peak:
                    by_n[n] = await alternate(side, n, mode, f"{fmt}{n}")
                by_n[n]["mlxserve"]["peak_rss"] = peak()
            one, eight = by_n[1]["mlxserve"], by_n[max(mode.concurrency)]["mlxserve"]
            figs = {
                "single_decode_vs_inproc": one["decode_tps"] / inproc[0],
                "ttft_added_ms": (one["ttft_p50"] - inproc[1]) * 1000,
                "aggregate_8_vs_1": eight["aggregate_tps"] / one["aggregate_tps"],
                "fairness_8": eight["fairness"],
                "peak_rss_8_vs_1": eight["peak_rss"] / max(one["peak_rss"], 1),
            }
            if peer in side:
                for n in mode.concurrency:
                    figs[f"vs_{peer.name}_{n}"] = (
                        by_n[n]["mlxserve"]["aggregate_tps"] / by_n[n][peer.name]["aggregate_tps"]
                    )
            turn = await second_turn(ours, mode)
            figs["second_turn_ttft_vs_cold"] = turn["ratio"]
            figs["second_turn_cached_tokens"] = turn["cached_tokens"]
            figs["admission_max_gap_ms"] = await admission_gap(ours, mode) * 1000
            figs["logprobs_5_decode_vs_none"] = await logprobs_cost(ours, mode)
            figs.update(await kv_quantization(ours, fmt, mode))
            results["figures"][fmt] = {"figures": figs, "raw": by_n, "inproc_decode_tps": inproc[0]}
            goals = {
                "single_decode_vs_inproc": ">= 0.97" if fmt == "mlx" else ">= 0.95",
                "ttft_added_ms": "<= 20",
                "aggregate_8_vs_1": ">= 3" if fmt == "mlx" else ">= 2",
                "fairness_8": "<= 1.25",
                "peak_rss_8_vs_1": "reported",
                "second_turn_ttft_vs_cold": "<= 0.10",
                "second_turn_cached_tokens": "> 0",
                "admission_max_gap_ms": "<= 1 chunk + 1 step",
                "logprobs_5_decode_vs_none": ">= 0.95",
                "kv_bytes_per_token_plain": "reported",
                "kv_bytes_per_token_8bit": "reported",
                "kv_8bit_aggregate_8_vs_plain": "reported",
            }
            for k, v in figs.items():
                goal = goals.get(k, ">= 1.0" if k.startswith("vs_mlx") else ">= 2 (at 4)")
                rows.append((f"{fmt} {k}", f"{v:.3f}", goal))
    finally:
        for s in servers:
            s.stop()
    print(fmt_table(rows))
    return results


async def engine_features(args: argparse.Namespace, mode: Mode) -> dict[str, Any]:
    """Only the engine-feature figures (logprobs cost, 8-bit KV cache), mlxserve alone."""
    root = REPO / ".cache" / "bench-models"
    make_model(root, mode.size)
    home = Path(tempfile.mkdtemp(prefix="mlxserve-bench-"))
    key = f"{PUBLISHER}/bench-qwen2-{mode.size}"
    argv = [sys.executable, "-m", "mlxserve", "serve", "--port", "{port}"]
    argv += ["--models-dir", str(root), "--no-auto-evict"]
    env = {"MLXSERVE_HOME": str(home), "MLXSERVE_DEFAULT_CONTEXT_LENGTH": "8192"}
    ours = Server("mlxserve", f"{key}-mlx", argv, env)
    results: dict[str, Any] = {"mode": mode.size, "machine": machine(), "figures": {}}
    rows: list[tuple[str, str, str]] = []
    try:
        ours.start(home)
        for fmt in args.formats:
            ours.model = f"{key}-{fmt}"
            # Warm-up: the first request loads the model.
            async with httpx.AsyncClient(timeout=600) as client:
                await stream_once(client, ours, "warm up", 4)
            figs = {"logprobs_5_decode_vs_none": await logprobs_cost(ours, mode)}
            figs.update(await kv_quantization(ours, fmt, mode))
            figs.update(await speculative(ours, mode))
            results["figures"][fmt] = figs
            for k, v in figs.items():
                rows.append(
                    (f"{fmt} {k}", f"{v:.3f}", ">= 0.95" if "logprobs" in k else "reported")
                )
    finally:
        ours.stop()
    print(fmt_table(rows))
    return results


def machine() -> dict[str, Any]:
    import importlib.metadata as md

    versions = {p: md.version(p) for p in ("mlx", "mlx-lm", "llama-cpp-python")}
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        **versions,
    }


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
        "--out", type=Path, default=REPO / ".cache" / "bench" / "results.json", help="JSON output"
    )
    args = parser.parse_args(argv)
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    mode = QUICK if args.quick else FULL
    started = time.perf_counter()
    results = asyncio.run((engine_features if args.engine_features else run)(args, mode))
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["settings"] = asdict(mode)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out} ({results['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
