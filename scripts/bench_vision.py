"""Vision benchmark: time to first token with one image, the second turn's with the image in
the prompt cache, a vision model's text-only decode speed against the same weights' text
model, and the aggregate decode rate of 2 image + 2 text streams at once against 4 text
streams, through a real mlxserve server on the tiny Qwen2-VL of make_vision_models.py
(MLX and GGUF + projector). Prints a table and writes JSON; figures in docs/benchmarks.md.

    .venv/bin/python scripts/bench_vision.py [--rounds 5] [--formats mlx gguf] [--json out.json]

``--stall`` measures instead how long running streams wait while an image request is
admitted: the longest gap between tokens of three running text streams from the image
request's arrival to its first token (a long text part and two 448x448 images), against
their median gap (one decode step).

    .venv/bin/python scripts/bench_vision.py --stall --formats gguf [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from bench_common import load_script, unique_prompt

REPO = Path(__file__).resolve().parents[1]
PUBLISHER = "mlxserve-test"
VL = {"mlx": f"{PUBLISHER}/tiny-qwen2-vl-mlx", "gguf": f"{PUBLISHER}/tiny-qwen2-vl-gguf"}
TEXT = {"mlx": f"{PUBLISHER}/tiny-qwen2-mlx", "gguf": f"{PUBLISHER}/tiny-qwen2-gguf"}
# 448x448 pixels: 256 image tokens on Qwen2-VL (the tiny model's largest resolution).
IMAGE_SIZE = 448
DECODE_TOKENS = 128


def _image(seed: int) -> str:
    from PIL import Image

    pixels = np.random.default_rng(seed).random((IMAGE_SIZE, IMAGE_SIZE, 3)) * 255
    buf = io.BytesIO()
    Image.fromarray(pixels.astype("uint8")).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stream(url: str, body: dict[str, Any]) -> tuple[float, float, int]:
    """(seconds to the first content token, seconds from it to the last, tokens after it)."""
    start = time.perf_counter()
    first = last = 0.0
    n = 0
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"]
            if delta and delta[0]["delta"].get("content"):
                now = time.perf_counter()
                if not first:
                    first = now
                else:
                    n += 1
                last = now
    return first - start, last - first, n


def _chat(content: list[dict[str, Any]] | str, model: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 8,
        **extra,
    }


def _aggregate(chat: str, bodies: list[dict[str, Any]]) -> float:
    """Tokens per second of ``bodies`` streamed at once, from the first request to the end
    of the last (the image prompts' prefill included)."""
    start = time.perf_counter()
    with ThreadPoolExecutor(len(bodies)) as pool:
        done = list(pool.map(lambda b: _stream(chat, b), bodies))
    seconds = time.perf_counter() - start
    return sum(n + 1 for _, _, n in done) / seconds


def bench(url: str, fmt: str, rounds: int) -> dict[str, float]:
    chat = url + "/v1/chat/completions"
    vl, text = VL[fmt], TEXT[fmt]
    question = {"type": "text", "text": "What is in this picture?"}
    for model in (vl, text):  # load both, warm up
        _stream(chat, _chat([{"type": "image_url", "image_url": {"url": _image(0)}}, question], vl))
        _stream(chat, _chat("Hello", model))
    cold, warm, ratio_rows, mixed, texts = [], [], [], [], []
    for r in range(rounds):
        image = {"type": "image_url", "image_url": {"url": _image(1000 + r)}}
        ttft, _, _ = _stream(chat, _chat([image, question], vl, max_tokens=4))
        cold.append(ttft)
        # The second turn of the same chat: the image is in the prompt cache (MLX).
        first = httpx.post(chat, json=_chat([image, question], vl, max_tokens=4), timeout=600)
        reply = first.json()["choices"][0]["message"]["content"]
        turn2 = {
            "model": vl,
            "messages": [
                {"role": "user", "content": [image, question]},
                {"role": "assistant", "content": reply},
                {"role": "user", "content": "And its colours?"},
            ],
            "temperature": 0,
            "max_tokens": 4,
        }
        ttft2, _, _ = _stream(chat, turn2)
        warm.append(ttft2)
        rates = []
        for model in (vl, text):
            body = _chat("Tell me a long story.", model, max_tokens=DECODE_TOKENS, ignore_eos=True)
            _, seconds, n = _stream(chat, body)
            rates.append(n / seconds)
        ratio_rows.append(rates)
        story = "Tell me a long story."
        long = {"max_tokens": DECODE_TOKENS, "ignore_eos": True}
        pictures = [
            {"type": "image_url", "image_url": {"url": _image(2000 + 2 * r + i)}} for i in (0, 1)
        ]
        mixed.append(
            _aggregate(
                chat,
                [_chat([p, question], vl, **long) for p in pictures]
                + [_chat(f"{story} ({i})", vl, **long) for i in (0, 1)],
            )
        )
        texts.append(_aggregate(chat, [_chat(f"{story} ({i})", vl, **long) for i in range(4)]))
    vl_rate = statistics.median(r[0] for r in ratio_rows)
    text_rate = statistics.median(r[1] for r in ratio_rows)
    return {
        "ttft_one_image_s": statistics.median(cold),
        "ttft_second_turn_s": statistics.median(warm),
        "vision_text_decode_tok_s": vl_rate,
        "text_model_decode_tok_s": text_rate,
        "decode_ratio": vl_rate / text_rate,
        "aggregate_2_image_2_text_tok_s": statistics.median(mixed),
        "aggregate_4_text_tok_s": statistics.median(texts),
    }


async def _token_times(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], times: list[float] | None = None
) -> tuple[float, list[float]]:
    """(when the request was sent, when each content token arrived: appended to ``times``
    as they come), perf_counter seconds."""
    sent = time.perf_counter()
    times = [] if times is None else times
    async with client.stream("POST", url, json={**body, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"]
            if delta and delta[0]["delta"].get("content"):
                times.append(time.perf_counter())
    return sent, times


async def _stall_round(url: str, fmt: str, r: int) -> tuple[float, float, float]:
    """(longest gap of 3 running streams while an image request is admitted, their median
    gap, the image request's time to first token). Fresh words and images every round: the
    prompt cache must not serve them. The running streams are cut off half a second after
    the image request's first token."""
    chat = url + "/v1/chat/completions"
    vl = VL[fmt]
    streams: list[list[float]] = [[], [], []]
    async with httpx.AsyncClient(timeout=600) as client:
        runners = [
            asyncio.create_task(
                _token_times(
                    client,
                    chat,
                    _chat(unique_prompt(f"run{r}x{i}", 16), vl, max_tokens=3000, ignore_eos=True),
                    times,
                )
            )
            for i, times in enumerate(streams)
        ]
        while min(len(t) for t in streams) < 8:
            await asyncio.sleep(0.05)
        pictures = [
            {"type": "image_url", "image_url": {"url": _image(5000 + 2 * r + i)}} for i in (0, 1)
        ]
        text = {"type": "text", "text": unique_prompt(f"long{r}", 600)}
        sent, first = await _token_times(client, chat, _chat([*pictures, text], vl, max_tokens=2))
        await asyncio.sleep(0.5)
        if any(r.done() for r in runners):
            raise RuntimeError("a running stream ended before the image request's first token")
        for runner in runners:
            runner.cancel()
        await asyncio.gather(*runners, return_exceptions=True)
    end = first[0] if first else sent
    gaps, steady = [], []
    for times in streams:
        pairs = list(zip(times, times[1:], strict=False))
        gaps += [b - a for a, b in pairs if b >= sent and a <= end]
        steady += [b - a for a, b in pairs if b < sent]
    return max(gaps, default=0.0), statistics.median(steady), end - sent


def stall(url: str, fmt: str, rounds: int) -> dict[str, float]:
    """Medians over ``rounds`` of :func:`_stall_round`'s figures, after a warm-up."""
    _stream(url + "/v1/chat/completions", _chat("Hello", VL[fmt]))  # load it
    asyncio.run(_stall_round(url, fmt, -1))
    got = [asyncio.run(_stall_round(url, fmt, r)) for r in range(rounds)]
    for r, g in enumerate(got):
        print(f"{fmt} round {r}: longest gap {g[0] * 1000:.0f} ms, one step {g[1] * 1000:.0f} ms")
    return {
        "stall_max_gap_ms": statistics.median(g[0] for g in got) * 1000,
        "stall_step_ms": statistics.median(g[1] for g in got) * 1000,
        "stall_image_ttft_ms": statistics.median(g[2] for g in got) * 1000,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--formats", nargs="+", choices=["mlx", "gguf"], default=["mlx", "gguf"])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--stall", action="store_true", help="the stall of running streams an image causes"
    )
    args = parser.parse_args(argv)
    root = REPO / ".cache" / "vision-models"
    load_script("make_vision_models").generate(root, publisher=PUBLISHER)
    text_models = load_script("make_test_models").generate(
        REPO / ".cache" / "test-models", publisher=PUBLISHER, name="tiny-qwen2"
    )
    for fmt in ("mlx", "gguf"):
        link = root / TEXT[fmt]
        if not link.exists():
            target = text_models[fmt] if fmt == "mlx" else text_models[fmt].parent
            link.symlink_to(target, target_is_directory=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as home:
        env = {
            **os.environ,
            "MLXSERVE_HOME": home,
            "MLXSERVE_LMSTUDIO_MODELS": "false",
            "MLXSERVE_HF_CACHE_MODELS": "false",
        }
        cmd = [
            sys.executable,
            "-m",
            "mlxserve",
            "serve",
            "--port",
            str(port),
            "--models-dir",
            str(root),
            "--no-auto-evict",
        ]
        server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the server did not start")
                time.sleep(0.3)
            measure = stall if args.stall else bench
            results = {fmt: measure(url, fmt, args.rounds) for fmt in args.formats}
        finally:
            server.terminate()
            server.wait(timeout=30)
    if args.stall:
        print(f"{'':6} {'longest gap':>12} {'one step':>9} {'image TTFT':>11}")
        for fmt, r in results.items():
            print(
                f"{fmt:6} {r['stall_max_gap_ms']:>10.0f}ms {r['stall_step_ms']:>7.0f}ms "
                f"{r['stall_image_ttft_ms']:>9.0f}ms"
            )
        return _report(args, results)
    print(
        f"{'':6} {'TTFT 1 image':>13} {'TTFT turn 2':>12} {'VL text tok/s':>14} "
        f"{'text tok/s':>11} {'ratio':>6} {'2img+2text tok/s':>17} {'4text tok/s':>12}"
    )
    for fmt, r in results.items():
        print(
            f"{fmt:6} {r['ttft_one_image_s'] * 1000:>11.0f}ms "
            f"{r['ttft_second_turn_s'] * 1000:>10.0f}ms "
            f"{r['vision_text_decode_tok_s']:>14.1f} {r['text_model_decode_tok_s']:>11.1f} "
            f"{r['decode_ratio']:>6.2f} {r['aggregate_2_image_2_text_tok_s']:>17.1f} "
            f"{r['aggregate_4_text_tok_s']:>12.1f}"
        )
    return _report(args, results)


def _report(args: argparse.Namespace, results: dict[str, dict[str, float]]) -> int:
    report = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "rounds": args.rounds,
        "image_pixels": f"{IMAGE_SIZE}x{IMAGE_SIZE}",
        "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
