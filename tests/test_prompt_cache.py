"""Prompt-cache reuse: a request sharing a prefix with an earlier one processes only the new
tokens, says so in ``cached_tokens``, and produces what a cold run produces."""

from __future__ import annotations

import asyncio

import httpx
import mlx.core as mx
import openai
import pytest
from mlx_lm.models.cache import KVCache

from backends.mlx.prompt_cache import PromptCache, common_prefix
from tests.conftest import GGUF_KEY, MLX_KEY
from tests.engine_harness import generate, second_turn, warm_and_cold

FORMATS = ["mlx", "gguf"]


def kv(n: int, layers: int = 2) -> list[KVCache]:
    caches = []
    for _ in range(layers):
        c = KVCache()
        c.keys = mx.arange(n * 4, dtype=mx.float32).reshape(1, 1, n, 4)
        c.values = c.keys + 1
        c.offset = n
        caches.append(c)
    return caches


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4], 10) == 2
    assert common_prefix([1, 2, 3], [1, 2, 3, 4], 10) == 3
    assert common_prefix([1, 2, 3], [1, 2, 3, 4], 2) == 2
    assert common_prefix([5], [1], 10) == 0


def test_fetch_returns_a_view_of_the_longest_shared_prefix():
    cache = PromptCache(1 << 20)
    cache.store([1, 2, 3, 4, 5, 6], kv(6))
    cache.store([9, 9, 9], kv(3))
    views, n = cache.fetch([1, 2, 3, 4, 7, 8])
    assert n == 4
    assert views is not None and all(v.offset == 4 for v in views)
    assert views[0].keys.shape[2] == 4
    # Writing through the view leaves the stored entry alone.
    views[0].update_and_fetch(mx.zeros((1, 1, 2, 4)), mx.zeros((1, 1, 2, 4)))
    again, n = cache.fetch([1, 2, 3, 4, 5, 6, 7])
    assert n == 6 and again is not None
    assert mx.array_equal(again[0].keys[..., 4:6, :], kv(6)[0].keys[..., 4:6, :]).item()
    # The last prompt token is never served from the cache.
    assert cache.fetch([1, 2, 3, 4, 5, 6])[1] == 5
    assert cache.fetch([7, 7]) == (None, 0)


def test_an_extending_entry_replaces_the_prefix_it_covers():
    cache = PromptCache(1 << 20)
    cache.store([1, 2, 3], kv(3))
    cache.store([1, 2, 3, 4, 5], kv(5))
    assert len(cache) == 1
    assert cache.nbytes == sum(c.nbytes for c in kv(5))


def test_stored_entries_hold_only_their_positions():
    # A request's cache is a step-allocated buffer (256 positions for 3 tokens here): what
    # is kept must be the 3 positions, evaluated, or the budget undercounts memory.
    c = KVCache()
    c.update_and_fetch(mx.ones((1, 2, 3, 8)), mx.ones((1, 2, 3, 8)))
    assert c.keys.shape[2] > 3
    cache = PromptCache(1 << 20)
    before = mx.get_active_memory()
    cache.store([1, 2, 3], [c])
    del c
    views, n = cache.fetch([1, 2, 3, 4])
    assert n == 3 and views is not None
    assert cache.nbytes == 2 * 3 * 2 * 8 * 4
    assert mx.get_active_memory() - before <= cache.nbytes + 4096


def test_byte_budget_evicts_least_recently_used_first():
    one = sum(c.nbytes for c in kv(4))
    cache = PromptCache(2 * one)
    cache.store([1, 1, 1, 1], kv(4))
    cache.store([2, 2, 2, 2], kv(4))
    cache.fetch([1, 1, 1, 1, 9])  # touches the first entry
    cache.store([3, 3, 3, 3], kv(4))
    assert len(cache) == 2 and cache.nbytes <= 2 * one
    assert cache.fetch([2, 2, 2, 2, 9])[1] == 0
    assert cache.fetch([1, 1, 1, 1, 9])[1] == 4
    cache.store([4] * 20, kv(20))  # larger than the whole budget: not kept
    assert cache.fetch([4] * 21)[1] == 0
    assert cache.nbytes <= 2 * one


@pytest.mark.parametrize("fmt", FORMATS)
def test_second_turn_reuses_the_first_and_matches_a_cold_run(models_root, fmt):
    with warm_and_cold(models_root, fmt) as (warm, cold):
        turn1 = warm.tokenize("<|im_start|>system\nYou are terse.<|im_end|>\n" * 8 + "Hi")

        async def run():
            turns = await second_turn(warm, cold, turn1, " and then what happened next?", 12)
            # A new conversation with the same system prompt reuses that part.
            other = await generate(warm, turn1[:-1] + warm.tokenize("Bye"), 4)
            return *turns, other

        first, turn2, second, reference, other = asyncio.run(run())
    assert first.cached == 0
    assert second.cached >= len(turn1) + len(first.tokens) - 1
    assert second.cached < len(turn2)
    assert second.tokens == reference.tokens
    assert reference.cached == 0
    assert other.cached >= len(turn1) - 2


@pytest.mark.parametrize("model", [MLX_KEY, GGUF_KEY])
def test_cached_tokens_reported_on_the_wire(server, model):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    history = [
        {"role": "system", "content": f"You answer questions about {model}. " * 20},
        {"role": "user", "content": "What is the first thing to know?"},
    ]
    one = client.chat.completions.create(model=model, messages=history, max_tokens=8, temperature=0)
    history += [
        {"role": "assistant", "content": one.choices[0].message.content},
        {"role": "user", "content": "And the second?"},
    ]
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=history,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens_details is not None
    cached = usage.prompt_tokens_details.cached_tokens
    assert one.usage.prompt_tokens - 2 <= cached < usage.prompt_tokens
    r = httpx.post(
        server.url + "/v1/responses",
        json={"model": model, "input": history, "max_output_tokens": 8, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    details = r.json()["usage"]["input_tokens_details"]
    assert details["cached_tokens"] >= one.usage.prompt_tokens - 2
