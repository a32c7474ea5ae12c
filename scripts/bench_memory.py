"""Memory benchmark: the loading guardrail's estimate of a model against the server's
measured resident-memory growth, part by part, through a real mlxserve server per model.

For each model it starts a server, loads the model once and unloads it (libraries imported,
allocator warm), then reads how much the server's RSS (Linux ``/proc``) grows from there:
- after the load (weights, and what the engine allocates up front: llama.cpp's windows);
- after ``parallel`` concurrent requests with prompts of about the whole context (every KV
  window filled once);
- after distinct long prompts that fill the MLX prompt cache to its budget;
- for a vision model, after a request with an image of the model's largest size.
and prints each beside the estimate (``/api/v1/models/loaded`` ``memory``).

    .venv/bin/python scripts/bench_memory.py [--model KEY ...] [--context 2048]
        [--parallel 4] [--prompt-cache-mb 32] [--json out.json]

Default models: the tiny Qwen2 (MLX, GGUF) and the tiny Qwen2-VL (MLX, GGUF + projector),
generated under .cache/ if missing.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from bench_common import load_script

REPO = Path(__file__).resolve().parents[1]
PUBLISHER = "mlxserve-test"
TEXT = [f"{PUBLISHER}/tiny-qwen2-mlx", f"{PUBLISHER}/tiny-qwen2-gguf"]
VISION = [f"{PUBLISHER}/tiny-qwen2-vl-mlx", f"{PUBLISHER}/tiny-qwen2-vl-gguf"]
MB = 1_000_000


def _models_dir() -> Path:
    """One folder with the tiny text and vision models (generated once, cached)."""
    root = REPO / ".cache" / "memory-bench-models"
    text_root = REPO / ".cache" / "test-models"
    vision_root = REPO / ".cache" / "vision-models"
    load_script("make_test_models").generate(
        text_root, publisher=PUBLISHER, name="tiny-qwen2", seed=0
    )
    load_script("make_vision_models").generate(vision_root, publisher=PUBLISHER)
    for source, keys in ((text_root, TEXT), (vision_root, VISION)):
        for key in keys:
            link = root / key
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to((source / key).resolve(), target_is_directory=True)
    return root


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Server:
    def __init__(self, models: Path, home: Path, *extra: str) -> None:
        self.url = f"http://127.0.0.1:{_free_port()}"
        env = {**os.environ, "MLXSERVE_HOME": str(home), "PYTHONPATH": str(REPO)}
        env |= {"MLXSERVE_LMSTUDIO_MODELS": "false", "MLXSERVE_HF_CACHE_MODELS": "false"}
        port = self.url.rsplit(":", 1)[1]
        args = ["serve", "--port", port, "--models-dir", str(models), "--no-guardrail"]
        self._log = open(home / "server.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlxserve", *args, *extra],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError("the server did not start")

    def settle(self) -> int:
        """RSS once it stops moving (freed buffers handed back, lazy work done)."""
        last = _rss(self.proc.pid)
        for _ in range(10):
            time.sleep(0.5)
            now = _rss(self.proc.pid)
            if abs(now - last) < MB:
                return now
            last = now
        return last

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def _prompt(seed: int, words: int) -> str:
    rng = np.random.default_rng(seed)
    vocab = ["apple", "river", "stone", "cloud", "music", "garden", "window", "silver"]
    return " ".join(vocab[i] for i in rng.integers(0, len(vocab), words))


def _chat(url: str, key: str, content: Any, max_tokens: int = 4) -> int:
    body = {
        "model": key,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    return int(r.json()["usage"]["prompt_tokens"])


def _image_url(side: int) -> str:
    from PIL import Image

    pixels = (np.random.default_rng(7).random((side, side, 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def measure(models: Path, key: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as home:
        extra = ["--prompt-cache-bytes", str(args.prompt_cache_mb * MB)]
        server = _Server(models, Path(home), *extra)
        try:
            load = {"model": key, "context_length": args.context, "parallel": args.parallel}
            # A first load and unload imports the libraries and warms the allocator: what
            # the second load adds is the model's own.
            r = httpx.post(server.url + "/api/v1/models/load", json=load, timeout=600)
            r.raise_for_status()
            _chat(server.url, key, "Hi")
            unload = {"instance_id": r.json()["instance_id"]}
            httpx.post(server.url + "/api/v1/models/unload", json=unload, timeout=600)
            base = server.settle()
            r = httpx.post(server.url + "/api/v1/models/load", json=load, timeout=600)
            r.raise_for_status()
            (instance,) = httpx.get(server.url + "/api/v1/models/loaded").json()["instances"]
            memory = instance["memory"]
            row: dict[str, Any] = {"model": key, "estimate": memory}
            row["loaded"] = server.settle() - base
            # Words of the tiny vocabulary are about one token each, the template ~20 more.
            words = args.context - 64
            with ThreadPoolExecutor(args.parallel) as pool:
                list(pool.map(lambda i: _chat(server.url, key, _prompt(i, words)), range(8)))
            row["windows_filled"] = server.settle() - base
            per_token = memory["kv_cache_bytes"] // max(memory["kv_windows"] * args.context, 1)
            entries = memory["prompt_cache_bytes"] // max(per_token * words, 1) + 1
            for i in range(entries):
                _chat(server.url, key, _prompt(100 + i, words))
            row["cache_filled"] = server.settle() - base
            if memory.get("vision_bytes"):
                question = [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": _image_url(args.image_side)}},
                ]
                _chat(server.url, key, question)
                row["image"] = server.settle() - base
            return row
        finally:
            server.stop()


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / MB:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="model key (default: the tiny ones)")
    parser.add_argument("--models-dir", type=Path, help="where --model keys lie")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--prompt-cache-mb", type=int, default=32)
    parser.add_argument("--image-side", type=int, default=448, help="pixels (the tiny VL's max)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    models = args.models_dir or _models_dir()
    rows = [measure(models, key, args) for key in args.model or [*TEXT, *VISION]]
    head = (
        "model", "est weights", "est KV", "est cache", "est vision", "est scores",
        "est runtime", "est total",
        "RSS loaded", "+windows", "+cache", "+image", "est/RSS",
    )  # fmt: skip
    print(f"context {args.context}, parallel {args.parallel}, MB = 10^6 bytes")
    print(" | ".join(head))
    for row in rows:
        est = row["estimate"]
        grown = max(row[k] for k in ("cache_filled", "image") if k in row)
        print(
            " | ".join(
                [
                    row["model"],
                    _mb(est["weights_bytes"]),
                    _mb(est["kv_cache_bytes"]),
                    _mb(est["prompt_cache_bytes"]),
                    _mb(est["vision_bytes"]),
                    _mb(est["compute_bytes"]),
                    _mb(est.get("runtime_bytes")),
                    _mb(est["total_bytes"]),
                    _mb(row["loaded"]),
                    _mb(row["windows_filled"]),
                    _mb(row["cache_filled"]),
                    _mb(row.get("image")),
                    f"{est['total_bytes'] / max(grown, 1):.2f}",
                ]
            )
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
