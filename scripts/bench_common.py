"""What scripts/bench.py and scripts/bench_replay.py share: the generated benchmark models
and the models named with ``--model``, the servers (ours and the peers) and their memory,
one streamed request, timing of each part of a run, and the table."""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from script_loader import load_script

REPO = Path(__file__).resolve().parents[1]
PUBLISHER = "mlxserve-bench"
# (hidden, intermediate, layers, heads, kv heads): large enough that the model, not Python,
# dominates a decode step, small enough for a 2-core CPU.
SIZES = {"tiny": (64, 128, 2, 4, 2), "quick": (256, 704, 4, 4, 2), "full": (512, 1408, 8, 8, 2)}


def model_name(size: str, context: int | None = None) -> str:
    return f"bench-qwen2-{size}" + (f"-{context // 1024}k" if context else "")


def make_model(root: Path, size: str, context: int | None = None) -> dict[str, Path]:
    """The generated benchmark model of ``size`` (MLX folder and GGUF file, same weights);
    ``context``: the context length it declares, in a folder of its own."""
    mtm = load_script("make_test_models")
    mtm.HIDDEN, mtm.INTERMEDIATE, mtm.LAYERS, mtm.HEADS, mtm.KV_HEADS = SIZES[size]
    extra = {"context": context} if context else {}
    return mtm.generate(root, publisher=PUBLISHER, name=model_name(size, context), seed=0, **extra)


@dataclass(frozen=True)
class Target:
    """A model every server of a comparison serves: our key for it and its weights (the MLX
    folder or the GGUF file), which the peers load directly."""

    key: str
    path: Path


def targets(
    args: argparse.Namespace, size: str, context: int | None = None
) -> tuple[Path, dict[str, Target]]:
    """The models directory our server reads, and the model to measure per format: the
    generated benchmark model, or with ``--model`` the models named (any the server lists:
    its models directory, LM Studio's folder, the Hugging Face cache), one per format."""
    if not args.model:
        root = REPO / ".cache" / "bench-models"
        paths = make_model(root, size, context)
        key = f"{PUBLISHER}/{model_name(size, context)}"
        return root, {f: Target(f"{key}-{f}", paths[f]) for f in args.formats}
    from mlxserve.core.registry import Registry
    from mlxserve.core.sources import external_sources
    from mlxserve.settings import Settings

    settings = Settings(**({"models_dir": args.models_dir} if args.models_dir else {}))
    registry = Registry(settings.models_root, external_sources(settings))
    found: dict[str, Target] = {}
    for key in args.model:
        info = registry.get(key)
        if info is None or info.type != "llm":
            raise SystemExit(f"--model {key}: not a text model the server lists")
        if info.format in found:
            raise SystemExit(f"--model: two {info.format} models; name one per format")
        found[info.format] = Target(key, info.weights)
    args.formats = list(found)
    return settings.models_root, found


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
        return process_rss(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used: /proc on Linux, ``ps`` elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except FileNotFoundError:
        pass
    out = subprocess.run(["ps", "-o", "time=", "-p", str(pid)], capture_output=True, text=True)
    seconds = 0.0
    for part in out.stdout.strip().replace("-", ":").split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def process_rss(pid: int) -> int:
    """Resident bytes of a process: /proc on Linux, ``ps`` where there is none (macOS)."""
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except FileNotFoundError:
        pass
    except (OSError, IndexError, ValueError):
        return 0
    out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True)
    return int(out.stdout.strip() or 0) * 1024


@contextmanager
def timed(timings: dict[str, float], part: str) -> Iterator[None]:
    """Adds the block's wall time to ``timings[part]``: where a run's minutes go."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[part] = timings.get(part, 0.0) + round(time.perf_counter() - t0, 1)


def print_timings(timings: dict[str, float]) -> None:
    print("\nseconds per part:")
    for part, seconds in timings.items():
        print(f"  {part:<40} {seconds:>7.1f}")


@dataclass
class Peak:
    """The peak resident memory seen, and the ``beside`` figure read when it was seen."""

    rss: int
    beside: int = 0


@contextmanager
def peak_rss(server: Server, beside: Callable[[], int] | None = None) -> Iterator[Peak]:
    """Samples the server's resident memory while the block runs (every 50 ms) and yields
    its peak; ``beside`` (an HTTP call: at most every 0.25 s) is read again at each new peak,
    so that it tells what that memory held at about that moment."""
    peak = Peak(server.rss(), beside() if beside is not None else 0)
    read = time.monotonic()
    stop = threading.Event()

    def poll() -> None:
        nonlocal read
        while not stop.wait(0.05):
            rss = server.rss()
            if rss <= peak.rss:
                continue
            peak.rss = rss
            if beside is not None and time.monotonic() - read >= 0.25:
                peak.beside, read = beside(), time.monotonic()

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        yield peak
    finally:
        stop.set()
        t.join()


def prompt_cache_held(server: Server) -> int:
    """The bytes our server's prompt cache holds now beside the model's KV windows (GGUF: kept
    requests parked in host memory; MLX: its entries), from ``/health``."""
    loaded = httpx.get(server.url + "/health", timeout=60).json()["loaded"]
    return int(next(i["prompt_cache_held_bytes"] for i in loaded if i["id"] == server.model))


@dataclass
class Stream:
    start: float
    first: float | None = None
    end: float = 0.0
    times: list[float] = field(default_factory=list)
    # Tokens each text chunk brings (from its log probabilities when asked for, else 1): a
    # token whose text is held back (a partial UTF-8 character) comes with the next one.
    counts: list[int] = field(default_factory=list)
    tokens: int = 0
    cached: int = 0
    chunks: int = 0

    def token_gaps(self, start: float, end: float) -> list[float]:
        """Time between text chunks arriving from ``start`` to ``end``, per token each brings:
        a token whose text is held back (a partial UTF-8 character, frequent in the random
        bench model's replies) arrives with the next one, whose chunk's gap is two steps."""
        inside = [(t, n) for t, n in zip(self.times, self.counts, strict=True) if start <= t <= end]
        return [(b - a) / n for (a, _), (b, n) in zip(inside, inside[1:], strict=False)]

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
                logprobs = data["choices"][0].get("logprobs") or {}
                s.counts.append(max(1, len(logprobs.get("tokens") or ())))
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
    # Words drawn from a generator seeded by the tag, not one fixed sequence: with
    # changed-middle reuse (--cache-reuse) two prompts differing only in their first word
    # would be served from the prompt cache but for that word.
    rng = random.Random(tag)
    return f"{tag} " + " ".join(f"w{rng.randrange(97)}" for _ in range(words))


def gguf_threads() -> tuple[int, int]:
    """The decode and prompt threads mlxserve's GGUF engine uses: every GGUF figure (ours, the
    in-process baseline, llama_cpp.server) runs with the same, or the comparison measures the
    thread count."""
    from backends.llamacpp.engine import _threads

    return _threads()


def bench_gguf(quick: bool) -> Path:
    """The bench model's GGUF file (quick or full), generated once."""
    return make_model(REPO / ".cache" / "bench-models", "quick" if quick else "full")["gguf"]


def raw_gguf(quick: bool, **params: Any) -> Any:
    """The bench model's GGUF (quick or full) opened with llama-cpp-python alone, with a small
    context of its own and flash attention off, for the scripts that make their own contexts
    (``params``: Llama's threads and KV types)."""
    from llama_cpp import Llama

    return Llama(
        model_path=str(bench_gguf(quick)),
        n_ctx=256,
        n_batch=64,
        verbose=False,
        flash_attn=False,
        **params,
    )


def server_kv_f32(path: Path) -> bool:
    """Whether mlxserve loads the GGUF at ``path`` with an f32 KV cache (asked for no cache
    type): f32 weights get one (``mlxserve.core.loader``), as the bench models' do; else f16.
    What an in-process baseline or a replay of the server's steps must use too."""
    from mlxserve.core.gguf_header import read_header

    return read_header(path).metadata.get("general.file_type") == 0


def fmt_table(rows: list[tuple[str, str, str]]) -> str:
    width = max(len(r[0]) for r in rows)
    lines = [f"{'figure':<{width}}  {'value':>12}  goal", "-" * (width + 30)]
    lines += [f"{a:<{width}}  {b:>12}  {c}" for a, b, c in rows]
    return "\n".join(lines)


# A GGUF model's KV is one pool of context_length cells by default: a ≈4k-token prompt then
# waits for running streams to end on the 4096-token bench model instead of being admitted
# beside them. The admission figures (``--admission``, and the full run's admission phase on a
# server of its own) reserve a window per parallel sequence, as every run before the pool did;
# every other figure keeps the default.
WINDOW_PER_SEQUENCE = ("--kv-windows", "4")


def our_server(root: Path, home: Path, model: str, *flags: str, context: int = 8192) -> Server:
    argv = [sys.executable, "-m", "mlxserve", "serve", "--port", "{port}"]
    argv += ["--models-dir", str(root), "--no-auto-evict", *flags]
    env = {"MLXSERVE_HOME": str(home), "MLXSERVE_DEFAULT_CONTEXT_LENGTH": str(context)}
    return Server("mlxserve", model, argv, env)


async def ours_alone(
    args: argparse.Namespace,
    size: str,
    measure: Callable[[Server, str], Awaitable[dict[str, float]]],
    goal: Callable[[str], str],
    flags: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Figures of mlxserve alone (no peers), one format after the other on one server (started
    with ``flags``): ``measure`` gives a format's figures once its model is loaded, ``goal``
    each one's goal."""
    root, found = targets(args, size)
    home = Path(tempfile.mkdtemp(prefix="mlxserve-bench-"))
    ours = our_server(root, home, next(iter(found.values())).key, *flags)
    results: dict[str, Any] = {"mode": size, "machine": machine(), "figures": {}}
    rows: list[tuple[str, str, str]] = []
    try:
        ours.start(home)
        for fmt in args.formats:
            ours.model = found[fmt].key
            # Warm-up: the first request loads the model.
            async with httpx.AsyncClient(timeout=600) as client:
                await stream_once(client, ours, "warm up", 4)
            figs = await measure(ours, fmt)
            results["figures"][fmt] = figs
            rows += [(f"{fmt} {k}", f"{v:.3f}", goal(k)) for k, v in figs.items()]
    finally:
        ours.stop()
    print(fmt_table(rows))
    return results


def peer_servers(found: dict[str, Target]) -> dict[str, Server]:
    """``mlx_lm.server`` and llama-cpp-python's server on the same weights, per format."""
    py = sys.executable
    threads, threads_batch = gguf_threads()
    peers = {}
    if "mlx" in found:
        path = str(found["mlx"].path)
        peers["mlx"] = Server(
            "mlx_lm.server", path, [py, "-m", "mlx_lm.server", "--model", path, "--port", "{port}"]
        )
    if "gguf" in found:
        path = str(found["gguf"].path)
        peers["gguf"] = Server(
            "llama_cpp.server",
            path,
            [
                py,
                "-m",
                "llama_cpp.server",
                "--model",
                path,
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
        )
    return peers


def machine() -> dict[str, Any]:
    import importlib.metadata as md

    versions = {p: md.version(p) for p in ("mlx", "mlx-lm", "llama-cpp-python")}
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        **versions,
    }
