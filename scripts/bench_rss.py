"""The peak-RSS figure of scripts/bench.py alone (``--rss``): our server's resident memory
while 8 streams decode ÷ the same model generating as many replies in a fresh process, with
what the server holds at each stage beside it (idle, the model loaded, the peak) and the KV
any windows it reserves beyond the in-process baseline's one hold (none by default)."""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
from bench import Mode, concurrent, format_mode, loaded_context
from bench_common import (
    fmt_table,
    machine,
    our_server,
    peak_rss,
    print_timings,
    prompt_cache_held,
    stream_once,
    targets,
    timed,
)
from bench_inproc import inproc_peak_rss

MB = 1_000_000
GOALS = {"peak_rss_8_vs_inproc": "<= 1.2"}


async def _kv_part(server: Any) -> tuple[int, int]:
    """The guardrail's KV part of our server's current model, and its windows."""
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        loaded = (await client.get("/api/v1/models/loaded")).json()["instances"]
    memory = next(i["memory"] for i in loaded if i["id"] == server.model)
    return int(memory["kv_cache_bytes"]), int(memory["kv_windows"])


async def rss_only(args: argparse.Namespace, mode: Mode) -> dict[str, Any]:
    """Only the peak-RSS figures, one format after the other, each on a server of its own
    (so the idle figure is a fresh server's)."""
    root, found = targets(args, mode.size)
    top = max(mode.concurrency)
    results: dict[str, Any] = {"mode": mode.size, "machine": machine(), "figures": {}}
    rows: list[tuple[str, str, str]] = []
    timings: dict[str, float] = {}
    for fmt in args.formats:
        target = found[fmt]
        out_tokens = format_mode(mode, fmt).out_tokens
        home = Path(tempfile.mkdtemp(prefix="mlxserve-bench-"))
        ours = our_server(root, home, target.key)
        try:
            ours.start(home)
            time.sleep(1.0)
            idle = ours.rss()
            with timed(timings, f"{fmt} load"):
                async with httpx.AsyncClient(timeout=600) as client:
                    await stream_once(client, ours, "warm up", 4)
            loaded = ours.rss()
            held = partial(prompt_cache_held, ours)
            with timed(timings, f"{fmt} {top} streams"), peak_rss(ours, held) as peak:
                await concurrent(ours, top, out_tokens, f"rss{fmt}")
            served = peak.rss
            context = await loaded_context(ours)
            kv, windows = await _kv_part(ours)
        finally:
            ours.stop()
        with timed(timings, f"{fmt} in-process peak RSS"):
            inproc = inproc_peak_rss(fmt, target.path, top, out_tokens, context)
        figs = {
            "server_idle_rss_mb": idle / MB,
            "server_loaded_rss_mb": loaded / MB,
            f"server_peak_rss_{top}_mb": served / MB,
            "inproc_peak_rss_mb": inproc / MB,
            "peak_rss_8_vs_inproc": served / inproc,
            # Of the peak, what the prompt cache held beside the windows.
            "server_peak_prompt_cache_mb": peak.beside / MB,
            "peak_rss_8_less_prompt_cache_vs_inproc": (served - peak.beside) / inproc,
            # GGUF: llama.cpp reserves (and clears) every window the load asks for (one pool
            # by default, --kv-windows N for more); the baseline decodes in one window.
            "kv_windows_beyond_one_mb": kv * (windows - 1) / windows / MB if fmt == "gguf" else 0,
        }
        results["figures"][fmt] = figs
        rows += [(f"{fmt} {k}", f"{v:.3f}", GOALS.get(k, "reported")) for k, v in figs.items()]
    print(fmt_table(rows))
    print_timings(timings)
    results["timings"] = timings
    return results
