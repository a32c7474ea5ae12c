"""Distributed benchmark (not a test): decode tokens/s of one model served by one process
against the same model sharded over 2 ranks (mx.distributed ring backend on loopback).

On one machine both ranks share its cores and talk over loopback TCP, so this measures the
cost of the distributed path (two collectives per layer per step, plus the control message),
not the speed-up a second Mac brings.

    .venv/bin/python scripts/bench_distributed.py                 # the generated bench model
    .venv/bin/python scripts/bench_distributed.py --size full --requests 4 --tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from bench_common import load_script

REPO = Path(__file__).resolve().parents[1]
PUBLISHER = "mlxserve-bench"
# (hidden, intermediate, layers, heads, kv heads), as scripts/bench.py generates them.
SIZES = {"quick": (256, 704, 4, 4, 2), "full": (512, 1408, 8, 8, 2)}


def make_model(root: Path, size: str) -> str:
    mtm = load_script("make_test_models")
    mtm.HIDDEN, mtm.INTERMEDIATE, mtm.LAYERS, mtm.HEADS, mtm.KV_HEADS = SIZES[size]
    mtm.CONTEXT = 8192
    mtm.generate(root, publisher=PUBLISHER, name=f"bench-qwen2-{size}", seed=0, formats=["mlx"])
    return f"{PUBLISHER}/bench-qwen2-{size}-mlx"


def start(models: Path, home: Path, extra: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    port = random.randrange(20000, 60000)
    env = {
        **os.environ,
        "MLXSERVE_HOME": str(home),
        "MLXSERVE_LMSTUDIO_MODELS": "false",
        "MLXSERVE_HF_CACHE_MODELS": "false",
    }
    log = (home / "server.log").open("wb")
    argv = [sys.executable, "-m", "mlxserve", "serve", "--port", str(port)]
    argv += ["--models-dir", str(models), "--log-level", "warning", *extra]
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {(home / 'server.log').read_text()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not start")


async def run(url: str, model: str, requests: int, tokens: int) -> float:
    async with httpx.AsyncClient(timeout=600) as client:

        async def one(i: int) -> int:
            reply = await client.post(
                url + "/v1/completions",
                json={
                    "model": model,
                    "prompt": f"Request {i}: once upon a time",
                    "max_tokens": tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                },
            )
            reply.raise_for_status()
            return int(reply.json()["usage"]["completion_tokens"])

        await one(-1)  # load and warm up
        started = time.perf_counter()
        counts = await asyncio.gather(*(one(i) for i in range(requests)))
        return sum(counts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="quick")
    parser.add_argument("--requests", type=int, default=4, help="concurrent requests")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per request")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = root / "models"
        model = make_model(models, args.size)
        results: dict[str, float] = {}
        hostfile = root / "hosts.json"
        hostfile.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2))
        ring_port = str(random.randrange(20000, 60000))
        setups = {
            "1 process": [],
            "2 ranks (ring, loopback)": ["--distributed", str(hostfile)]
            + ["--distributed-port", ring_port],
        }
        for name, extra in setups.items():
            home = root / name.split()[0]
            home.mkdir()
            proc, url = start(models, home, extra)
            try:
                results[name] = asyncio.run(run(url, model, args.requests, args.tokens))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        print(f"model {model}, {args.requests} concurrent requests x {args.tokens} tokens")
        for name, rate in results.items():
            print(f"  {name:28s} {rate:8.1f} tokens/s")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
