"""A draft model's context has as many cells as the GGUF model's one pool, but sequences that
share a prefix in the model's cells each hold a copy of it in the draft's: the draft runs out
of room first. Then the request is not drafted for a round, and what its context got evaluated
stays for the next round."""

from __future__ import annotations

import asyncio
import ctypes
import threading
from typing import Any

import llama_cpp
import pytest

from backends.llamacpp.engine import LlamaCppEngine
from tests.engine_harness import drafted, load, weights

pytestmark = pytest.mark.filterwarnings("ignore:llama_token_get_attr:DeprecationWarning")


def _drafted_beside_a_shared_prefix(models_root, monkeypatch, windows: int):
    """Three drafted requests (the model drafting for itself, 32-token batches) whose 136-token
    prefix the model keeps once, on a 256-cell context reserving ``windows`` windows: their
    replies and the tokens the draft's context evaluated."""
    engine: Any = load(
        models_root,
        "gguf",
        context_length=256,
        parallel=3,
        eval_batch_size=32,
        reserved_windows=windows,
    )
    assert isinstance(engine, LlamaCppEngine)
    draft_model = weights(models_root, "gguf")
    evaluated = [0]
    try:
        engine.call(lambda: engine.prepare_draft(draft_model)).result()
        draft = next(iter(engine._drafts.values()))
        draft_ctx = ctypes.cast(draft._ctx.ctx, ctypes.c_void_p).value
        decode = llama_cpp.llama_decode

        def counted(ctx: Any, batch: Any) -> int:
            rc = decode(ctx, batch)
            if rc == 0 and ctypes.cast(ctx, ctypes.c_void_p).value == draft_ctx:
                evaluated[0] += batch.n_tokens
            return rc

        monkeypatch.setattr(llama_cpp, "llama_decode", counted)
        prefix = engine.tokenize("You are a helpful assistant who answers briefly. " * 15)

        async def reply(prompt: list[int], n: int, with_draft: bool) -> list[int]:
            return (await drafted(engine, prompt, draft_model if with_draft else None, n))[0]

        async def main() -> list[list[int]]:
            # The prefix is kept in the model's cells; the three requests share it there.
            await reply(prefix, 1, False)
            evaluated[0] = 0
            gate = threading.Event()
            engine.call(gate.wait)
            questions = [prefix + engine.tokenize(f" Question {i}: why?") for i in range(3)]
            tasks = [asyncio.ensure_future(reply(q, 20, True)) for q in questions]
            await asyncio.sleep(0.05)
            gate.set()
            return await asyncio.gather(*tasks)

        return asyncio.run(main()), evaluated[0]
    finally:
        monkeypatch.undo()
        engine.close()


def test_a_full_draft_context_keeps_what_it_evaluated(models_root, monkeypatch):
    roomy, roomy_evaluated = _drafted_beside_a_shared_prefix(models_root, monkeypatch, 3)
    pooled, pooled_evaluated = _drafted_beside_a_shared_prefix(models_root, monkeypatch, 1)
    assert pooled == roomy
    # With room the draft evaluates each context once (480 tokens); in the pool it went over
    # a request's whole context again every round it found no room (1,151; 575 now: what a
    # preempted request evaluates again after it resumes).
    assert pooled_evaluated <= 1.5 * roomy_evaluated, (pooled_evaluated, roomy_evaluated)
