#!/usr/bin/env python3
"""Benchmark constrained decoding (not a test): tokens/s with a JSON-schema grammar against
the same request unconstrained, on both formats, and grammar compile times.

    .venv/bin/python scripts/bench_structured.py [--models-dir DIR] [--tokens 200] [--runs 3]

It starts its own server on a free loopback port over the generated test models (or DIR).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from bench_common import load_script
from llguidance import LLMatcher

REPO = Path(__file__).resolve().parents[1]
MODELS = ["mlxserve-test/tiny-qwen2-mlx", "mlxserve-test/tiny-qwen2-gguf"]
# Long enough that both runs generate exactly --tokens tokens.
LONG = {
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 4000}},
    "required": ["story"],
}
COMPILE_SCHEMAS = [
    {
        "type": "object",
        "properties": {f"f{i}": {"type": t} for i, t in enumerate(types)},
        "required": [f"f{i}" for i in range(len(types))],
    }
    for types in (["string"], ["integer", "boolean"], ["number", "string", "array"] * 4)
] + [
    {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "integer"},
                        "tags": {
                            "type": "array",
                            "items": {"type": "string", "enum": ["a", "b", "c"]},
                        },
                    },
                    "required": ["id"],
                },
            },
            "meta": {"$ref": "#/$defs/meta"},
        },
        "$defs": {
            "meta": {
                "type": "object",
                "properties": {"v": {"type": "string", "pattern": "^[0-9]+$"}},
            }
        },
    },
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def timed(client: httpx.Client, url: str, body: dict) -> tuple[float, int]:
    start = time.perf_counter()
    r = client.post(url, json=body, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - start, r.json()["usage"]["completion_tokens"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=REPO / ".cache" / "test-models")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    load_script("make_test_models").generate(
        args.models_dir, publisher="mlxserve-test", name="tiny-qwen2", seed=0
    )

    # Grammar compile time (schema -> grammar -> matcher on the real Qwen2 tokenizer).
    import llguidance.hf
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    hf_tok = AutoTokenizer.from_pretrained(
        str(args.models_dir / "mlxserve-test" / "tiny-qwen2-mlx")
    )
    # llguidance reads the fast (tokenizers) backend; the Qwen2 test model always has one.
    assert isinstance(hf_tok, PreTrainedTokenizerFast)
    tok = llguidance.hf.from_tokenizer(hf_tok)
    times = []
    for i in range(40):
        schema = dict(COMPILE_SCHEMAS[i % len(COMPILE_SCHEMAS)], title=f"s{i}")  # no caching
        t = time.perf_counter()
        g = LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_flexible": False})
        m = LLMatcher(tok, g)
        assert not m.is_error(), m.get_error()
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    p95 = times[int(len(times) * 0.95) - 1]
    print(
        f"schema compile: median {statistics.median(times):.2f} ms, p95 {p95:.2f} ms "
        f"({len(times)} schemas)"
    )

    port = free_port()
    home = tempfile.mkdtemp(prefix="mlxserve-bench-")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlxserve",
            "serve",
            "--port",
            str(port),
            "--models-dir",
            str(args.models_dir),
            "--log-level",
            "warning",
        ],
        env={**os.environ, "MLXSERVE_HOME": home},
    )
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        with httpx.Client() as client:
            for _ in range(100):
                try:
                    client.get(f"http://127.0.0.1:{port}/health", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.2)
            for model in MODELS:
                base = {
                    "model": model,
                    "temperature": 0,
                    "max_tokens": args.tokens,
                    "messages": [{"role": "user", "content": "Tell me a story."}],
                }
                free = {**base, "ignore_eos": True}
                constrained = {
                    **base,
                    "response_format": {
                        "type": "json_schema",
                        "json_schema": {"name": "story", "schema": LONG},
                    },
                }
                timed(client, url, free)
                timed(client, url, constrained)  # warm: load, tokenizer, grammar cache
                rates: dict[str, list[float]] = {"free": [], "json": []}
                for _ in range(args.runs):
                    for name, body in (("free", free), ("json", constrained)):
                        seconds, n = timed(client, url, body)
                        assert n == args.tokens, (name, n)
                        rates[name].append(n / seconds)
                free_rate = statistics.median(rates["free"])
                json_rate = statistics.median(rates["json"])
                print(
                    f"{model}: unconstrained {free_rate:.1f} tok/s, json_schema "
                    f"{json_rate:.1f} tok/s, ratio {json_rate / free_rate:.2f}"
                )
    finally:
        server.terminate()
        server.wait(timeout=20)
    print(json.dumps({"tokens": args.tokens, "runs": args.runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
