"""GGUF admission without flash attention, where every prompt chunk and decode step attends
over all cells of the unified KV cache up to the highest in use. The prompt cache's kept
sequences leave the context when a request that does not use them is admitted, wait in host
memory and come back on a hit with the output of a cold run (over the prompt cache's budget
they go to disk); and while streams decode, an admitted prompt's chunks get fewer tokens as
the cells in use grow, so that a step costs no more than one chunk on an empty context."""

from __future__ import annotations

import asyncio
import ctypes
import re
from typing import Any

import llama_cpp
import pytest

from backends.base import Finished, GenerationRequest, SamplingParams, Token
from backends.llamacpp import adapter
from backends.llamacpp.budget import STEP_SHARE
from backends.llamacpp.draft import SMALL_BATCH
from backends.llamacpp.engine import LlamaCppEngine, weight_cells
from backends.spill import SUFFIX
from tests.engine_harness import RUNNING, drafted, generate, load, scored, weights

pytestmark = pytest.mark.filterwarnings("ignore:llama_token_get_attr:DeprecationWarning")

SYSTEM = "<|im_start|>system\nYou are terse and exact. Answer in one line.<|im_end|>\n" * 4


def _chat(engine: LlamaCppEngine, user: str) -> list[int]:
    return engine.tokenize(SYSTEM + f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")


def _held(engine: LlamaCppEngine) -> dict[int, int]:
    """Each context sequence holding cells: its highest position + 1."""

    def read() -> dict[int, int]:
        mem = engine._mem
        spans = {s: llama_cpp.llama_memory_seq_pos_max(mem, s) + 1 for s in range(engine._n_seq)}
        return {s: n for s, n in spans.items() if n > 0}

    return engine.call(read).result()


def test_kept_cells_leave_the_context_for_an_unrelated_prompt_and_a_hit_brings_them_back(
    models_root,
):
    engine = load(models_root, "gguf")
    cold = load(models_root, "gguf", prompt_cache_bytes=0)
    assert isinstance(engine, LlamaCppEngine)
    try:
        one = _chat(engine, "Name a river.")
        unrelated = engine.tokenize("Nothing in common with the chat at all, " * 12)
        first = asyncio.run(generate(engine, one, 8))
        kept = len(one) + len(first.tokens) - 1
        assert sorted(_held(engine).values()) == [kept]
        asyncio.run(generate(engine, unrelated, 4))
        # Only the unrelated request's own cells are left in the context.
        assert sorted(_held(engine).values()) == [len(unrelated) + 3]
        assert len(engine._host) == 1
        # What the prompt cache adds to the model's memory: the parked state, not kept cells.
        assert engine.prompt_cache_held_bytes == engine._host.bytes > 0
        following = one + first.tokens + engine.tokenize("<|im_end|>\n<|im_start|>user\nMore")
        again = asyncio.run(generate(engine, following, 12))
        reference = asyncio.run(generate(cold, following, 12))
        assert again.cached >= kept
        assert again.tokens == reference.tokens
        assert len(engine._host) == 1  # the unrelated request's cells, parked by the hit
    finally:
        engine.close()
        cold.close()


def test_with_flash_attention_kept_cells_stay_in_the_context(models_root):
    """Flash attention skips other sequences' cells, so nothing is moved out for them."""
    engine = load(models_root, "gguf", flash_attention=True)
    assert isinstance(engine, LlamaCppEngine)
    try:
        one = _chat(engine, "Name a river.")
        first = asyncio.run(generate(engine, one, 8))
        unrelated = engine.tokenize("Nothing in common with the chat at all, " * 12)
        asyncio.run(generate(engine, unrelated, 4))
        kept = len(one) + len(first.tokens) - 1
        assert sorted(_held(engine).values()) == sorted([kept, len(unrelated) + 3])
        assert len(engine._host) == 0
    finally:
        engine.close()


def test_concurrent_requests_keep_the_kept_sequences_they_use(models_root):
    """Requests admitted in the same step each find their own conversation: what one of them
    does not use is not taken out from under another."""
    engine = load(models_root, "gguf", parallel=3)
    cold = load(models_root, "gguf", prompt_cache_bytes=0)
    try:
        users = ["Name a river.", "Name a mountain.", "Name a city."]

        async def run():
            firsts = [await generate(engine, _chat(engine, u), 6) for u in users]
            follows = [
                _chat(engine, u) + f.tokens + engine.tokenize("<|im_end|>\n<|im_start|>user\nMore")
                for u, f in zip(users, firsts, strict=True)
            ]
            together = await asyncio.gather(*(generate(engine, p, 8) for p in follows))
            return follows, together, [await generate(cold, p, 8) for p in follows]

        follows, together, references = asyncio.run(run())
        for prompt, got, reference in zip(follows, together, references, strict=True):
            assert got.cached >= len(prompt) - 12
            assert got.tokens == reference.tokens
    finally:
        engine.close()
        cold.close()


@pytest.mark.parametrize("budget", [{"host_cache_bytes": 0}, {"prompt_cache_bytes": 1}])
def test_the_budget_bounds_host_memory_only_and_kept_cells_still_serve(models_root, budget):
    """The prompt cache's budget (or the guardrail's cut of it, even to nothing) bounds only
    the host memory it adds: a request kept in the context's cells, which llama.cpp reserved
    at load, is reused however small the budget; only parking it has nowhere to go."""
    engine = load(models_root, "gguf", **budget)
    cold = load(models_root, "gguf", prompt_cache_bytes=0)
    assert isinstance(engine, LlamaCppEngine)
    try:
        one = _chat(engine, "Name a river.")
        first = asyncio.run(generate(engine, one, 8))
        following = one + first.tokens + engine.tokenize("<|im_end|>\n<|im_start|>user\nMore")
        again = asyncio.run(generate(engine, following, 12))
        assert again.cached >= len(one) + len(first.tokens) - 1
        assert again.tokens == asyncio.run(generate(cold, following, 12)).tokens
        unrelated = engine.tokenize("Nothing in common with the chat at all, " * 12)
        asyncio.run(generate(engine, unrelated, 4))
        assert sorted(_held(engine).values()) == [len(unrelated) + 3]
        assert len(engine._host) == 0 and engine._host.bytes == 0
    finally:
        engine.close()
        cold.close()


def test_over_the_budget_parked_sequences_go_to_disk_and_still_serve(models_root, tmp_path):
    cold = load(models_root, "gguf", prompt_cache_bytes=0)
    spill = {"prompt_cache_dir": tmp_path, "prompt_cache_disk_bytes": 1 << 30}
    # A host budget smaller than any conversation: each one parked goes on to disk.
    engine = load(models_root, "gguf", prompt_cache_bytes=1, **spill)
    assert isinstance(engine, LlamaCppEngine) and engine._spill is not None
    try:
        chats = [_chat(engine, f"Question number {i} about rivers?") for i in range(3)]

        async def run():
            firsts = [await generate(engine, c, 4) for c in chats]
            # A finished request is kept after its last token is handed over: a call on the
            # owner thread runs after that, then the writes it queued are waited for.
            await asyncio.wrap_future(engine.call(lambda: None))
            engine._spill.store.flush()
            written = sorted(tmp_path.rglob(f"*{SUFFIX}"))
            follow = chats[0] + firsts[0].tokens + engine.tokenize("<|im_end|>\n")
            return written, await generate(engine, follow, 8), await generate(cold, follow, 8)

        written, again, reference = asyncio.run(run())
        # The first conversation went to disk while the engine ran (not only at its unload),
        # and its next turn is read back from there.
        assert written
        assert again.cached >= len(chats[0])
        assert again.tokens == reference.tokens
    finally:
        engine.close()
        cold.close()


def test_prompt_chunks_beside_a_decoding_stream_shrink_as_cells_grow_and_stay_exact(models_root):
    batch = 64
    engine = load(models_root, "gguf", eval_batch_size=batch, prompt_cache_bytes=0)
    try:
        short = engine.tokenize("apple tell me")
        long = engine.tokenize("river " + "tell me more " * 80)

        async def run():
            solo = [await scored(engine, short, 48), await scored(engine, long, 4)]
            started, done = asyncio.Event(), asyncio.Event()
            first = asyncio.ensure_future(scored(engine, short, 48, started, done))
            await started.wait()
            second = await scored(engine, long, 4)
            done.set()
            return solo, [await first, second]

        solo, together = asyncio.run(run())
        w = engine._weight_cells
    finally:
        engine.close()
    # The last chunk ends in the first token, not in a progress report.
    processed = sorted({0, *together[1][1], len(long)})
    chunks = [b - a for a, b in zip(processed, processed[1:], strict=False)]
    # Several steps beside the stream, each chunk at most eval_batch_size and no larger than
    # the one before (the prompt's own cells grow), the later ones smaller than the first.
    assert len(chunks) >= 4, processed
    assert all(c <= batch for c in chunks)
    assert chunks == sorted(chunks, reverse=True)
    assert chunks[-2] < chunks[0]
    # Even the first, beside the stream's few cells, is held to STEP_SHARE of a whole chunk
    # on an empty context (a step priced at a whole one overran it by the CPU's spread).
    assert chunks[0] * (w + chunks[0]) <= STEP_SHARE * batch * (w + batch)
    for (alone, _), (beside, _) in zip(solo, together, strict=True):
        assert [t for t, _ in beside] == [t for t, _ in alone]
        assert max(abs(a - b) for (_, a), (_, b) in zip(alone, beside, strict=True)) < 1e-5


def test_a_cell_costs_its_multiply_adds_and_its_heads_scores():
    # On the bench's full model (512 wide, 8 layers of 8 heads of 64, 22.55M weights past
    # the embeddings) the server's own admission steps (f32 KV, both cores) held flat from a
    # 4k prompt's first chunk to its last when a token's weights were priced as ~320 cells,
    # and rose 1.5x with 1,223 (a one-thread f32 fit in CPU time, scripts/bench_step_cost.py);
    # counting multiply-adds alone gave 2,753.
    assert 300 <= weight_cells(22_550_000, n_layer=8, n_embd=512, n_head=8) <= 350


def test_a_step_that_parks_kept_sequences_beside_a_stream_decodes_no_prompt_chunk(
    models_root, monkeypatch
):
    engine = load(models_root, "gguf")
    events: list[str] = []
    park, decode = engine._park, engine._decode

    def parked(seq: int) -> None:
        events.append("park")
        park(seq)

    def decoded() -> None:
        batch = engine._batch
        seqs = {batch.seq_id[i][0] for i in range(batch.n_tokens)}
        events.append("chunk" if batch.n_tokens > len(seqs) else "tokens")
        decode()

    monkeypatch.setattr(engine, "_park", parked)
    monkeypatch.setattr(engine, "_decode", decoded)
    try:
        kept = _chat(engine, "pear")
        short = engine.tokenize("apple tell me")
        long = engine.tokenize("river " + "tell me more " * 20)

        async def run():
            started, done = asyncio.Event(), asyncio.Event()
            first = asyncio.ensure_future(scored(engine, short, 24, started, done))
            await started.wait()
            # A chat that ends beside the stream and is kept in the context.
            await generate(engine, kept, 2)
            events.clear()
            await scored(engine, long, 2)
            done.set()
            await first

        asyncio.run(run())
    finally:
        engine.close()
    # The kept chat was parked when the long prompt was admitted beside the stream; the
    # copy's step decoded the stream's token alone, the prompt's chunks came after.
    assert "park" in events, events
    after = events[events.index("park") + 1 :]
    assert after[0] == "tokens" and "chunk" in after, events


def test_parking_a_long_prompt_beside_a_stream_moves_the_stream_down_and_keeps_it_exact(
    models_root, monkeypatch
):
    """A stream's tokens decoded while a long prompt was read sit among and above that
    prompt's cells. Once the prompt's kept sequence is parked, the stream moves down to the
    lowest free cells: llama.cpp's attention span (every cell up to the highest in use, its
    ``used_max_p1``, which the cache's debug log reports) no longer covers the parked
    prompt, and the stream's tokens are those it decodes alone."""
    monkeypatch.setenv("LLAMA_KV_CACHE_DEBUG", "1")
    spans: list[int] = []
    pattern = re.compile(rb"find_slot: stream\[0\], n = +(\d+), used = +(\d+)")

    @llama_cpp.llama_log_callback
    def log(level: int, text: bytes, user: Any) -> None:
        if (found := pattern.search(text or b"")) is not None:
            spans.append(int(found.group(1)))

    engine = load(models_root, "gguf", eval_batch_size=64)
    llama_cpp.llama_log_set(log, ctypes.c_void_p(0))
    moved: list[int] = []
    relocate = engine._relocate

    def relocated(freed: int) -> None:
        moved.append(freed)
        relocate(freed)

    monkeypatch.setattr(engine, "_relocate", relocated)
    try:
        short = engine.tokenize("apple tell me")
        long = engine.tokenize("river " + "tell me more " * 60)
        unrelated = engine.tokenize("pear")

        async def run():
            solo = await scored(engine, short, 40)
            started, done = asyncio.Event(), asyncio.Event()
            stream = asyncio.ensure_future(scored(engine, short, 40, started, done))
            await started.wait()
            await generate(engine, long, 2)  # read in chunks beside the stream, then kept
            spans.clear()
            await generate(engine, unrelated, 2)  # parks the long prompt's sequence
            after = list(spans)
            done.set()
            return solo, await stream, after

        solo, beside, after = asyncio.run(run())
    finally:
        llama_cpp.llama_log_set(adapter.log_callback(), ctypes.c_void_p(0))
        engine.close()
    # The unrelated request's last decode: the span holds the stream and that request only
    # (without the move it reached past the parked prompt's cells).
    assert after and after[-1] < len(long) // 2, (after, len(long))
    assert moved and moved[-1] >= len(long), moved
    assert [t for t, _ in beside[0]] == [t for t, _ in solo[0]]


@pytest.mark.parametrize("parked", [False, True], ids=["in-the-pool", "from-host-memory"])
def test_a_next_turn_whose_history_nearly_fills_the_pool_still_reuses_it(models_root, parked):
    """The pool keeps free, beside a new request's prompt, a headroom for the growth of the
    sequences running beside it; a request that would run alone needs none (its prompt and
    reply fit the context). A chat's next turn whose history nearly fills the pool reused none
    of it when the headroom was asked for alone too: its kept history was evicted (or not
    brought back from host memory) to make room for it."""
    context = 256
    engine = load(models_root, "gguf", context_length=context)
    cold = load(models_root, "gguf", context_length=context, prompt_cache_bytes=0)
    assert isinstance(engine, LlamaCppEngine)
    try:
        words = 1
        while len(one := _chat(engine, "Name a river. " + "and " * words)) < context - 24:
            words += 1
        first = asyncio.run(generate(engine, one, 16))
        kept = len(one) + len(first.tokens) - 1
        following = one + first.tokens + engine.tokenize("<|im_end|>\n")
        # The headroom would not fit beside the uncached tokens; the turn and its reply do.
        assert len(following) - kept + engine._headroom > context - kept
        assert len(following) + 2 <= context
        if parked:
            asyncio.run(generate(engine, engine.tokenize("Nothing in common at all."), 2))
            assert len(engine._host) == 1
        again = asyncio.run(generate(engine, following, 2))
        assert again.cached >= kept
        assert again.tokens == asyncio.run(generate(cold, following, 2)).tokens
    finally:
        engine.close()
        cold.close()


def _count_draft_steps(engine: Any, monkeypatch) -> list[int]:
    """The draft tokens each owner-thread step of ``engine`` evaluates from now on (its one
    draft model's context), appended to the list returned."""
    steps: list[int] = []
    draft_ctx = ctypes.cast(next(iter(engine._drafts.values()))._ctx.ctx, ctypes.c_void_p)
    decode, step = llama_cpp.llama_decode, engine.step

    def counted(ctx: Any, batch: Any) -> int:
        if ctypes.cast(ctx, ctypes.c_void_p).value == draft_ctx.value:
            steps[-1] += batch.n_tokens
        return decode(ctx, batch)

    def counting() -> None:
        steps.append(0)
        step()

    monkeypatch.setattr(llama_cpp, "llama_decode", counted)
    monkeypatch.setattr(engine, "step", counting)
    return steps


@pytest.mark.parametrize("cached", [False, True], ids=["new-prompt", "from-the-prompt-cache"])
def test_a_drafted_long_prompt_reaches_its_draft_a_chunk_per_step_beside_a_stream(
    models_root, monkeypatch, cached
):
    """A drafted request's draft (here the model itself) gets its prompt a chunk per step
    under the same budget as the model's chunks, also the part the model read from the prompt
    cache; the first speculative round evaluated the whole prompt in the draft in one step
    while the running stream waited. Output stays the undrafted one's."""
    batch = 64
    cache = {} if cached else {"prompt_cache_bytes": 0}
    engine: Any = load(models_root, "gguf", eval_batch_size=batch, **cache)
    draft = weights(models_root, "gguf")
    try:
        engine.call(lambda: engine.prepare_draft(draft)).result()
        steps = _count_draft_steps(engine, monkeypatch)
        short = engine.tokenize("apple tell me")
        head = engine.tokenize("river " + "tell me more " * 120)
        long = head + engine.tokenize(" and then why?")

        async def run():
            solo = [await scored(engine, short, 24), (await generate(engine, long, 12)).tokens]
            if cached:
                # Only the last words are new to the model, all of it to the draft.
                await generate(engine, head, 1)
            started, done = asyncio.Event(), asyncio.Event()
            first = asyncio.ensure_future(scored(engine, short, 24, started, done))
            await started.wait()
            steps.clear()
            steps.append(0)
            second, accepted = await drafted(engine, long, draft, 12)
            beside = list(steps)
            done.set()
            return solo, [await first, second], accepted, beside

        solo, together, accepted, beside = asyncio.run(run())
    finally:
        monkeypatch.undo()
        engine.close()
    assert [t for t, _ in together[0][0]] == [t for t, _ in solo[0][0]]
    assert together[1] == solo[1]
    assert accepted > 0
    # A step's catch-up chunk (at most eval_batch_size: the draft is the model), and a round
    # that evaluates at most SMALL_BATCH + 1 tokens of context and then a proposal at a time.
    assert max(beside) <= batch + SMALL_BATCH + 4, beside
    assert sum(n > 0 for n in beside) >= len(long) // batch, beside


def test_a_drafted_reply_too_short_for_a_round_leaves_its_draft_alone(models_root, monkeypatch):
    """A reply of at most two tokens never asks the draft for a proposal (its first token
    ends the prompt, its second is the last a round may yield): the draft reads none of the
    prompt, and the second token does not wait for it."""
    engine: Any = load(models_root, "gguf", eval_batch_size=64, prompt_cache_bytes=0)
    draft = weights(models_root, "gguf")
    try:
        engine.call(lambda: engine.prepare_draft(draft)).result()
        steps = _count_draft_steps(engine, monkeypatch)
        long = engine.tokenize("river " + "tell me more " * 60)
        plain = asyncio.run(generate(engine, long, 2)).tokens
        steps.clear()
        steps.append(0)
        got, _ = asyncio.run(drafted(engine, long, draft, 2))
    finally:
        monkeypatch.undo()
        engine.close()
    assert got == plain
    assert sum(steps) == 0, steps


def test_a_drafted_stream_whose_draft_has_no_room_leaves_the_step_budget_to_prompts(models_root):
    """A drafted request whose draft context has no room (here another draft sequence's
    cells fill it, as copies of a prefix that the model's sequences share can) proposes
    nothing and streams on, output unchanged; its failed catch-up must not spend the step's
    budget: it charged the whole chunk it tried every step, so a prompt admitted beside it
    and another stream got no chunk until the drafted reply had ended."""
    engine: Any = load(models_root, "gguf", eval_batch_size=64, prompt_cache_bytes=0)
    draft = weights(models_root, "gguf")
    try:
        engine.call(lambda: engine.prepare_draft(draft)).result()
        model = next(iter(engine._drafts.values()))
        # Requests take the highest free sequence ids: 0 stays the filler's.
        assert engine._n_seq > 6
        fill = (engine.tokenize(" tell me more") * engine._cells)[: engine._cells - 8]
        engine.call(lambda: model._decode(0, fill, 0, logits=False)).result()
        short = engine.tokenize("apple tell me")
        drafted = engine.tokenize("river " + "tell me more " * 40)
        other = engine.tokenize("ocean " + "why not " * 40)
        plain_request = GenerationRequest(
            tuple(drafted), SamplingParams(temperature=0.0), 40, frozenset()
        )

        async def solo() -> list[int]:
            out: list[int] = []
            async for item in engine.submit(plain_request):
                if isinstance(item, Token):
                    out.append(item.id)
                elif isinstance(item, Finished):
                    break
            return out

        plain = asyncio.run(solo())
        finished: list[str] = []

        async def run() -> list[int]:
            started, done = asyncio.Event(), asyncio.Event()
            first = asyncio.ensure_future(scored(engine, short, 24, started, done))
            await started.wait()
            request = GenerationRequest(
                tuple(drafted),
                SamplingParams(temperature=0.0),
                40,
                frozenset(),
                draft=draft,
                num_draft_tokens=4,
            )
            out: list[int] = []
            admitted: asyncio.Future[Any] | None = None

            async def beside() -> None:
                await generate(engine, other, 4)
                finished.append("beside")

            async for item in engine.submit(request):
                if isinstance(item, Token):
                    out.append(item.id)
                    if admitted is None:
                        admitted = asyncio.ensure_future(beside())
                elif isinstance(item, Finished):
                    break
            finished.append("drafted")
            assert admitted is not None
            await admitted
            done.set()
            await first
            return out

        got = asyncio.run(run())
    finally:
        engine.close()
    assert got == plain
    assert finished == ["beside", "drafted"]


def test_a_long_prompt_beside_only_drafted_streams_is_chunked_within_the_budget(
    models_root, monkeypatch
):
    """The step budget holds while the only running streams are drafted ones (their tokens
    go through speculative rounds after the batch, not in it): a long prompt admitted beside
    them was read in one chunk of up to 2,048 tokens while they waited."""
    batch = 64
    engine: Any = load(models_root, "gguf", eval_batch_size=batch, prompt_cache_bytes=0)
    draft = weights(models_root, "gguf")
    chunks: list[int] = []
    try:
        engine.call(lambda: engine.prepare_draft(draft)).result()
        decode = engine._decode

        def counted() -> None:
            b = engine._batch
            seqs = [b.seq_id[i][0] for i in range(b.n_tokens)]
            chunks.append(max(seqs.count(q) for q in set(seqs)) if seqs else 0)
            decode()

        long = engine.tokenize("river " + "tell me more " * 120)

        async def run() -> list[int]:
            request = GenerationRequest(
                tuple(engine.tokenize("apple tell me")),
                SamplingParams(temperature=0.0),
                RUNNING,
                frozenset(),
                draft=draft,
                num_draft_tokens=4,
            )
            stream = engine.submit(request)
            seen, reply = 0, []
            async for item in stream:
                if isinstance(item, Token):
                    seen += 1
                    if seen == 3:
                        monkeypatch.setattr(engine, "_decode", counted)
                        reply = (await generate(engine, long, 4)).tokens
                        monkeypatch.undo()
                        stream.cancel()
                elif isinstance(item, Finished):
                    assert item.reason == "cancelled", item
                    break
            return reply

        reply = asyncio.run(run())
        plain = asyncio.run(generate(engine, long, 4)).tokens
    finally:
        engine.close()
    assert reply == plain
    # The prompt's chunks (the only decodes with more than a draft round's tokens of one
    # sequence) within eval_batch_size each, beside the drafted stream.
    assert len(long) > 4 * batch
    assert max(chunks) <= batch, chunks
