"""MLX scheduling: prompt work per owner-thread step while other streams decode.

A running stream yields one token per owner-thread step, so the prompt tokens processed
between two of its tokens are what one step added to its wait. The tests read that from the
order in which the owner thread hands items to the streams."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace

import pytest

from backends.base import (
    Finished,
    GenerationRequest,
    PromptProgress,
    SamplingParams,
    Token,
    TokenStream,
)
from backends.stream import StreamItem
from tests.engine_harness import load, weights

CHUNK = 16


@pytest.fixture(scope="module")
def engine(models_root):
    e = load(models_root, "mlx", prompt_cache_bytes=0, max_batch_size=8, prefill_chunk=CHUNK)
    yield e
    e.close()


@pytest.fixture
def handed(monkeypatch):
    """Every (stream, item) the owner thread hands over, in order."""
    log: list[tuple[TokenStream, StreamItem | BaseException]] = []
    lock = threading.Lock()
    put = TokenStream.put

    def record(self: TokenStream, item: StreamItem | BaseException) -> None:
        with lock:
            log.append((self, item))
        put(self, item)

    monkeypatch.setattr(TokenStream, "put", record)
    return log


def request(engine, text: str, max_tokens: int, **sampling) -> GenerationRequest:
    # No stop tokens: every stream runs to max_tokens (or its cancellation).
    params = SamplingParams(**{"temperature": 0.0, **sampling})
    return GenerationRequest(tuple(engine.tokenize(text)), params, max_tokens)


async def tokens_of(stream: TokenStream, started: asyncio.Event | None = None) -> list[int]:
    out: list[int] = []
    async for item in stream:
        if isinstance(item, Token):
            out.append(item.id)
            if started is not None:
                started.set()
        elif isinstance(item, Finished):
            return out
    raise AssertionError("the stream ended without Finished")


async def beside_a_runner(engine, requests: list[GenerationRequest]):
    """Run ``requests`` together once a long greedy stream is decoding; their tokens, and
    the runner's stream."""
    runner = engine.submit(request(engine, "running stream", 5000))
    started = asyncio.Event()
    running = asyncio.create_task(tokens_of(runner, started))
    await started.wait()
    results = await asyncio.gather(*(tokens_of(engine.submit(r)) for r in requests))
    runner.cancel()
    await running
    return results, runner


def steps_seen_by(runner: TokenStream, handed) -> list[list[tuple[TokenStream, StreamItem]]]:
    """What the owner thread handed to the other streams between two tokens of ``runner``."""
    windows: list[list[tuple[TokenStream, StreamItem]]] = [[]]
    for stream, item in handed:
        if stream is runner:
            if isinstance(item, Token):
                windows.append([])
        elif not isinstance(item, BaseException):
            windows[-1].append((stream, item))
    return windows


def long_prompt(word: str, chunks: int) -> str:
    return f"{word} " + " ".join(f"w{i}" for i in range(chunks * CHUNK))


def test_seeded_prompt_is_prefilled_one_chunk_per_step(engine, handed):
    seeded = request(engine, long_prompt("seeded", 6), 8, temperature=0.9, seed=11)
    assert len(seeded.prompt) > 6 * CHUNK

    [tokens], runner = asyncio.run(beside_a_runner(engine, [seeded]))

    assert len(tokens) == 8
    # Each chunk of the seeded prompt is its own step: the runner gets a token between any
    # two of them, instead of waiting for the whole prompt.
    per_step = [
        sum(isinstance(item, PromptProgress) for _, item in window)
        for window in steps_seen_by(runner, handed)
    ]
    assert max(per_step) == 1
    assert sum(per_step) >= 6


def test_drafted_prompt_is_prefilled_one_chunk_per_step(engine, handed, models_root):
    # The tiny model drafts for itself: every proposal is accepted.
    draft = weights(models_root, "mlx")
    engine.call(lambda: engine.prepare_draft(draft)).result()
    plain = request(engine, long_prompt("drafted", 6), 8)
    drafted = replace(plain, draft=draft, num_draft_tokens=3)
    assert len(drafted.prompt) > 6 * CHUNK

    async def run():
        together, runner = await beside_a_runner(engine, [drafted])
        return together[0], runner, await tokens_of(engine.submit(plain))

    tokens, runner, undrafted = asyncio.run(run())

    assert tokens == undrafted
    # The model's and the draft's prefill advance one chunk per step: the runner gets a
    # token between any two chunks (mlx-lm's speculative step prefilled the whole prompt
    # in one step, reporting no progress).
    per_step = [
        sum(isinstance(item, PromptProgress) for _, item in window)
        for window in steps_seen_by(runner, handed)
    ]
    assert max(per_step) == 1
    assert sum(per_step) >= 6


def test_seeded_output_is_the_same_alone_and_beside_a_batch(engine):
    seeded = request(engine, long_prompt("again", 5), 12, temperature=0.9, seed=5)
    greedy_seeded = request(engine, long_prompt("again", 5), 12, seed=5)
    greedy = request(engine, long_prompt("again", 5), 12)

    async def run():
        alone = await tokens_of(engine.submit(seeded))
        # The batched path (no seed) at temperature 0: the chunked single path's cache must
        # give the same greedy tokens.
        batched = await tokens_of(engine.submit(greedy))
        together, _ = await beside_a_runner(
            engine,
            [seeded, request(engine, "a neighbour", 20, temperature=0.8), greedy_seeded],
        )
        return alone, batched, together

    alone, batched, together = asyncio.run(run())
    assert together[0] == alone
    assert together[2] == batched
    assert len(alone) == 12


def test_long_prompts_arriving_together_share_one_chunk_per_step(engine, handed):
    prompts = [request(engine, long_prompt(w, 4), 6) for w in ("red", "blue", "gold", "gray")]

    async def run():
        solo = [await tokens_of(engine.submit(r)) for r in prompts]
        handed.clear()
        together, runner = await beside_a_runner(engine, prompts)
        return solo, together, runner

    solo, together, runner = asyncio.run(run())
    assert together == solo
    # Prompt tokens processed in each step, from the progress each prompt reported.
    done: dict[TokenStream, int] = {}
    per_step = []
    for window in steps_seen_by(runner, handed):
        work = 0
        for stream, item in window:
            if isinstance(item, PromptProgress):
                work += item.processed - done.get(stream, 0)
                done[stream] = item.processed
        per_step.append(work)
    # mlx-lm alone prefills the four together, a chunk each per step (4 * CHUNK).
    assert max(per_step) <= CHUNK
    assert sum(per_step) >= 3 * 4 * CHUNK


@pytest.fixture(scope="module")
def two_places(models_root):
    e = load(models_root, "mlx", prompt_cache_bytes=0, parallel=2, prefill_chunk=CHUNK)
    yield e
    e.close()


def most_at_once(handed) -> int:
    """The most streams running at once: from a stream's first item to its end."""
    running: set[TokenStream] = set()
    most = 0
    for stream, item in handed:
        if isinstance(item, Finished | BaseException):
            running.discard(stream)
        else:
            running.add(stream)
            most = max(most, len(running))
    return most


def test_requests_beside_the_batch_wait_for_one_of_the_instance_parallel_places(
    two_places, handed, models_root
):
    engine = two_places
    # The tiny model drafts for itself: a drafted request runs beside the batch too.
    draft = weights(models_root, "mlx")
    engine.call(lambda: engine.prepare_draft(draft)).result()
    requests = [
        request(engine, long_prompt("seeded", 2), 6, temperature=0.9, seed=1),
        request(engine, long_prompt("batched", 2), 6),
        request(engine, long_prompt("another", 2), 6, temperature=0.9, seed=2),
        replace(request(engine, long_prompt("drafted", 2), 6), draft=draft),
        request(engine, long_prompt("last", 2), 6, temperature=0.9, seed=3),
    ]

    async def run():
        streams = [engine.submit(r) for r in requests]
        # Cancelled while it waits for a place: it ends without a token.
        waiting = engine.submit(request(engine, "never started", 6, temperature=0.5, seed=4))
        waiting.cancel()
        return await asyncio.gather(*(tokens_of(s) for s in [*streams, waiting]))

    results = asyncio.run(run())
    assert [len(r) for r in results] == [6, 6, 6, 6, 6, 0]
    # Before, seeded and drafted requests started at once beside the batch: 5 at a time.
    assert most_at_once(handed) == 2
