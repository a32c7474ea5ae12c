"""How much of a prompt the prompt cache served and kept, as each dialect reports it:
Anthropic ``cache_read_input_tokens`` / ``cache_creation_input_tokens`` (adding up to the
prompt with ``input_tokens``), LM Studio v1 ``stats.cached_input_tokens`` and v0
``stats.cached_prompt_tokens_count``."""

from __future__ import annotations

import asyncio
import uuid

import anthropic
import httpx
import pytest

from tests.conftest import GGUF_KEY, MLX_KEY
from tests.engine_harness import second_turn, warm_and_cold

FORMATS = ["mlx", "gguf"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_engine_reports_the_prompt_tokens_it_keeps(models_root, fmt):
    with warm_and_cold(models_root, fmt) as (warm, cold):
        turn1 = warm.tokenize("<|im_start|>system\nYou keep count.<|im_end|>\n" * 6 + "Go")
        first, turn2, second, off = asyncio.run(second_turn(warm, cold, turn1, " and once more", 6))
    # The first request computed its whole prompt and kept it.
    assert first.cached == 0 and first.written == len(turn1)
    # The second computed only what the cache did not hold, and kept that.
    assert second.cached > len(turn1) // 2
    assert second.written == len(turn2) - second.cached
    # With the prompt cache off nothing is kept.
    assert off.cached == 0 and off.written == 0


@pytest.mark.parametrize("model", [MLX_KEY, GGUF_KEY])
def test_anthropic_usage_splits_the_prompt_in_three(server, model):
    client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    # A system prompt no other test sends: nothing of it is cached before this test.
    system = f"Session {uuid.uuid4().hex}. You answer in one word. " * 8
    messages = [{"role": "user", "content": "Name a colour."}]
    fixed = {"extra_body": {"temperature": 0, "ignore_eos": True}}
    count = client.messages.count_tokens(model=model, system=system, messages=messages)
    first = client.messages.create(
        model=model, system=system, messages=messages, max_tokens=4, **fixed
    )
    u = first.usage
    # At most the chat template's opening is shared with other tests' prompts.
    assert u.cache_read_input_tokens < 8 and u.input_tokens == 0
    assert u.cache_creation_input_tokens + u.cache_read_input_tokens == count.input_tokens
    messages += [
        {"role": "assistant", "content": first.content[0].text},
        {"role": "user", "content": "And another?"},
    ]
    count = client.messages.count_tokens(model=model, system=system, messages=messages)
    with client.messages.stream(
        model=model, system=system, messages=messages, max_tokens=4, **fixed
    ) as stream:
        second = stream.get_final_message().usage
    assert second.cache_read_input_tokens >= count.input_tokens // 2
    assert second.cache_creation_input_tokens > 0
    assert (
        second.input_tokens + second.cache_read_input_tokens + second.cache_creation_input_tokens
        == count.input_tokens
    )


@pytest.mark.parametrize("model", [MLX_KEY, GGUF_KEY])
def test_lmstudio_stats_carry_the_cached_prompt_tokens(server, model):
    prompt = f"Tell me about the harbour {uuid.uuid4().hex}. " * 6
    v1 = {"model": model, "input": prompt, "max_output_tokens": 4, "temperature": 0}
    first = httpx.post(server.url + "/api/v1/chat", json={**v1, "store": False}, timeout=60)
    assert first.status_code == 200, first.text
    # At most the chat template's opening is shared with other tests' prompts.
    assert first.json()["stats"]["cached_input_tokens"] < 8
    again = httpx.post(server.url + "/api/v1/chat", json={**v1, "store": False}, timeout=60)
    stats = again.json()["stats"]
    assert stats["input_tokens"] // 2 < stats["cached_input_tokens"] < stats["input_tokens"]

    v0 = {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0}
    httpx.post(server.url + "/api/v0/completions", json=v0, timeout=60).raise_for_status()
    body = httpx.post(server.url + "/api/v0/completions", json=v0, timeout=60).json()
    assert 0 < body["stats"]["cached_prompt_tokens_count"] < body["usage"]["prompt_tokens"]
    assert (
        body["stats"]["cached_prompt_tokens_count"]
        == body["usage"]["prompt_tokens_details"]["cached_tokens"]
    )
