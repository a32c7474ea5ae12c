#!/usr/bin/env python
"""Prompt-cache checkpoints on models whose caches cannot be trimmed: what they save and cost.

For each tiny model of scripts/make_hybrid_models.py (MLX Qwen3.5 and Gemma 3, GGUF Qwen3.5),
in process: a chat's first turn with a long system prompt, then its second turn, on an engine
with the prompt cache and on one without; prints the second turn's time to first token both
ways, the prompt tokens served from cache, and (MLX) the time the batch spent taking each
prompt checkpoint, next to a decode step's. Run from the repository root:

    .venv/bin/python scripts/bench_checkpoints.py [--system-tokens 3000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_common import load_script  # noqa: E402

from backends import open_engine  # noqa: E402
from backends.base import (  # noqa: E402
    Engine,
    Finished,
    GenerationRequest,
    LoadOptions,
    PromptProgress,
    SamplingParams,
    Token,
)

MODELS: list[tuple[Literal["mlx", "gguf"], str]] = [
    ("mlx", "tiny-qwen35-hybrid"),
    ("mlx", "tiny-gemma3-sliding"),
    ("gguf", "tiny-qwen35-hybrid"),
]
CHAT = "<|im_start|>{}\n{}<|im_end|>\n"


async def _turn(engine: Engine, prompt: list[int], n: int) -> tuple[float, int, list[int]]:
    """Time to first token (s), prompt tokens from cache, tokens."""
    request = GenerationRequest(tuple(prompt), SamplingParams(temperature=0.0), n, frozenset())
    start = time.perf_counter()
    first, cached, tokens = 0.0, 0, []
    async for item in engine.submit(request):
        if isinstance(item, PromptProgress):
            cached = max(cached, item.cached)
        elif isinstance(item, Token):
            first = first or time.perf_counter() - start
            tokens.append(item.id)
        elif isinstance(item, Finished):
            break
    return first, cached, tokens


def _timed(engine: Any, name: str, into: list[float], counts: Any = None) -> None:
    """Record how long ``engine.<name>`` takes (only calls ``counts(*args)`` accepts)."""
    method = getattr(engine, name)

    def wrapper(*args: Any) -> Any:
        start = time.perf_counter()
        try:
            return method(*args)
        finally:
            if counts is None or counts(*args):
                into.append(time.perf_counter() - start)

    setattr(engine, name, wrapper)


def _takes_checkpoint(prompt_responses: list[Any]) -> bool:
    return any(pr.end_of_segment and not pr.end_of_prompt for pr in prompt_responses)


def bench(
    root: Path, fmt: Literal["mlx", "gguf"], name: str, system_tokens: int, rounds: int
) -> dict[str, Any]:
    path = root / "mlxserve-test" / f"{name}-{fmt}"
    if fmt == "gguf":
        path = path / f"{name}-f32.gguf"
    warm = open_engine(fmt, path, LoadOptions(context_length=8192))
    cold = open_engine(fmt, path, LoadOptions(context_length=8192, prompt_cache_bytes=0))
    checkpoints: list[float] = []
    steps: list[float] = []
    if fmt == "mlx":
        _timed(warm, "_checkpoint_prompts", checkpoints, _takes_checkpoint)
        _timed(warm, "_step_batch", steps)
    rules = warm.tokenize(" ".join(f"rule{i}" for i in range(system_tokens)))[:system_tokens]
    warm_ttft, cold_ttft, cached_fraction = [], [], []
    try:
        for engine in (warm, cold):  # first decodes allocate their graphs
            asyncio.run(_turn(engine, warm.tokenize("warm up"), 2))
        checkpoints.clear()
        steps.clear()
        for r in range(rounds):
            turn1 = warm.tokenize(f"<|im_start|>system\nround {r}. ") + rules
            turn1 += warm.tokenize("<|im_end|>\n" + CHAT.format("user", "Hi"))
            turn1 += warm.tokenize("<|im_start|>assistant\n")

            async def run(turn1: list[int] = turn1) -> None:
                _, _, reply = await _turn(warm, turn1, 16)
                tail = "<|im_end|>\n" + CHAT.format("user", "And then?")
                turn2 = turn1 + reply + warm.tokenize(tail + "<|im_start|>assistant\n")
                ttft, cached, out = await _turn(warm, turn2, 8)
                ref_ttft, _, ref = await _turn(cold, turn2, 8)
                assert out == ref, "a checkpoint gave a different output"
                warm_ttft.append(ttft)
                cold_ttft.append(ref_ttft)
                cached_fraction.append(cached / len(turn2))

            asyncio.run(run())
    finally:
        warm.close()
        cold.close()
    return {
        "model": f"{name}-{fmt}",
        "prompt": len(turn1),
        "cached": statistics.median(cached_fraction),
        "warm": statistics.median(warm_ttft),
        "cold": statistics.median(cold_ttft),
        "checkpoint": statistics.median(checkpoints) if checkpoints else None,
        "step": statistics.median(steps) if steps else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models-dir", type=Path, default=REPO / ".cache" / "test-models")
    parser.add_argument("--system-tokens", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    generator = load_script("make_hybrid_models")
    for _, name in MODELS:
        generator.generate(args.models_dir, name)
    rows = [bench(args.models_dir, f, n, args.system_tokens, args.rounds) for f, n in MODELS]
    print(
        "| model | turn-1 prompt | turn 2 from cache | turn-2 TTFT warm | cold | warm ÷ cold "
        "| checkpoint copy (median) | batch step (median) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        copy = f"{r['checkpoint'] * 1e3:.2f} ms" if r["checkpoint"] is not None else "-"
        step = f"{r['step'] * 1e3:.2f} ms" if r["step"] is not None else "-"
        print(
            f"| {r['model']} | {r['prompt']} | {r['cached']:.1%} | {r['warm'] * 1e3:.1f} ms "
            f"| {r['cold'] * 1e3:.1f} ms | {r['warm'] / r['cold']:.3f} | {copy} | {step} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
