#!/usr/bin/env python3
"""Soak test: many concurrent clients against a server for minutes, then checks it is clean.

    scripts/soak.py --duration 120                      # starts a server with the test models
    scripts/soak.py --base-url http://127.0.0.1:1234 --pid 4242 --token sk-lm-...

16 clients (``--clients``) mix every inference endpoint (OpenAI chat/completions/responses/
embeddings, Anthropic messages and count_tokens, LM Studio v1 chat and v0), streamed and not;
10% of streams (``--disconnect``) hang up midway. One more client sends malformed requests
(bad JSON, wrong types, deep nesting, huge numbers, unknown or path-like models, oversized
bodies, a DNS-rebinding Host). A probe times ``GET /health`` every 250 ms throughout.

Afterwards it checks: no 5xx, no request that hung (no answer within ``--timeout``), every
malformed request refused with a 4xx, no generation still running (``/health`` pending
counts back to 0), the server's resident memory and open file descriptors within 5% of
their level after the warm-up, and ``/health`` under 100 ms (max and p99). Exit status 0
when all hold. A server started here runs without a prompt cache (``--prompt-cache-bytes``
gives it one), so that its memory measures leaks; a running server's cache may still be
filling (1 GiB by default), which shows as memory growth. The machine's load matters: on a
shared CPU the latencies say more about the neighbours than about the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
PUBLISHER = "mlxserve-test"
TEXT_MODELS = [f"{PUBLISHER}/tiny-qwen2-mlx", f"{PUBLISHER}/tiny-qwen2-gguf"]
EMBED_MODELS = [f"{PUBLISHER}/all-minilm-l6-v2-mlx", f"{PUBLISHER}/all-minilm-l6-v2-gguf"]
PROMPTS = ["Hello, who are you?", "Write a haiku about rivers.", "1, 2, 3,", "Say yes."]


@dataclass
class Stats:
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    hung: list[str] = field(default_factory=list)
    transport_errors: list[str] = field(default_factory=list)
    malformed_accepted: list[str] = field(default_factory=list)
    disconnects: int = 0
    streams: int = 0
    health_ms: list[float] = field(default_factory=list)
    health_failures: int = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_and_fds(pid: int) -> tuple[int, int]:
    """Resident bytes and open descriptors of ``pid`` (procfs, or psutil elsewhere)."""
    proc = Path(f"/proc/{pid}")
    if proc.exists():
        rss = 0
        for line in (proc / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
        return rss, len(os.listdir(proc / "fd"))
    import psutil  # macOS: no procfs

    p = psutil.Process(pid)
    return p.memory_info().rss, p.num_fds()


# --- the requests -------------------------------------------------------------------------------


def _messages() -> list[dict[str, str]]:
    return [{"role": "user", "content": random.choice(PROMPTS)}]


KINDS = ["chat", "completion", "anthropic", "count", "responses", "lms-v1", "lms-v0", "embeddings"]


def pick_request(kinds: list[str], models: list[str]) -> tuple[str, str, dict[str, Any], bool]:
    """(label, path, body, streamed) for one random inference request."""
    model = random.choice(models)
    n = random.randint(1, 24)
    stream = random.random() < 0.5
    kind = random.choice(kinds)
    if kind == "chat":
        body = {"model": model, "messages": _messages(), "max_tokens": n, "stream": stream}
        return kind, "/v1/chat/completions", body, stream
    if kind == "completion":
        body = {"model": model, "prompt": random.choice(PROMPTS), "max_tokens": n, "stream": stream}
        return kind, "/v1/completions", body, stream
    if kind == "anthropic":
        body = {"model": model, "messages": _messages(), "max_tokens": n, "stream": stream}
        return kind, "/v1/messages", body, stream
    if kind == "count":
        return kind, "/v1/messages/count_tokens", {"model": model, "messages": _messages()}, False
    if kind == "responses":
        body = {"model": model, "input": random.choice(PROMPTS), "max_output_tokens": n,
                "stream": stream, "store": False}  # fmt: skip
        return kind, "/v1/responses", body, stream
    if kind == "lms-v1":
        body = {"model": model, "input": random.choice(PROMPTS), "max_output_tokens": n,
                "stream": stream, "store": random.random() < 0.2}  # fmt: skip
        return kind, "/api/v1/chat", body, stream
    if kind == "lms-v0":
        body = {"model": model, "messages": _messages(), "max_tokens": n, "stream": stream}
        return kind, "/api/v0/chat/completions", body, stream
    body = {"model": random.choice(EMBED_MODELS), "input": random.sample(PROMPTS, 2)}
    return kind, "/v1/embeddings", body, False


def malformed(limit: int) -> tuple[str, str, bytes, dict[str, str]]:
    """(label, path, raw body, extra headers) for one request the server must refuse."""
    path = random.choice(["/v1/chat/completions", "/v1/messages", "/api/v1/chat", "/v1/responses"])
    model = random.choice(TEXT_MODELS)
    cases: list[tuple[str, bytes, dict[str, str]]] = [
        ("truncated-json", b'{"model":', {}),
        ("not-an-object", b"[1, 2]", {}),
        ("empty", b"", {}),
        ("bad-utf8", b'{"model": "\xff\xfe"}', {}),
        ("deep", b'{"model": "x", "messages": ' + b"[" * 3000 + b"]" * 3000 + b"}", {}),
        ("huge-int", b'{"model": "x", "max_tokens": 1' + b"0" * 5000 + b"}", {}),
        ("nan", b'{"model": "x", "temperature": NaN}', {}),
        (
            "wrong-type",
            json.dumps(
                {"model": model, "messages": "hi", "input": 5, "max_tokens": "many"}
            ).encode(),
            {},
        ),  # fmt: skip
        (
            "negative",
            json.dumps(
                {
                    "model": model,
                    "messages": _messages(),
                    "input": "x",
                    "max_tokens": -1,
                    "max_output_tokens": -1,
                }
            ).encode(),
            {},
        ),  # fmt: skip
        (
            "unknown-model",
            json.dumps(
                {"model": "nobody/nothing", "messages": _messages(), "input": "x", "max_tokens": 2}
            ).encode(),
            {},
        ),  # fmt: skip
        (
            "path-model",
            json.dumps(
                {
                    "model": "../../../etc/passwd",
                    "messages": _messages(),
                    "input": "x",
                    "max_tokens": 2,
                }
            ).encode(),
            {},
        ),  # fmt: skip
        ("oversized", b'{"model": "' + b"x" * (limit + 1024) + b'"}', {}),
        ("rebinding-host", b'{"model": "x"}', {"Host": "evil.example"}),
        ("lone-surrogate", b'{"model": "\\ud800", "messages": [], "input": "x"}', {}),
    ]
    label, body, headers = random.choice(cases)
    return label, path, body, {"Content-Type": "application/json", **headers}


# --- the clients --------------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace, base_url: str, embeddings: bool) -> None:
        self.args = args
        self.base_url = base_url
        self.kinds = [k for k in args.only.split(",") if embeddings or k != "embeddings"]
        self.models = args.models.split(",")
        self.stats = Stats()
        self.stop_at = 0.0
        self.headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}

    def _record(self, label: str, status: int, detail: str = "") -> None:
        self.stats.statuses[(label, status)] += 1
        if status >= 500:
            self.stats.server_errors.append(f"{label}: {status} {detail[:300]}")

    async def _one(self, client: httpx.AsyncClient) -> None:
        label, path, body, streamed = pick_request(self.kinds, self.models)
        try:
            if not streamed:
                r = await client.post(path, json=body)
                self._record(label, r.status_code, r.text)
                return
            self.stats.streams += 1
            leave_after = random.randint(1, 4) if random.random() < self.args.disconnect else None
            async with client.stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    self._record(label + "-stream", r.status_code, (await r.aread()).decode())
                    return
                events = 0
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        events += 1
                        if leave_after is not None and events >= leave_after:
                            self.stats.disconnects += 1
                            break
                self._record(label + "-stream", r.status_code)
        except httpx.TimeoutException:
            self.stats.hung.append(f"{label} {path}")
        except httpx.HTTPError as exc:
            self.stats.transport_errors.append(f"{label} {path}: {type(exc).__name__} {exc}")

    async def client_loop(self) -> None:
        async with httpx.AsyncClient(
            base_url=self.base_url, timeout=self.args.timeout, headers=self.headers
        ) as client:
            while time.monotonic() < self.stop_at:
                await self._one(client)

    async def malformed_loop(self) -> None:
        async with httpx.AsyncClient(
            base_url=self.base_url, timeout=self.args.timeout, headers=self.headers
        ) as client:
            while time.monotonic() < self.stop_at:
                label, path, body, headers = malformed(self.args.max_body_bytes)
                try:
                    r = await client.post(path, content=body, headers=headers)
                except httpx.TimeoutException:
                    self.stats.hung.append(f"malformed {label}")
                    continue
                except httpx.HTTPError as exc:
                    self.stats.transport_errors.append(f"malformed {label}: {exc}")
                    continue
                self._record("malformed-" + label, r.status_code, r.text)
                if not 400 <= r.status_code < 500:
                    self.stats.malformed_accepted.append(f"{label} {path}: {r.status_code}")
                await asyncio.sleep(0.05)

    async def health_loop(self) -> None:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=5) as client:
            while time.monotonic() < self.stop_at:
                started = time.perf_counter()
                try:
                    r = await client.get("/health")
                    if r.status_code == 200:
                        self.stats.health_ms.append((time.perf_counter() - started) * 1000)
                    else:
                        self.stats.health_failures += 1
                except httpx.HTTPError:
                    self.stats.health_failures += 1
                await asyncio.sleep(0.25)

    async def run(self, duration: float) -> None:
        self.stop_at = time.monotonic() + duration
        tasks = [self.client_loop() for _ in range(self.args.clients)]
        if self.args.malformed:
            tasks.append(self.malformed_loop())
        await asyncio.gather(*tasks, self.health_loop())


async def pending(base_url: str) -> int:
    async with httpx.AsyncClient(base_url=base_url, timeout=5) as client:
        loaded = (await client.get("/health")).json()["loaded"]
    return sum(int(m.get("pending", 0)) for m in loaded)


async def settle(base_url: str, seconds: float) -> int:
    """Wait until no generation runs; returns what is still pending at the end."""
    deadline = time.monotonic() + seconds
    left = await pending(base_url)
    while left and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        left = await pending(base_url)
    return left


# --- the server ---------------------------------------------------------------------------------


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str, bool]:
    sys.path.insert(0, str(REPO / "scripts"))
    import make_embedding_models
    import make_test_models

    models = args.models_dir
    make_test_models.generate(models, publisher=PUBLISHER, name="tiny-qwen2", seed=0)
    embeddings = True
    try:
        make_embedding_models.generate(models, publisher=PUBLISHER, name="all-minilm-l6-v2")
    except Exception as exc:  # the wheel with the embedding model may be missing
        print(f"no embedding models ({exc}); soaking without /v1/embeddings")
        embeddings = False
    port = free_port()
    home = Path(tempfile.mkdtemp(prefix="mlxserve-soak-"))
    log = open(home / "server.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlxserve",
            "serve",
            "--port",
            str(port),
            "--models-dir",
            str(models),
            "--no-auto-evict",
            "--log-level",
            "warning",
            "--max-body-bytes",
            str(args.max_body_bytes),
        ],  # fmt: skip
        env={
            **os.environ,
            "MLXSERVE_HOME": str(home),
            "MLXSERVE_PROMPT_CACHE_BYTES": str(args.prompt_cache_bytes),
        },
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited; see {home / 'server.log'}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                print(f"server {url} (pid {proc.pid}, log {home / 'server.log'})")
                return proc, url, embeddings
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not start")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--base-url", help="a running server (default: start one)")
    parser.add_argument("--pid", type=int, help="its process id, to watch memory and fds")
    parser.add_argument("--token", help="API token, if the server requires one")
    parser.add_argument("--duration", type=float, default=180, help="seconds (default 180)")
    parser.add_argument("--warmup", type=float, default=20, help="seconds of load before the "
                        "baseline is taken (default 20)")  # fmt: skip
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--disconnect", type=float, default=0.1, help="share of streams "
                        "abandoned midway (default 0.1)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=60, help="a request with no answer "
                        "in this many seconds counts as hung (default 60)")  # fmt: skip
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=1 << 20,
        help="the server's body limit (the server started here gets it)",
    )
    parser.add_argument("--models-dir", type=Path, default=REPO / ".cache" / "test-models")
    parser.add_argument("--prompt-cache-bytes", type=int, default=0, help="the started "
                        "server's prompt cache per model (default 0, off: memory then "
                        "measures leaks, not a cache filling up; give a size to soak it "
                        "too)")  # fmt: skip
    parser.add_argument("--no-embeddings", action="store_true")
    parser.add_argument("--only", default=",".join(KINDS), help="comma-separated request "
                        f"kinds to send (default all: {','.join(KINDS)})")  # fmt: skip
    parser.add_argument("--models", default=",".join(TEXT_MODELS), help="text models to use")
    parser.add_argument("--no-malformed", dest="malformed", action="store_false")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    random.seed(args.seed)

    proc = None
    if args.base_url:
        base_url, pid, embeddings = args.base_url.rstrip("/"), args.pid, not args.no_embeddings
    else:
        proc, base_url, embeddings = start_server(args)
        pid = proc.pid
        embeddings = embeddings and not args.no_embeddings
    try:
        soak = Soak(args, base_url, embeddings)
        print(f"warm-up: {args.warmup:.0f}s")
        asyncio.run(soak.run(args.warmup))
        asyncio.run(settle(base_url, 30))
        time.sleep(1)
        start = rss_and_fds(pid) if pid else None
        soak.stats = Stats()
        print(f"soak: {args.clients} clients + 1 malformed + health probe for {args.duration:.0f}s")
        began = time.monotonic()
        asyncio.run(soak.run(args.duration))
        elapsed = time.monotonic() - began
        still_running = asyncio.run(settle(base_url, 30))
        time.sleep(1)
        end = rss_and_fds(pid) if pid else None
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)

    s = soak.stats
    total = sum(s.statuses.values())
    figures: dict[str, Any] = {
        "duration_s": round(elapsed, 1),
        "requests": total,
        "requests_per_s": round(total / elapsed, 1),
        "streams": s.streams,
        "streams_abandoned": s.disconnects,
        "by_status": {f"{k[0]} {k[1]}": v for k, v in sorted(s.statuses.items())},
        "server_errors_5xx": len(s.server_errors),
        "hung": len(s.hung),
        "transport_errors": len(s.transport_errors),
        "malformed_not_refused": len(s.malformed_accepted),
        "pending_after": still_running,
        "health_samples": len(s.health_ms),
        "health_failures": s.health_failures,
        "health_ms_p50": round(statistics.median(s.health_ms), 1) if s.health_ms else None,
        "health_ms_p99": round(percentile(s.health_ms, 0.99), 1),
        "health_ms_max": round(max(s.health_ms), 1) if s.health_ms else None,
    }
    checks = {
        "no 5xx": not s.server_errors,
        "no hung request": not s.hung,
        "no transport error": not s.transport_errors,
        "malformed requests refused (4xx)": not s.malformed_accepted,
        "no generation still running": still_running == 0,
        "/health answered every probe": s.health_failures == 0,
        "/health p99 and max < 100 ms": bool(s.health_ms) and max(s.health_ms) < 100,
    }
    if start and end:
        figures |= {
            "rss_start_mb": round(start[0] / 2**20, 1),
            "rss_end_mb": round(end[0] / 2**20, 1),
            "fds_start": start[1],
            "fds_end": end[1],
        }
        checks["RSS within 5% of the start"] = end[0] <= start[0] * 1.05
        checks["open fds within 5% of the start"] = end[1] <= max(start[1] * 1.05, start[1] + 1)
    print(json.dumps(figures, indent=2))
    for problem in (s.server_errors + s.hung + s.transport_errors + s.malformed_accepted)[:20]:
        print("  !", problem)
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if args.json:
        args.json.write_text(json.dumps({"figures": figures, "checks": checks}, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
