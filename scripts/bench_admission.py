"""Admission figures of scripts/bench.py (``--admission``): how long running streams wait
while long prompts are admitted, for one prompt, a seeded one (sampled on its own path
beside the batch) and four arriving together, on mlxserve alone."""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from bench import Mode, admission_gap
from bench_common import Server, ours_alone

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
    return await ours_alone(
        args,
        mode.size,
        lambda ours, _fmt: admission(ours, mode),
        lambda k: GOALS.get(k, "reported"),
    )
