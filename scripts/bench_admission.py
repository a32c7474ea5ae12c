"""Admission figures of scripts/bench.py (``--admission``): how long running streams wait
while long prompts are admitted, for one prompt, a seeded one (sampled on its own path
beside the batch) and four arriving together, on mlxserve alone."""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import httpx
from bench import Mode, admission_gap
from bench_common import Server, fmt_table, machine, our_server, stream_once, targets

GOALS = {
    "admission_max_gap_ms": "<= 1 chunk + 1 step",
    "admission_seeded_vs_one": "<= 1.5 (one chunk too)",
    "admission_4_together_vs_one": "<= 2",
}


async def admission(server: Server, mode: Mode) -> dict[str, float]:
    """The admission gap of one long prompt, of a seeded one and of four arriving together,
    the three alternating over ``max(2, mode.rounds)`` rounds; medians, and the latter two
    as multiples of the first (one chunk + one step)."""
    kinds: dict[str, tuple[int, dict[str, Any] | None]] = {
        "one": (1, None),
        "seeded": (1, {"temperature": 0.8, "seed": 1}),
        "four": (4, None),
    }
    gaps: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(max(2, mode.rounds)):
        for k in kinds if r % 2 == 0 else reversed(kinds):
            gaps[k].append(await admission_gap(server, mode, *kinds[k], tag=f"{k}{r}x"))
    med = {k: statistics.median(v) for k, v in gaps.items()}
    return {
        "admission_max_gap_ms": med["one"] * 1000,
        "admission_seeded_max_gap_ms": med["seeded"] * 1000,
        "admission_4_together_max_gap_ms": med["four"] * 1000,
        "admission_seeded_vs_one": med["seeded"] / med["one"],
        "admission_4_together_vs_one": med["four"] / med["one"],
    }


async def admission_only(args: argparse.Namespace, mode: Mode) -> dict[str, Any]:
    """Only the admission figures, mlxserve alone, one format after the other."""
    root, found = targets(args, mode.size)
    home = Path(tempfile.mkdtemp(prefix="mlxserve-bench-"))
    ours = our_server(root, home, next(iter(found.values())).key)
    results: dict[str, Any] = {"mode": mode.size, "machine": machine(), "figures": {}}
    rows: list[tuple[str, str, str]] = []
    try:
        ours.start(home)
        for fmt in args.formats:
            ours.model = found[fmt].key
            # Warm-up: the first request loads the model.
            async with httpx.AsyncClient(timeout=600) as client:
                await stream_once(client, ours, "warm up", 4)
            figs = await admission(ours, mode)
            results["figures"][fmt] = figs
            rows += [(f"{fmt} {k}", f"{v:.3f}", GOALS.get(k, "reported")) for k, v in figs.items()]
    finally:
        ours.stop()
    print(fmt_table(rows))
    return results
