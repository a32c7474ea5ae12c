#!/usr/bin/env python
"""Embedding throughput against a running server: N short texts in one request, against one
request per text, for each model given (e.g. the MLX and the GGUF all-MiniLM-L6-v2).

    .venv/bin/python scripts/bench_embeddings.py --url http://127.0.0.1:1234 \\
        --model sentence-transformers/all-MiniLM-L6-v2-mlx \\
        --model sentence-transformers/all-MiniLM-L6-v2-gguf
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import httpx

SUBJECTS = ("The cat", "A startup", "My neighbour", "The committee", "An old ship", "Our team")
VERBS = ("quietly watches", "reviews", "repairs", "celebrates", "forgets", "describes")
OBJECTS = ("the harbour at dawn", "quarterly revenue", "a broken bicycle", "the new policy")


def texts(n: int) -> list[str]:
    """``n`` distinct short sentences (about 8-12 tokens each)."""
    out = []
    for i in range(n):
        s, v, o = SUBJECTS[i % 6], VERBS[(i // 6) % 6], OBJECTS[(i // 36) % 4]
        out.append(f"{s} {v} {o} ({i}).")
    return out


def embed(client: httpx.Client, model: str, inputs: str | list[str]) -> int:
    r = client.post("/v1/embeddings", json={"model": model, "input": inputs})
    r.raise_for_status()
    return int(r.json()["usage"]["prompt_tokens"])


def bench(client: httpx.Client, model: str, batch: list[str], repeats: int) -> None:
    embed(client, model, batch[:8])  # load the model and warm up
    best_batch = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        tokens = embed(client, model, batch)
        best_batch = min(best_batch, time.perf_counter() - started)
    started = time.perf_counter()
    for text in batch:
        embed(client, model, text)
    loop = time.perf_counter() - started
    n = len(batch)
    print(
        f"{model}: one request {n / best_batch:7.1f} texts/s ({best_batch:.2f} s, "
        f"{tokens / n:.1f} tokens/text) | one request per text {n / loop:7.1f} texts/s "
        f"({loop:.2f} s) | speed-up x{loop / best_batch:.1f}",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--url", default="http://127.0.0.1:1234")
    parser.add_argument("--model", action="append", required=True, help="repeat for each model")
    parser.add_argument("-n", type=int, default=256, help="texts (default 256)")
    parser.add_argument("--repeats", type=int, default=3, help="timed one-request runs (best)")
    args = parser.parse_args(argv)
    batch = texts(args.n)
    with httpx.Client(base_url=args.url, timeout=600) as client:
        for model in args.model:
            bench(client, model, batch, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
