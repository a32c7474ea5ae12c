"""A GGUF model's KV cache is one pool of ``context_length`` cells shared by its parallel
sequences (llama-server's unified cache) unless the load reserves more windows. Requests are
admitted while their uncached prompt fits the free cells; when the running sequences outgrow
the pool, or llama.cpp finds no room for a batch, the most recently admitted one is preempted
(its cells copied to host memory) and resumes from the same bytes: no request fails, and each
reply is the one it gets alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import llama_cpp
import pytest
from script_loader import load_script

from backends import open_engine
from backends.base import Engine, Finished, GenerationRequest, LoadOptions, SamplingParams, Token
from backends.llamacpp import pool
from backends.llamacpp.engine import LlamaCppEngine
from backends.llamacpp.hostcache import StateFile
from tests.conftest import PUBLISHER
from tests.engine_harness import load, weights

pytestmark = pytest.mark.filterwarnings("ignore:llama_token_get_attr:DeprecationWarning")

CONTEXT = 256
# Each request alone fits the pool; three together do not.
REPLY = 100


def _n_ctx(engine: LlamaCppEngine) -> int:
    return engine.call(lambda: llama_cpp.llama_n_ctx(engine._ctx.ctx)).result()


def _prompts(engine: LlamaCppEngine) -> list[list[int]]:
    topics = ["rivers and their deltas", "mountains and passes", "cities and their harbours"]
    return [engine.tokenize(f"Question {i}: tell me about {t}. " * 6) for i, t in enumerate(topics)]


async def _scored(
    engine: LlamaCppEngine, prompt: list[int], draft: Path | None = None
) -> list[tuple[int, float]]:
    """``REPLY`` tokens at temperature 0 (no stop token) with their log probabilities."""
    request = GenerationRequest(
        tuple(prompt),
        SamplingParams(temperature=0.0),
        REPLY,
        frozenset(),
        logprobs=0,
        draft=draft,
        num_draft_tokens=4,
    )
    out: list[tuple[int, float]] = []
    async for item in engine.submit(request):
        if isinstance(item, Token):
            assert item.logprobs is not None
            out.append((item.id, item.logprobs.logprob))
        elif isinstance(item, Finished):
            assert item.reason == "length", item
            return out
    raise AssertionError("the stream ended without Finished")


def _assert_solo(got: list[tuple[int, float]], solo: list[tuple[int, float]]) -> None:
    assert [t for t, _ in got] == [t for t, _ in solo]
    assert max(abs(a - b) for (_, a), (_, b) in zip(got, solo, strict=True)) < 1e-5


def _open(models_root: Path, model: str, **options: int) -> Engine:
    if model == "tiny-qwen2":
        return load(models_root, "gguf", context_length=CONTEXT, **options)
    load_script("make_hybrid_models").generate(models_root, model, PUBLISHER)
    path = models_root / PUBLISHER / f"{model}-gguf" / f"{model}-f32.gguf"
    return open_engine("gguf", path, LoadOptions(context_length=CONTEXT, **options))  # type: ignore[arg-type]


def _together_and_alone(
    models_root,
    prepare=None,
    draft: Path | None = None,
    model: str = "tiny-qwen2",
    **options: int,
):
    """The three prompts decoded together on a pooled engine (after ``prepare`` on its owner
    thread; each drafted by ``draft``; loaded with ``options``) and each alone on another,
    undrafted: (together, alone, preemptions)."""
    engine = _open(models_root, model, parallel=3, **options)
    solo = _open(models_root, model, parallel=1, prompt_cache_bytes=0)
    assert isinstance(engine, LlamaCppEngine) and isinstance(solo, LlamaCppEngine)
    try:
        if prepare is not None:
            engine.call(lambda: prepare(engine)).result()
        if draft is not None:
            engine.call(lambda: engine.prepare_draft(draft)).result()
        prompts = _prompts(engine)
        assert all(len(p) + REPLY <= CONTEXT for p in prompts)
        assert sum(len(p) + REPLY for p in prompts) > CONTEXT

        async def run():
            together = await asyncio.gather(*(_scored(engine, p, draft) for p in prompts))
            return together, [await _scored(solo, p) for p in prompts]

        together, alone = asyncio.run(run())
        return together, alone, engine.preempted
    finally:
        engine.close()
        solo.close()


def test_a_load_reserves_one_window_unless_the_setting_asks_for_more(models_root):
    pooled = load(models_root, "gguf", context_length=CONTEXT, parallel=4)
    wide = load(models_root, "gguf", context_length=CONTEXT, parallel=2, reserved_windows=3)
    try:
        assert isinstance(pooled, LlamaCppEngine) and isinstance(wide, LlamaCppEngine)
        assert _n_ctx(pooled) == CONTEXT
        assert pooled.info.load_config["parallel"] == 4
        # At most one window per sequence decoded at once.
        assert _n_ctx(wide) == 2 * CONTEXT
    finally:
        pooled.close()
        wide.close()


# The hybrid's recurrent state (Gated DeltaNet) travels with its cells when preempted.
@pytest.mark.parametrize("model", ["tiny-qwen2", "tiny-qwen35-hybrid"])
def test_requests_that_outgrow_the_pool_are_preempted_and_keep_their_solo_tokens(
    models_root, model
):
    together, alone, preempted = _together_and_alone(models_root, model=model)
    for got, solo in zip(together, alone, strict=True):
        _assert_solo(got, solo)
    assert preempted >= 1


def test_a_decode_that_finds_no_room_preempts_instead_of_failing_the_streams(models_root):
    """The engine's estimate says the pool is far larger than it is: only llama.cpp's
    ``llama_decode`` finds out (it returns 1), and a sequence is preempted for it."""

    def believe_more_cells(engine: LlamaCppEngine) -> None:
        engine._cells = 1 << 20

    together, alone, preempted = _together_and_alone(models_root, believe_more_cells)
    for got, solo in zip(together, alone, strict=True):
        _assert_solo(got, solo)
    assert preempted >= 1


def test_preempted_states_beyond_the_host_budget_go_to_a_file_and_resume_exactly(
    models_root, monkeypatch
):
    """Preempted states share the prompt cache's host budget: with none (the guardrail's cut
    to 0) each is written to a temporary file, not held in memory no budget counts, and the
    replies are still their solo runs."""
    files: list[StateFile] = []

    class Recorded(StateFile):
        def __init__(self, state: memoryview) -> None:
            super().__init__(state)
            files.append(self)

    monkeypatch.setattr(pool, "StateFile", Recorded)
    together, alone, preempted = _together_and_alone(models_root, host_cache_bytes=0)
    for got, solo in zip(together, alone, strict=True):
        _assert_solo(got, solo)
    assert preempted >= 1
    assert len(files) == preempted
    assert all(f.nbytes > 0 and f._file.closed for f in files)


def test_drafted_requests_that_outgrow_the_pool_keep_their_tokens(models_root):
    """The model drafting for itself: every round puts 5 tokens per sequence in the pool,
    preempted sequences lose their draft cells, and the draft's context (as many cells)
    proposes fewer when full. Rows of a 5-token round differ from single steps in the last
    bits: tokens only."""
    together, alone, preempted = _together_and_alone(
        models_root, draft=weights(models_root, "gguf")
    )
    for got, solo in zip(together, alone, strict=True):
        assert [t for t, _ in got] == [t for t, _ in solo]
    assert preempted >= 1


def test_admission_reserves_nothing_for_the_reply(models_root):
    """Two requests whose replies may each fill the context (as a request without
    max_tokens does) decode together: the second is admitted while the first runs, not after
    it (a reservation of prompt + max_tokens would have queued it)."""
    engine = load(models_root, "gguf", context_length=CONTEXT, parallel=2)
    assert isinstance(engine, LlamaCppEngine)
    try:
        first, second = _prompts(engine)[:2]
        done: list[str] = []
        seen_first: dict[str, int] = {}

        async def run(name: str, prompt: list[int]) -> None:
            room = CONTEXT - len(prompt) - 1
            request = GenerationRequest(
                tuple(prompt), SamplingParams(temperature=0.0), room, frozenset()
            )
            async for item in engine.submit(request):
                if isinstance(item, Token) and name not in seen_first:
                    seen_first[name] = len(done)
                elif isinstance(item, Finished):
                    assert item.reason == "length", item
                    done.append(name)
                    return

        async def both() -> None:
            task = asyncio.create_task(run("first", first))
            await asyncio.sleep(0)
            await run("second", second)
            await task

        asyncio.run(both())
        assert sorted(done) == ["first", "second"]
        # The second's first token came while the first was still running.
        assert seen_first["second"] == 0
    finally:
        engine.close()
