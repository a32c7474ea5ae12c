#!/usr/bin/env python3
"""Benchmark changed-middle prompt-cache reuse (not a test): agent-like sessions sent through
``/v1/messages`` to three servers over the same generated bench model: ``--cache-reuse N``,
``--cache-reuse 0`` (exact prefix reuse only) and no prompt cache (cold).

- ``header``: a system prompt whose first line (working directory, clock) changes every turn,
  then a long fixed part, then a history that grows by a tool result each turn.
- ``truncated``: the same history sent again with an earlier tool result cut in the middle.

For each, from turn 2 on: prompt tokens, tokens served from the cache, and the prefill time
(a request with ``max_tokens`` 1) against the cold server's. Medians over ``--rounds``
sessions (each with its own text), with the spread.

    .venv/bin/python scripts/bench_cache_reuse.py                 # quick model, MLX
    .venv/bin/python scripts/bench_cache_reuse.py --size full --formats mlx,gguf --rounds 3
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]


def _bench() -> Any:
    # The generated bench models and the server harness live in bench_common.py (bench.py
    # moved them there); this script is run as a file, so its folder is on sys.path.
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_common

    return bench_common


def words(rng: random.Random, n: int) -> str:
    vocab = [
        "build",
        "test",
        "cache",
        "module",
        "storage",
        "index",
        "commit",
        "branch",
        "merge",
        "fix",
        "log",
        "step",
    ]
    return " ".join(f"{rng.choice(vocab)}{rng.randrange(100)}" for _ in range(n))


def session(seed: int, system_words: int, turns: int) -> list[tuple[str, list[dict[str, Any]]]]:
    """The (system, messages) of each turn of one agent session with a changing header."""
    rng = random.Random(seed)
    body = words(rng, system_words)
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Fix the failing build."}]
    out = []
    for t in range(turns):
        header = f"cwd: /srv/build/{seed}  time: 05:{t:02d}:{rng.randrange(60):02d}  turn {t}"
        out.append((f"{header}\n{body}", [dict(m) for m in messages]))
        messages += [
            {"role": "assistant", "content": f"Running step {t}."},
            {"role": "user", "content": f"Output of step {t}:\n{words(rng, 100)}"},
        ]
    return out


def truncated(seed: int, system_words: int) -> list[tuple[str, list[dict[str, Any]]]]:
    """Two turns: a history, then the same with its first tool result cut in half."""
    rng = random.Random(seed)
    system = words(rng, system_words)
    results = [words(rng, 150) for _ in range(4)]
    history: list[dict[str, Any]] = [{"role": "user", "content": "Run the test suite."}]
    for i, text in enumerate(results):
        history += [
            {"role": "assistant", "content": f"Running part {i}."},
            {"role": "user", "content": f"Output of part {i}:\n{text}"},
        ]
    cut = [dict(m) for m in history]
    cut[2]["content"] = cut[2]["content"][: len(cut[2]["content"]) // 2] + "\n[... cut ...]"
    cut.append({"role": "assistant", "content": "Summarising."})
    cut.append({"role": "user", "content": "Go on."})
    return [(system, history), (system, cut)]


def ask(client: httpx.Client, model: str, system: str, messages: list[dict[str, Any]]) -> tuple:
    body = {"model": model, "system": system, "messages": messages, "max_tokens": 1}
    t0 = time.perf_counter()
    r = client.post("/v1/messages", json=body)
    seconds = time.perf_counter() - t0
    if r.status_code != 200:
        raise SystemExit(f"{r.status_code} from {model}: {r.text}")
    u = r.json()["usage"]
    read = u.get("cache_read_input_tokens") or 0
    prompt = u["input_tokens"] + read + (u.get("cache_creation_input_tokens") or 0)
    return prompt, read, seconds


def spread(values: list[float]) -> str:
    med = statistics.median(values)
    return f"{med:.3f} ({min(values):.3f}-{max(values):.3f})" if len(values) > 1 else f"{med:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["quick", "full"], default="quick")
    parser.add_argument("--formats", default="mlx", help="comma-separated: mlx,gguf")
    parser.add_argument("--cache-reuse", type=int, default=256)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-words", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)
    bench = _bench()
    root = REPO / ".cache" / "bench-models"
    bench.make_model(root, args.size)
    servers = {
        f"reuse {args.cache_reuse}": ["--cache-reuse", str(args.cache_reuse)],
        "reuse 0": ["--cache-reuse", "0"],
        "cold": ["--prompt-cache-bytes", "0"],
    }
    rows = [("format", "scenario", "server", "cached / prompt", "prefill s", "÷ cold")]
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats.split(","):
            model = f"{bench.PUBLISHER}/bench-qwen2-{args.size}-{fmt}"
            figures: dict[tuple[str, str], list[tuple[int, int, float]]] = {}
            for name, extra in servers.items():
                argv_ = [sys.executable, "-m", "mlxserve", "serve", "--port", "{port}"]
                argv_ += ["--models-dir", str(root), *extra]
                env = {"MLXSERVE_HOME": tmp, "MLXSERVE_DEFAULT_CONTEXT_LENGTH": "8192"}
                srv = bench.Server(f"{fmt}-{name.replace(' ', '')}", model, argv_, env)
                srv.start(Path(tmp))
                try:
                    with httpx.Client(base_url=srv.url, timeout=900) as client:
                        ask(client, model, "warm-up", [{"role": "user", "content": "hi"}])
                        for r in range(args.rounds):
                            for scenario, turns in (
                                ("header", session(r, args.system_words, args.turns)),
                                ("truncated", truncated(1000 + r, args.system_words)),
                            ):
                                got = [ask(client, model, s, m) for s, m in turns]
                                print(f"{fmt} {name} {scenario}: {got}", file=sys.stderr)
                                figures.setdefault((scenario, name), []).append(
                                    tuple(map(sum, zip(*got[1:], strict=True)))  # type: ignore[arg-type]
                                )
                finally:
                    srv.stop()
            for scenario in ("header", "truncated"):
                cold = [s for _, _, s in figures[(scenario, "cold")]]
                for name in servers:
                    runs = figures[(scenario, name)]
                    prompt, read = runs[0][0], runs[0][1]
                    ratios = [s / c for (_, _, s), c in zip(runs, cold, strict=True)]
                    rows.append(
                        (
                            fmt,
                            scenario,
                            name,
                            f"{read} / {prompt} ({read / prompt:.0%})",
                            spread([s for _, _, s in runs]),
                            spread(ratios),
                        )
                    )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
