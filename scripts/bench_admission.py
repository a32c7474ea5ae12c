"""Admission figures of scripts/bench.py (``--admission``): how long running streams wait
while long prompts are admitted, for one prompt, a seeded one (sampled on its own path
beside the batch), a drafted one (the model drafting for itself) and four arriving
together, on mlxserve alone, against the bound (one prefill chunk plus one step, measured on
the fresh model) and with the prompt cache holding what the full run leaves in it by then
(three long unrelated histories)."""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import httpx
from bench import Mode, admission_gap, chunk_and_step
from bench_common import WINDOW_PER_SEQUENCE, Server, ours_alone, stream_once, unique_prompt

# Each call's prompts carry a tag of their own; a one-token word, as the full run's "long":
# the full mode's prompts (≈4k tokens with it) then fit the bench model's 4096-token context.
TAGS = ("cat", "dog", "fox", "owl", "bee", "ant", "cow", "pig", "hen", "ape", "bug", "hog")

GOALS = {
    "admission_max_gap_ms": "<= 1 chunk + 1 step",
    "admission_bound_ms": "1 chunk + 1 step",
    "admission_gap_vs_bound": "<= 1",
    "admission_seeded_vs_one": "<= 1.5 (one chunk too)",
    "admission_drafted_vs_one": "reported",
    "admission_4_together_vs_one": "<= 2",
}


async def admission(server: Server, mode: Mode) -> dict[str, float]:
    """The admission gap of one long prompt, of a seeded one, of a drafted one and of four
    arriving together, alternating over ``max(2, mode.rounds)`` rounds; medians, and the
    others as multiples of the first (one chunk + one step). First the bound on the fresh
    model, then three histories of ``mode.history_tokens`` tokens that no admitted prompt shares (as
    the full run's second-turn figure leaves them in the prompt cache)."""
    kinds: dict[str, tuple[int, dict[str, Any] | None]] = {
        "one": (1, None),
        "seeded": (1, {"temperature": 0.8, "seed": 1}),
        "drafted": (1, {"draft_model": server.model, "num_draft_tokens": 4}),
        "four": (4, None),
    }
    bound = await chunk_and_step(server, mode)
    async with httpx.AsyncClient(timeout=600) as client:
        for i in range(3):
            history = unique_prompt(f"kept{i}", mode.history_tokens // 3)
            await stream_once(client, server, history, 8)
        # The draft loads on its first use, on the owner thread: not part of any gap.
        await stream_once(client, server, "load the draft", 2, kinds["drafted"][1])
    gaps: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(max(2, mode.rounds)):
        for k in kinds if r % 2 == 0 else reversed(kinds):
            call = r * len(kinds) + list(kinds).index(k)
            tag = TAGS[call % len(TAGS)] + (str(call // len(TAGS)) if call >= len(TAGS) else "")
            # A drafted request's draft may still be reading the prompt after its first
            # token (its first rounds wait for it): its window ends with its last token.
            gap = admission_gap(server, mode, *kinds[k], tag=tag, to_end=k == "drafted")
            gaps[k].append(await gap)
    med = {k: statistics.median(v) for k, v in gaps.items()}
    return {
        "admission_bound_ms": bound * 1000,
        "admission_max_gap_ms": med["one"] * 1000,
        "admission_gap_vs_bound": med["one"] / bound,
        "admission_seeded_max_gap_ms": med["seeded"] * 1000,
        "admission_drafted_max_gap_ms": med["drafted"] * 1000,
        "admission_4_together_max_gap_ms": med["four"] * 1000,
        "admission_seeded_vs_one": med["seeded"] / med["one"],
        "admission_drafted_vs_one": med["drafted"] / med["one"],
        "admission_4_together_vs_one": med["four"] / med["one"],
    }


async def admission_only(args: argparse.Namespace, mode: Mode) -> dict[str, Any]:
    """Only the admission figures, mlxserve alone, one format after the other."""
    return await ours_alone(
        args,
        mode.size,
        lambda ours, _fmt: admission(ours, mode),
        lambda k: GOALS.get(k, "reported"),
        WINDOW_PER_SEQUENCE,
    )
