"""GGUF: a prompt admitted beside running streams leaves their numbers as they are alone.

Without flash attention (the default) a step is one ``llama_decode``: the streams' tokens and
the prompt's chunk share the pass over the weights. With it (a load's ``flash_attention:
true`` or the server's ``--flash-attention``) each stream's token and each prompt's chunk
reach llama.cpp in decodes of their own, because its CPU flash-attention kernel computes a
micro-batch of 64 queries or more another way (≈1e-3 apart)."""

from __future__ import annotations

import asyncio

import pytest

from backends.base import Engine
from tests.engine_harness import load, scored

pytestmark = pytest.mark.filterwarnings("ignore:llama_token_get_attr:DeprecationWarning")


@pytest.mark.parametrize("flash", [True, False], ids=["flash", "default"])
def test_a_long_prompt_admitted_beside_a_stream_leaves_both_as_alone(
    models_root, monkeypatch, flash
):
    short_n, long_n = 24, 8

    async def alone(engine, short, long):
        return [(await scored(engine, short, short_n))[0], (await scored(engine, long, long_n))[0]]

    async def together(engine, short, long):
        started, done = asyncio.Event(), asyncio.Event()
        first = asyncio.ensure_future(scored(engine, short, short_n, started, done))
        await started.wait()
        second, _ = await scored(engine, long, long_n)
        done.set()
        return [(await first)[0], second]

    results = []
    # Each llama_decode of the run beside each other: did it hold a prompt chunk (more tokens
    # than sequences) and another sequence's token?
    shared: list[bool] = []
    # Each run on a fresh engine whose prompt cache keeps finished sequences: no cell is
    # freed under a running stream (a refilled hole reorders its cells, and the kernel
    # sums a sequence's values in f16 in cell order).
    for run in (alone, together):
        engine = load(models_root, "gguf", flash_attention=flash)
        if run is together:
            decode = engine._decode

            def counted(engine: Engine = engine, decode=decode) -> None:
                batch = engine._batch  # type: ignore[attr-defined]
                seqs = {batch.seq_id[i][0] for i in range(batch.n_tokens)}
                shared.append(len(seqs) > 1 and batch.n_tokens > len(seqs))
                decode()

            monkeypatch.setattr(engine, "_decode", counted)
        try:
            assert engine.info.load_config["flash_attention"] is flash
            short = engine.tokenize("apple tell me")
            # Over 64 tokens: a micro-batch the kernel tiles.
            long = engine.tokenize("river " + "tell me more " * 40)
            assert len(long) > 64
            results.append(asyncio.run(run(engine, short, long)))
        finally:
            engine.close()
    # The stream's token and the prompt's chunk: in decodes of their own with flash
    # attention, in one decode without it (the step the prompt was admitted in).
    assert any(shared) is not flash
    # Matrix products of 1 and 2 rows differ in the last bits (≈3e-7), nothing more. With
    # flash attention llama.cpp's CPU kernel (0.3.36's) splits one query's cells among the
    # threads once 512 or more are in use, at bounds that follow how many are: a token
    # decoded beside another sequence's cells sums its partial results at other bounds than
    # alone (≈5e-5 on a 2-core machine), still far from the ≈1e-3 of a shared micro-batch.
    tolerance = 3e-4 if flash else 1e-5
    for solo, batched in zip(*results, strict=True):
        assert [t for t, _ in batched] == [t for t, _ in solo]
        assert max(abs(a - b) for (_, a), (_, b) in zip(solo, batched, strict=True)) < tolerance


def test_a_running_reply_is_compared_up_to_where_a_stop_token_ends_the_alone_one(models_root):
    """``scored`` runs a stream beside another request with no stop token (it must keep
    decoding), so what it returns ends where the alone run, which stops there, ends."""
    engine = load(models_root, "gguf", prompt_cache_bytes=0)
    try:
        prompt = engine.tokenize("apple tell me")

        async def run() -> tuple[list[int], list[int], list[int]]:
            free, _ = await scored(engine, prompt, 8, stop=frozenset())
            tokens = [t for t, _ in free]
            # A token of the reply that is new at its place: the alone run stops before it.
            k = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i])
            stop = frozenset({tokens[k]})
            alone, _ = await scored(engine, prompt, 8, stop=stop)
            until = asyncio.Event()
            until.set()
            running, _ = await scored(engine, prompt, 8, until=until, stop=stop)
            return tokens[:k], [t for t, _ in alone], [t for t, _ in running]

        expected, alone, running = asyncio.run(run())
        assert expected and alone == expected
        assert running == expected
    finally:
        engine.close()
