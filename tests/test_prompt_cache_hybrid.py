"""Prompt-cache checkpoints for models whose caches cannot be cut back to an earlier prefix:
recurrent layers (Qwen3.5's Gated DeltaNet, ``ArraysCache`` on MLX, llama.cpp's hybrid memory
on GGUF) and sliding windows (Gemma 3, ``RotatingKVCache``). An entry of such a model is
reusable only at exactly its length; the engines keep one at the end of each prompt and one
at the end of each reply."""

from __future__ import annotations

import asyncio
from pathlib import Path

import mlx.core as mx
import openai
import pytest
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache
from script_loader import load_script

from backends import open_engine
from backends.base import CHECKPOINT_TAIL, Engine, LoadOptions
from backends.mlx.prompt_cache import PromptCache
from tests.conftest import PUBLISHER, Server
from tests.engine_harness import generate

REPO = Path(__file__).resolve().parents[1]
MODELS = ["tiny-qwen35-hybrid", "tiny-gemma3-sliding"]
ENGINES = ["mlx/tiny-qwen35-hybrid", "mlx/tiny-gemma3-sliding", "gguf/tiny-qwen35-hybrid"]
HYBRID_KEY = f"{PUBLISHER}/tiny-qwen35-hybrid-mlx"
CHAT = "<|im_start|>{}\n{}<|im_end|>\n"


@pytest.fixture(scope="module")
def hybrid_models(models_root) -> Path:
    module = load_script("make_hybrid_models")
    for name in MODELS:
        module.generate(models_root, name, PUBLISHER)
    return models_root


def _open(root: Path, fmt: str, name: str, **options: int) -> Engine:
    path = root / PUBLISHER / f"{name}-{fmt}"
    if fmt == "gguf":
        path = path / f"{name}-f32.gguf"
    return open_engine(fmt, path, LoadOptions(context_length=2048, **options))  # type: ignore[arg-type]


# --- the cache itself ---------------------------------------------------------------------


def arrays(n_tokens: int) -> ArraysCache:
    c = ArraysCache(2)
    c[0] = mx.full((1, 3, 8), float(n_tokens))
    c[1] = mx.full((1, 2, 4, 4), float(n_tokens) + 0.5)
    return c


def kv(n: int) -> KVCache:
    c = KVCache()
    c.update_and_fetch(mx.ones((1, 2, n, 4)), mx.ones((1, 2, n, 4)))
    return c


def rotating(n: int, window: int = 4) -> RotatingKVCache:
    c = RotatingKVCache(window)
    for i in range(n):  # one token at a time: the ring buffer wraps around
        c.update_and_fetch(mx.full((1, 1, 1, 2), float(i)), mx.full((1, 1, 1, 2), float(i)))
    return c


def test_a_checkpoint_serves_only_prompts_it_is_a_prefix_of_at_its_length():
    cache = PromptCache(1 << 20)
    cache.store([1, 2, 3, 4], [arrays(4), kv(4)])
    views, n = cache.fetch([1, 2, 3, 4, 5, 6])
    assert n == 4 and views is not None
    assert type(views[0]) is ArraysCache and views[1].offset == 4
    # A plain KV entry would serve 3 tokens here; a recurrent state cannot be rolled back.
    assert cache.fetch([1, 2, 3, 9, 9]) == (None, 0)
    # The last prompt token is never served from the cache.
    assert cache.fetch([1, 2, 3, 4]) == (None, 0)


def test_the_longest_checkpoint_that_fits_wins_and_shorter_ones_are_kept():
    cache = PromptCache(1 << 20)
    cache.store([1, 2, 3], [arrays(3), kv(3)])
    cache.store([1, 2, 3, 4, 5], [arrays(5), kv(5)])
    # The longer checkpoint cannot be cut back to 3 tokens, so it does not cover the shorter.
    assert len(cache) == 2
    assert cache.fetch([1, 2, 3, 4, 5, 6])[1] == 5
    views, n = cache.fetch([1, 2, 3, 7, 8])
    assert n == 3 and views is not None
    assert mx.array_equal(views[0][0], arrays(3)[0]).item()
    # Storing the same tokens again replaces the entry; the bytes are counted once.
    size = cache.nbytes
    cache.store([1, 2, 3], [arrays(3), kv(3)])
    assert len(cache) == 2 and cache.nbytes == size


def test_a_handed_out_checkpoint_is_a_copy_the_request_cannot_change():
    cache = PromptCache(1 << 20)
    cache.store([1, 2, 3, 4, 5, 6], [arrays(6), rotating(6)])
    views, n = cache.fetch([1, 2, 3, 4, 5, 6, 7])
    assert n == 6 and views is not None
    # Updates in place, as the model and RotatingKVCache make them.
    views[0][1][0] = mx.zeros((2, 4, 4))
    views[1].update_and_fetch(mx.full((1, 1, 1, 2), 99.0), mx.full((1, 1, 1, 2), 99.0))
    again, _ = cache.fetch([1, 2, 3, 4, 5, 6, 7])
    assert again is not None
    assert mx.array_equal(again[0][1], arrays(6)[1]).item()
    assert again[1].offset == 6 and 99.0 not in again[1].keys.flatten().tolist()


def test_a_rotated_window_is_kept_in_time_order_and_only_the_window():
    ring = rotating(6)  # positions 0..5 in a window of 4: the buffer holds 4, 5, 2, 3
    cache = PromptCache(1 << 20)
    cache.store([0, 1, 2, 3, 4, 5], [ring])
    assert cache.nbytes == 2 * 4 * 2 * 4  # keys and values, 4 positions of 2 floats
    views, _ = cache.fetch([0, 1, 2, 3, 4, 5, 6])
    assert views is not None
    assert views[0].keys[0, 0, :, 0].tolist() == [2.0, 3.0, 4.0, 5.0]


def test_checkpoints_count_against_the_budget():
    probe = PromptCache(1 << 20)
    probe.store([0, 0, 0, 0], [arrays(4), kv(4)])
    one = probe.nbytes  # the KV layer's 4 positions, not its 256-position buffer
    assert one == 3 * 8 * 4 + 2 * 4 * 4 * 4 + 2 * (2 * 4 * 4 * 4)
    cache = PromptCache(2 * one)
    for first in (1, 2, 3):
        cache.store([first, 0, 0, 0], [arrays(4), kv(4)])
    assert len(cache) == 2 and cache.nbytes <= 2 * one
    assert cache.fetch([1, 0, 0, 0, 9]) == (None, 0)
    # A checkpoint whose offsets disagree with its tokens is not kept.
    cache.store([7, 7, 7], [arrays(3), kv(4)])
    assert cache.fetch([7, 7, 7, 7]) == (None, 0)


# --- on the engines -----------------------------------------------------------------------


@pytest.fixture(scope="module", params=ENGINES)
def engines(request, hybrid_models):
    fmt, name = request.param.split("/")
    warm = _open(hybrid_models, fmt, name)
    cold = _open(hybrid_models, fmt, name, prompt_cache_bytes=0)
    yield warm, cold
    warm.close()
    cold.close()


def test_the_second_turn_hits_a_checkpoint_and_matches_a_cold_run(engines):
    warm, cold = engines
    # Longer than the sliding window (32), so the window has moved past the start.
    history = CHAT.format("system", "You are terse. " * 12) + CHAT.format("user", "Hi")
    turn1 = warm.tokenize(history + "<|im_start|>assistant\n<think>\n")
    tail = warm.tokenize("<|im_end|>\n" + CHAT.format("user", "And then?"))

    async def run():
        first = await generate(warm, turn1, 10)
        turn2 = turn1 + first.tokens + tail
        second = await generate(warm, turn2, 10)
        # The reply re-rendered without its thinking opener, as thinking templates render
        # earlier turns: only the checkpoint before the first generation prompt matches.
        rewritten = warm.tokenize(history + "<|im_start|>assistant\nSomething else.") + tail
        branch = await generate(warm, rewritten, 10)
        return first, turn2, second, rewritten, branch

    first, turn2, second, rewritten, branch = asyncio.run(run())
    assert first.cached == 0
    # The reply's last token is in the MLX cache but not yet in llama.cpp's.
    assert len(turn1) + len(first.tokens) - 1 <= second.cached <= len(turn1) + len(first.tokens)
    assert branch.cached == len(turn1) - CHECKPOINT_TAIL

    async def reference():
        return await generate(cold, turn2, 10), await generate(cold, rewritten, 10)

    cold_second, cold_branch = asyncio.run(reference())
    assert cold_second.cached == 0
    assert second.tokens == cold_second.tokens
    assert branch.tokens == cold_branch.tokens


def test_concurrent_requests_on_checkpoints_equal_their_cold_outputs(engines):
    warm, cold = engines
    base = warm.tokenize(CHAT.format("system", "Answer in one word. " * 10))
    prompts = [
        base + warm.tokenize(CHAT.format("user", "first question")),
        base + warm.tokenize(CHAT.format("user", "a second, longer question " * 3)),
        warm.tokenize(CHAT.format("user", "unrelated " * 20)),
        base + warm.tokenize(CHAT.format("user", "third")),
    ]
    lengths = [12, 7, 15, 9]

    async def run():
        await generate(warm, base + warm.tokenize("<|im_start|>user\n"), 3)
        together = await asyncio.gather(
            *(generate(warm, p, n) for p, n in zip(prompts, lengths, strict=True))
        )
        # Again, now that each has left checkpoints: the shared ones were not changed.
        again = await asyncio.gather(
            *(generate(warm, p, n) for p, n in zip(prompts, lengths, strict=True))
        )
        solo = [await generate(cold, p, n) for p, n in zip(prompts, lengths, strict=True)]
        return together, again, solo

    together, again, solo = asyncio.run(run())
    assert [r.tokens for r in together] == [r.tokens for r in solo]
    assert [r.tokens for r in again] == [r.tokens for r in solo]
    # The first request's prompt checkpoint (base and "<|im_start|>user\n") serves three.
    assert [r.cached > 0 for r in together] == [True, True, False, True]
    # Then their own prompt checkpoints (or a longer one that another left): on llama.cpp a
    # whole-only model has 3 sequence ids per parallel slot, so the four requests' checkpoints
    # and replies all stay beside the four running ones.
    floors = [len(p) - CHECKPOINT_TAIL for p in prompts]
    assert all(r.cached >= f for r, f in zip(again, floors, strict=True)), floors


# --- on the wire --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cold_server(hybrid_models, tmp_path_factory):
    srv = Server(hybrid_models, tmp_path_factory.mktemp("cold"), "--prompt-cache-bytes", "0")
    yield srv
    srv.stop()


def test_second_chat_turn_reports_cached_tokens_and_matches_a_cold_server(
    hybrid_models, server, cold_server
):
    warm = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    cold = openai.OpenAI(base_url=cold_server.url + "/v1", api_key="unused", max_retries=0)
    history = [
        {"role": "system", "content": "You answer questions about hybrid models. " * 8},
        {"role": "user", "content": "What is a recurrent layer?"},
    ]
    one = warm.chat.completions.create(
        model=HYBRID_KEY, messages=history, max_tokens=8, temperature=0
    )
    history += [
        {"role": "assistant", "content": one.choices[0].message.content},
        {"role": "user", "content": "And a sliding window?"},
    ]
    two = warm.chat.completions.create(
        model=HYBRID_KEY, messages=history, max_tokens=8, temperature=0
    )
    reference = cold.chat.completions.create(
        model=HYBRID_KEY, messages=history, max_tokens=8, temperature=0
    )
    details = two.usage.prompt_tokens_details if two.usage else None
    assert details is not None and details.cached_tokens is not None
    assert one.usage is not None
    # The reply's checkpoint, or the prompt's if the reply tokenizes differently when resent.
    low = one.usage.prompt_tokens - CHECKPOINT_TAIL
    assert low <= details.cached_tokens < two.usage.prompt_tokens
    assert two.choices[0].message.content == reference.choices[0].message.content
    assert reference.usage and reference.usage.prompt_tokens_details
    assert not reference.usage.prompt_tokens_details.cached_tokens
