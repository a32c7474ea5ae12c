"""Prompt cache on disk: time to first token of a long prompt served from a spilled
prompt-cache file after an unload, against computing that prompt (the cold run), on the
full benchmark model of scripts/bench.py (MLX folder and GGUF file, same weights).

Each round, per format: a cold request (a new prompt of ``--tokens`` tokens), the same prompt
again (a memory hit, for reference), ``unload`` (which writes the spill file), ``load``, and the
same prompt once more: served from disk. Prints a table of medians (min-max over the rounds)
and writes JSON.

    .venv/bin/python scripts/bench_spill.py               # full model, 4096 tokens, 3 rounds
    .venv/bin/python scripts/bench_spill.py --quick       # small model, 768 tokens, 1 round
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from bench_common import (
    PUBLISHER,
    REPO,
    Server,
    machine,
    make_model,
    model_name,
    our_server,
    stream_once,
    unique_prompt,
)


def spread(values: list[float], digits: int = 3) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


async def load(client: httpx.AsyncClient, server: Server, key: str, tag: str) -> str:
    """Load ``key`` and warm it up with a short unrelated request, so that neither timed
    request pays for a first use; the instance id."""
    loaded = await client.post(server.url + "/api/v1/models/load", json={"model": key})
    loaded.raise_for_status()
    await stream_once(client, server, unique_prompt(f"warm{tag}", 8), 2)
    return str(loaded.json()["instance_id"])


async def round_trip(
    client: httpx.AsyncClient, server: Server, key: str, prompt: str
) -> dict[str, float]:
    """One round on one model: cold, memory hit, unload + load, disk hit."""
    instance = await load(client, server, key, "a")
    cold = await stream_once(client, server, prompt + " first", 2)
    memory = await stream_once(client, server, prompt + " second", 2)
    started = time.perf_counter()
    r = await client.post(server.url + "/api/v1/models/unload", json={"instance_id": instance})
    r.raise_for_status()
    unload_s = time.perf_counter() - started
    started = time.perf_counter()
    await load(client, server, key, "b")
    load_s = time.perf_counter() - started
    disk = await stream_once(client, server, prompt + " third", 2)
    return {
        "cold_ttft": cold.ttft,
        "memory_ttft": memory.ttft,
        "disk_ttft": disk.ttft,
        "disk_over_cold": disk.ttft / cold.ttft,
        "disk_cached_tokens": disk.cached,
        "unload_s": unload_s,
        "load_s": load_s,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    size = "quick" if args.quick else "full"
    root = REPO / ".cache" / "bench-models"
    make_model(root, size)
    home = Path(tempfile.mkdtemp(prefix="mlxserve-bench-spill-"))
    server = our_server(root, home, "")
    figures: dict[str, list[dict[str, float]]] = {f: [] for f in args.formats}
    try:
        server.start(home)
        async with httpx.AsyncClient(timeout=600) as client:
            for r in range(args.rounds):
                for fmt in args.formats:
                    key = f"{PUBLISHER}/{model_name(size)}-{fmt}"
                    server.model = key
                    prompt = unique_prompt(f"spill{r}{fmt}", args.tokens // 3)
                    figures[fmt].append(await round_trip(client, server, key, prompt))
    finally:
        server.stop()
    files = sorted((home / "prompt-cache").glob("*/*.kv"))
    rows = [("figure", *args.formats)]
    for name, label in (
        ("cold_ttft", "TTFT cold, prompt computed (s)"),
        ("memory_ttft", "TTFT memory hit (s)"),
        ("disk_ttft", "TTFT disk hit after unload + load (s)"),
        ("disk_over_cold", "disk hit / cold"),
        ("disk_cached_tokens", "cached_tokens of the disk hit"),
        ("unload_s", "unload, spill written (s)"),
        ("load_s", "load and a short warm-up request (s)"),
    ):
        rows.append((label, *(spread([f[name] for f in figures[fmt]]) for fmt in args.formats)))
    width = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, width, strict=True)))
    print(f"\n{len(files)} spill files, {sum(p.stat().st_size for p in files) / 2**20:.1f} MiB")
    return {
        "model": model_name(size),
        "tokens": args.tokens,
        "rounds": args.rounds,
        "machine": machine(),
        "figures": figures,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small model, 768 tokens, 1 round")
    parser.add_argument("--tokens", type=int, help="prompt length (default 4096; quick 768)")
    parser.add_argument("--rounds", type=int, help="rounds (default 3; quick 1)")
    parser.add_argument("--formats", default="mlx,gguf", help="comma-separated: mlx,gguf")
    parser.add_argument(
        "--out", type=Path, default=REPO / ".cache" / "bench" / "spill.json", help="JSON output"
    )
    args = parser.parse_args(argv)
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    args.tokens = args.tokens or (768 if args.quick else 4096)
    args.rounds = args.rounds or (1 if args.quick else 3)
    results = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
