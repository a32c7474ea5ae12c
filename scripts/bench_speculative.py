"""Speculative-decoding figures of scripts/bench.py --engine-features, and the model pairs
they need: a draft several times cheaper than its model that agrees with it (high
acceptance), and one that does not (low acceptance).

A decode step of these generated models is mostly the f32 output projection over the
152k-token vocabulary, so a draft is cheaper only with a narrower hidden size. The "wide"
model (hidden 256) is built to compute exactly what the tiny model (hidden 64) computes: the
tiny weights fill the first 64 dimensions and the first heads of its first layers, every other
weight is zero, and its norms are halved (an RMS over 256 dimensions of which 192 are zero is
half the RMS over the 64). It costs about four tiny models per token and the tiny model's
greedy proposals are its own greedy tokens. A tiny model of another seed drafts badly.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from bench_common import PUBLISHER, REPO, SIZES, Server, load_script, stream_once, unique_prompt

# The wide model's (hidden, intermediate, layers, heads, kv heads): heads as wide as the tiny
# model's (16), so its heads and their grouping over the KV heads line up with the tiny ones.
WIDE = (256, 512, 4, 16, 8)
# In the names: a change to the construction is a new model, not a stale cached one.
WIDE_NAME, DRAFT_NAME, STRANGER_NAME = (
    "bench-qwen2-wide1",
    "bench-qwen2-tiny",
    "bench-qwen2-tiny-s1",
)


def _widen(small: dict[str, np.ndarray], sizes: tuple[int, ...], n_layers: int) -> Any:
    """The wide model's weights (Hugging Face names) computing what ``small`` computes."""
    hidden, inter, _, heads, kv_heads = SIZES["tiny"]
    wide_hidden, wide_inter, _, wide_heads, wide_kv = sizes
    head = hidden // heads
    shapes = {
        "self_attn.q_proj.weight": (wide_heads * head, wide_hidden),
        "self_attn.k_proj.weight": (wide_kv * head, wide_hidden),
        "self_attn.v_proj.weight": (wide_kv * head, wide_hidden),
        "self_attn.q_proj.bias": (wide_heads * head,),
        "self_attn.k_proj.bias": (wide_kv * head,),
        "self_attn.v_proj.bias": (wide_kv * head,),
        "self_attn.o_proj.weight": (wide_hidden, wide_heads * head),
        "mlp.gate_proj.weight": (wide_inter, wide_hidden),
        "mlp.up_proj.weight": (wide_inter, wide_hidden),
        "mlp.down_proj.weight": (wide_hidden, wide_inter),
    }

    def embed(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        out = np.zeros(shape, np.float32)
        out[tuple(slice(0, n) for n in a.shape)] = a
        return out

    half = np.full(wide_hidden, 0.5, np.float32)
    embedding = small["model.embed_tokens.weight"]
    w = {"model.embed_tokens.weight": embed(embedding, (embedding.shape[0], wide_hidden))}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        for name, shape in shapes.items():
            # Layers past the tiny model's are all zeros: they add cost, not change.
            w[p + name] = (
                embed(small[p + name], shape) if p + name in small else np.zeros(shape, np.float32)
            )
        w[p + "input_layernorm.weight"] = half
        w[p + "post_attention_layernorm.weight"] = half
    w["model.norm.weight"] = half
    assert inter <= wide_inter and head * heads <= wide_hidden
    return w


def make_pairs(root: Path) -> dict[str, dict[str, Path]]:
    """The wide model, its faithful tiny draft and a tiny draft of another seed (cached)."""
    tiny = load_script("make_test_models")
    tiny.HIDDEN, tiny.INTERMEDIATE, tiny.LAYERS, tiny.HEADS, tiny.KV_HEADS = SIZES["tiny"]
    wide = load_script("make_test_models")
    wide.HIDDEN, wide.INTERMEDIATE, wide.LAYERS, wide.HEADS, wide.KV_HEADS = WIDE
    wide.make_weights = lambda seed, n_vocab: _widen(
        tiny.make_weights(seed, n_vocab), WIDE, WIDE[2]
    )
    return {
        WIDE_NAME: wide.generate(root, publisher=PUBLISHER, name=WIDE_NAME, seed=0),
        DRAFT_NAME: tiny.generate(root, publisher=PUBLISHER, name=DRAFT_NAME, seed=0),
        STRANGER_NAME: tiny.generate(root, publisher=PUBLISHER, name=STRANGER_NAME, seed=1),
    }


def inproc_mlx_pair(n: int, rounds: int, k: int = 4) -> dict[str, float]:
    """mlx-lm alone in this process on the high-acceptance pair (the server's baseline):
    ``speculative_generate_step``'s decode tok/s ÷ ``generate_step``'s (alternating,
    medians), and the wide model's forward over ``k + 1`` tokens (a verification) ÷ over one
    (a plain step), medians of 5 each."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step, speculative_generate_step
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

    paths = make_pairs(REPO / ".cache" / "bench-models")
    model, tokenizer = load(str(paths[WIDE_NAME]["mlx"]))[:2]
    draft = load(str(paths[DRAFT_NAME]["mlx"]))[0]

    def rate(steps: Any) -> float:
        times = [time.perf_counter() for _, _ in zip(steps, range(n), strict=False)]
        return (len(times) - 1) / (times[-1] - times[0])

    rates: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds):
        for drafted in (r % 2 == 0, r % 2 == 1):
            prompt = mx.array(tokenizer.encode(unique_prompt(f"in{r}{int(drafted)}", 64)))
            rates[drafted].append(
                rate(speculative_generate_step(prompt, model, draft, num_draft_tokens=k))
                if drafted
                else rate(generate_step(prompt, model))
            )
    cache = make_prompt_cache(model)
    model(mx.array(tokenizer.encode(unique_prompt("rows", 64)))[None], cache=cache)
    mx.eval([c.state for c in cache])
    cost: dict[int, list[float]] = {1: [], k + 1: []}
    for _ in range(5):
        for rows in cost:
            t0 = time.perf_counter()
            mx.eval(model(mx.array([list(range(100, 100 + rows))]), cache=cache))
            cost[rows].append(time.perf_counter() - t0)
            trim_prompt_cache(cache, rows)
    return {
        "draft_high_acceptance_inproc_decode_vs_none": statistics.median(rates[True])
        / statistics.median(rates[False]),
        f"verify_{k + 1}_rows_vs_1_row_inproc": statistics.median(cost[k + 1])
        / statistics.median(cost[1]),
    }


async def _drafted_vs_plain(
    client: httpx.AsyncClient, server: Server, draft: str, n: int, rounds: int, tag: str
) -> tuple[float, float]:
    """One stream's decode tok/s with ``draft`` ÷ without (alternating, medians), and the
    share of proposals accepted (LM Studio's counts, from /api/v0's stats)."""
    extra = {"draft_model": draft, "num_draft_tokens": 4}
    rates: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds):
        for drafted in (r % 2 == 0, r % 2 == 1):
            prompt = unique_prompt(f"{tag}{r}{int(drafted)}", 64)
            s = await stream_once(client, server, prompt, n, extra if drafted else None)
            rates[drafted].append(s.decode_tps)
    body = {"model": server.model, "prompt": unique_prompt(f"{tag}acc", 64), "max_tokens": n}
    r_ = await client.post(
        server.url + "/api/v0/completions", json={**body, "temperature": 0, **extra}
    )
    stats = r_.json()["stats"]
    accepted = stats["accepted_draft_tokens_count"] / max(1, stats["total_draft_tokens_count"])
    return statistics.median(rates[True]) / statistics.median(rates[False]), accepted


async def speculative(
    server: Server, fmt: str, out_tokens: int, rounds: int, pairs: bool
) -> dict[str, float]:
    """The model drafting for itself (acceptance 100%, the draft as costly as the model): one
    stream's decode tok/s with the draft ÷ without; a non-drafted stream's decode tok/s
    beside a drafted one ÷ alone (the cost a drafted request puts on the batch); with
    ``pairs``, the wide model drafted by its faithful tiny draft (high acceptance, a draft
    about 4× cheaper) and by a tiny model of another seed (low acceptance). Medians."""
    n, rounds = 2 * out_tokens, max(3, 2 * rounds)
    figs: dict[str, float] = {}
    rates: dict[str, list[float]] = {"alone": [], "beside": []}
    async with httpx.AsyncClient(timeout=600) as client:
        figs["draft_self_decode_vs_none"], _ = await _drafted_vs_plain(
            client, server, server.model, n, rounds, "sd"
        )
        draft = {"draft_model": server.model, "num_draft_tokens": 4}
        for r in range(rounds):
            alone = await stream_once(client, server, unique_prompt(f"sa{r}", 64), n)
            rates["alone"].append(alone.decode_tps)
            _, beside = await asyncio.gather(
                stream_once(client, server, unique_prompt(f"sx{r}", 64), 2 * n, draft),
                stream_once(client, server, unique_prompt(f"sb{r}", 64), n),
            )
            rates["beside"].append(beside.decode_tps)
        figs["plain_stream_beside_drafted_vs_alone"] = statistics.median(
            rates["beside"]
        ) / statistics.median(rates["alone"])
        if not pairs:
            return figs
        model = server.model
        server.model = f"{PUBLISHER}/{WIDE_NAME}-{fmt}"
        try:
            await stream_once(client, server, "warm up", 4)  # loads it
            for name, label in ((DRAFT_NAME, "high"), (STRANGER_NAME, "low")):
                key = f"{PUBLISHER}/{name}-{fmt}"
                ratio, accepted = await _drafted_vs_plain(client, server, key, n, rounds, label)
                figs[f"draft_{label}_acceptance_decode_vs_none"] = ratio
                figs[f"draft_{label}_acceptance_accepted_share"] = accepted
            if fmt == "mlx":
                figs.update(inproc_mlx_pair(n, rounds))
        finally:
            await client.post(
                server.url + "/api/v1/models/unload", json={"instance_id": server.model}
            )
            server.model = model
    return figs
