"""Changed-middle prompt-cache reuse on GGUF (``cache_reuse``): runs shared past the first
difference are moved in the KV cache instead of computed, the kept sequences stay consistent,
and ``cache_reuse=0`` stays exact."""

from __future__ import annotations

import asyncio
import importlib
import random

import llama_cpp
import openai

from backends.base import Engine
from backends.llamacpp import hostcache, reuse
from backends.llamacpp.reuse import Run, RunFilter, align
from tests.conftest import GGUF_KEY, REPO
from tests.engine_harness import generate, load, weights


def test_align_finds_monotonic_runs_past_a_change():
    old = list(range(100))
    # A changed line: tokens 10..13 replaced by three others.
    new = old[:10] + [900, 901, 902] + old[14:]
    assert align(old, new, 10, 10, 8, len(new) - 1) == [Run(14, 13, 85)]
    # Inserted text, then a deleted stretch.
    new = old[:10] + [900] * 5 + old[10:40] + old[60:]
    assert align(old, new, 10, 10, 8, len(new) - 1) == [Run(10, 15, 30), Run(60, 45, 39)]
    # Blocks reordered: the one found first in the old order is kept, the other recomputed.
    a, b, c = old[:30], old[30:60], old[60:]
    assert align(old, b + a + c, 0, 0, 8, 99) == [Run(30, 0, 30), Run(60, 60, 39)]
    # Runs shorter than the minimum, and runs before the floor, are not reused.
    assert align(old, old[:10] + [7] + old[11:16] + [7], 10, 10, 8, 17) == []
    assert align(old, [900] + old[1:], 1, 50, 8, 99) == [Run(50, 50, 49)]


def test_run_filter_never_rules_out_a_sequence_that_shares_a_run():
    rng = random.Random(7)
    for trial in range(300):
        min_run = rng.choice([8, 16, 33, 64])
        cached = [rng.randrange(50) for _ in range(rng.randrange(min_run, 400))]
        prompt = [rng.randrange(50, 100) for _ in range(rng.randrange(min_run, 400))]
        # No token in common: ruled out.
        assert not RunFilter(prompt, min_run).may_share(cached, 0)
        # A shared run of about min_run tokens at any offset of both (sometimes too short).
        n = rng.randrange(min_run - 2, min_run + 20)
        c, p = rng.randrange(len(cached)), rng.randrange(len(prompt))
        piece = cached[c : c + n]
        prompt[p : p + len(piece)] = piece
        floor = rng.randrange(c + 1)
        runs = align(cached, prompt, 0, floor, min_run, len(prompt))
        may = RunFilter(prompt, min_run).may_share(cached, floor)
        assert may or not runs, (trial, runs)


def test_the_host_search_aligns_only_entries_that_may_share_a_run(monkeypatch):
    # Parking needs no context here: the state is any bytes.
    monkeypatch.setattr(hostcache, "sequence_state", lambda ctx, seq: memoryview(b"state"))
    aligned = []

    def counting(cached, *args):
        aligned.append(len(cached))
        return align(cached, *args)

    monkeypatch.setattr(reuse, "align", counting)
    rng = random.Random(3)
    cache = hostcache.HostCache(None, trimmable=True)
    for i in range(30):
        cache.park(i, [rng.randrange(1000, 2000) for _ in range(600)], 0)
    # One entry shares a changed middle with the prompt: everything after its first token.
    middle = [rng.randrange(3000, 4000) for _ in range(500)]
    cache.park(30, [5, *middle], 0)
    prompt = [6, *middle, 7]
    key, served = cache.best(prompt, 0, min_run=64)
    assert key == (5, *middle) and served == len(middle)
    # Only the entry that shares a run is aligned (all 31 were, at ≈1 ms each for a 4k prompt).
    assert aligned == [len(key)]


def _system(engine: Engine, header: str, tools: int = 24, topic: str = "file") -> list[int]:
    lines = "".join(f"Tool {i}: reads {topic} {i} and reports its size.\n" for i in range(tools))
    text = f"<|im_start|>system\nYou are a coding agent.\n{header}\n{lines}<|im_end|>\n"
    return engine.tokenize(text)


def _turn(engine: Engine, text: str) -> list[int]:
    return engine.tokenize(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")


def _assert_cache_consistent(engine) -> None:
    """Every sequence id is free or kept (none leaked as a hold), and each kept sequence
    holds exactly its tokens' positions, contiguous from 0."""

    def read():
        mem = engine._mem
        kept = [
            (
                len(tokens),
                llama_cpp.llama_memory_seq_pos_min(mem, seq),
                llama_cpp.llama_memory_seq_pos_max(mem, seq),
            )
            for seq, tokens in engine._kept.items()
        ]
        return kept, len(engine._free) + len(engine._kept)

    kept, ids = engine.call(read).result()
    assert ids == engine._n_seq
    assert kept
    for n, lo, hi in kept:
        assert (lo, hi) == (0, n - 1)


def test_cache_reuse_zero_is_exact_prefix_reuse(models_root):
    warm = load(models_root, "gguf", cache_reuse=0)
    cold = load(models_root, "gguf", prompt_cache_bytes=0)
    try:
        one = _system(warm, "Date: Monday") + _turn(warm, "Hi")
        two = _system(warm, "Date: Tuesday") + _turn(warm, "Hi")
        first_diff = next(i for i, (a, b) in enumerate(zip(one, two, strict=False)) if a != b)

        async def run():
            await generate(warm, one, 6)
            return await generate(warm, two, 12), await generate(cold, two, 12)

        second, reference = asyncio.run(run())
        assert 0 < second.cached <= first_diff
        assert second.tokens == reference.tokens
    finally:
        warm.close()
        cold.close()


def test_changed_header_reuses_the_rest_and_keeps_the_cache_consistent(models_root):
    engine = load(models_root, "gguf", cache_reuse=32)
    try:

        async def run():
            history: list[int] = []
            results = []
            for turn in range(6):
                # The header changes every turn; the conversation grows.
                prompt = _system(engine, f"Date: day {turn} of {'x' * turn}") + history
                prompt += _turn(engine, f"Question {turn}?")
                result = await generate(engine, prompt, 6)
                results.append((prompt, result))
                history = prompt[len(_system(engine, f"Date: day {turn} of {'x' * turn}")) :]
                history += result.tokens
                _assert_cache_consistent(engine)
            return results

        results = asyncio.run(run())
        assert results[0][1].cached == 0
        for prompt, result in results[1:]:
            # Only the header line, the last reply token and the new turn are computed.
            new_turn = len(_turn(engine, "Question 5?"))
            assert len(prompt) - new_turn - 12 <= result.cached < len(prompt)
            assert len(result.tokens) == 6
    finally:
        engine.close()


def test_concurrent_requests_with_moved_runs(models_root):
    # Exact next to requests whose holds free cells: without flash attention (see
    # tests/test_gguf_attention.py for what it changes).
    engine = load(models_root, "gguf", cache_reuse=16, flash_attention=False)
    solo = load(models_root, "gguf", prompt_cache_bytes=0, flash_attention=False)
    try:

        async def run():
            # Three conversations with nothing to move between them (a request takes over the
            # kept sequence whose runs it moves).
            topics = ["file", "table", "image"]
            for topic in topics:
                await generate(engine, _system(engine, "Agent", 10, topic) + _turn(engine, "Hi"), 4)
            # Three changed-header requests and one unrelated one, all at once.
            prompts = [
                _system(engine, "Agent (changed)", 10, topic) + _turn(engine, "Hi")
                for topic in topics
            ]
            fresh = engine.tokenize("Nothing in common with the others, " * 6)
            results = await asyncio.gather(
                *(generate(engine, p, 8) for p in prompts), generate(engine, fresh, 8)
            )
            return prompts, results, await generate(solo, fresh, 8)

        prompts, results, reference = asyncio.run(run())
        for prompt, result in zip(prompts, results, strict=False):
            assert len(prompt) - 20 <= result.cached < len(prompt)
            assert len(result.tokens) == 8
        assert results[-1].tokens == reference.tokens
        _assert_cache_consistent(engine)
    finally:
        engine.close()
        solo.close()


def test_changed_system_line_is_served_from_cache_over_http(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    tools = "".join(f"Tool {i}: reads file {i} and reports its size.\n" for i in range(80))

    def ask(header: str):
        system = f"You are a coding agent.\n<env>{header}</env>\n{tools}"
        return client.chat.completions.create(
            model=GGUF_KEY,
            messages=[
                {"role": "system", "content": system},
                {"role": "user", "content": "List the tools."},
            ],
            max_tokens=8,
            temperature=0,
        )

    first = ask("cwd: /tmp/a date: 2026-12-06")
    second = ask("cwd: /home/someone/project date: 2026-12-07")
    assert first.usage is not None and second.usage is not None
    details = second.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    prompt = second.usage.prompt_tokens
    # Everything but the changed header line and the last prompt token comes from the cache.
    assert prompt - 30 <= details.cached_tokens < prompt
    reply = second.choices[0]
    assert isinstance(reply.message.content, str) and reply.message.content
    assert reply.finish_reason in ("stop", "length")
    assert second.usage.completion_tokens > 0


def test_bench_prompts_with_different_tags_share_no_reusable_run(monkeypatch):
    # scripts/bench.py measures cold prompts with unique_prompt: with changed-middle reuse
    # on, prompts that differ only in their first word would be served from the cache.
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    bench_common = importlib.import_module("bench_common")
    a, b = (bench_common.unique_prompt(tag, 1365).split() for tag in ("hist0", "long"))
    assert a[1:] != b[1:]
    assert align(a, b, 1, 1, 32, len(b)) == []
    assert bench_common.unique_prompt("x", 50) == bench_common.unique_prompt("x", 50)


def test_every_admission_tag_keeps_the_full_mode_prompt_inside_the_bench_context(
    models_root, monkeypatch
):
    # The full --admission run's twelfth call ("emu": 4,823 tokens) was refused with a 400,
    # ending the run: each tag must be one token before "w<n>", as "cat" is (4,005 tokens).
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    bench = importlib.import_module("bench")
    tags = importlib.import_module("bench_admission").TAGS
    context = importlib.import_module("make_test_models").CONTEXT
    llm = llama_cpp.Llama(
        model_path=str(weights(models_root, "gguf")), n_ctx=64, vocab_only=True, verbose=False
    )
    for tag in tags:
        text = bench._tagged_prompt(f"{tag}3", bench.FULL).encode()
        # The long prompt asks for 4 tokens after it.
        assert len(llm.tokenize(text, add_bos=False, special=True)) + 4 <= context, tag


def test_a_changed_header_reuses_a_history_longer_than_half_the_pool(models_root):
    """A request needs, beside its kept source, the prompt tokens neither the exact prefix
    nor the runs moved out of the source serve. Counted without the runs, a history longer
    than half the pool did not fit beside itself: its source was evicted and the prompt read
    again whole (the agent replay's prompt tokens from cache fell from 0.95 to 0.59)."""
    context = 512
    engine = load(models_root, "gguf", cache_reuse=32, context_length=context)
    try:
        body = _turn(engine, "Tell me about the rivers of the north. " * 24)

        async def run():
            first = _system(engine, "Date: day 1", tools=4) + body
            one = await generate(engine, first, 4)
            second = _system(engine, "Date: day 2 of x", tools=4) + body + one.tokens
            second += _turn(engine, "More?")
            return first, one, second, await generate(engine, second, 4)

        first, one, second, again = asyncio.run(run())
        kept = len(first) + len(one.tokens) - 1
        # Without the moved runs the prompt would not fit beside its kept source.
        assert len(second) > context - kept
        assert len(second) + 4 <= context
        assert again.cached >= len(body) - 12
        _assert_cache_consistent(engine)
    finally:
        engine.close()
