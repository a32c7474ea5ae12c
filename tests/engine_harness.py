"""Helpers for tests that drive an engine directly (no HTTP)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from script_loader import load_script

from backends import open_engine
from backends.base import (
    Engine,
    Finished,
    GenerationRequest,
    LoadOptions,
    PromptProgress,
    SamplingParams,
    Token,
)
from tests.conftest import MODELS_CACHE, PUBLISHER

# Models KV-cache quantization can run on: one attention head of 64 (mx.quantize needs
# groups of 32 or 64; the shared tiny model's heads are 16 wide).
ONEHEAD_ROOT = MODELS_CACHE.parent / "test-models-kvq"
ONEHEAD_NAME = "tiny-qwen2-onehead"


def onehead_models() -> dict[str, Path]:
    """The tiny Qwen2 with one head of 64, as MLX and GGUF (made once, then cached)."""
    # Its own copy: the size below stays out of the shared one.
    mtm = load_script("make_test_models")
    mtm.HIDDEN, mtm.INTERMEDIATE, mtm.LAYERS, mtm.HEADS, mtm.KV_HEADS = 64, 128, 2, 1, 1
    return mtm.generate(ONEHEAD_ROOT, publisher=PUBLISHER, name=ONEHEAD_NAME, seed=0)


def weights(models_root: Path, fmt: str) -> Path:
    folder = models_root / PUBLISHER / f"tiny-qwen2-{fmt}"
    return folder if fmt == "mlx" else next(folder.glob("*.gguf"))


def load(models_root: Path, fmt: str, **options: int) -> Engine:
    kw = {"context_length": 2048, "kv_cache_f32": True, **options}
    return open_engine(fmt, weights(models_root, fmt), LoadOptions(**kw))  # type: ignore[arg-type]


@contextmanager
def warm_and_cold(models_root: Path, fmt: str) -> Iterator[tuple[Engine, Engine]]:
    """The tiny Qwen2 twice: with the prompt cache, and without it (a cold run's reference)."""
    warm = load(models_root, fmt)
    cold = load(models_root, fmt, prompt_cache_bytes=0)
    try:
        yield warm, cold
    finally:
        warm.close()
        cold.close()


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    reason: str = ""
    cached: int = 0
    written: int = 0


async def generate(
    engine: Engine, prompt: list[int], max_tokens: int = 16, cancel_after: int | None = None, **sp
) -> Result:
    sampling = SamplingParams(**{"temperature": 0.0, **sp})
    request = GenerationRequest(tuple(prompt), sampling, max_tokens, engine.info.eos_token_ids)
    stream = engine.submit(request)
    result = Result()
    async for item in stream:
        if isinstance(item, Token):
            result.tokens.append(item.id)
            if cancel_after is not None and len(result.tokens) >= cancel_after:
                stream.cancel()
        elif isinstance(item, PromptProgress):
            result.cached = max(result.cached, item.cached)
        elif isinstance(item, Finished):
            result.reason = item.reason
            result.written = item.cache_written
            return result
    raise AssertionError("the stream ended without Finished")


async def drafted(
    engine: Engine, prompt: list[int], draft: Path | None, n: int
) -> tuple[list[int], int]:
    """``n`` greedy tokens of ``prompt`` (no stop token) drafted by ``draft`` (4 a round; none
    when None), and how many of the draft's proposals were accepted."""
    request = GenerationRequest(
        tuple(prompt),
        SamplingParams(temperature=0.0),
        n,
        frozenset(),
        draft=draft,
        num_draft_tokens=4,
    )
    out: list[int] = []
    async for item in engine.submit(request):
        if isinstance(item, Token):
            out.append(item.id)
        elif isinstance(item, Finished):
            return out, item.draft.accepted if item.draft is not None else 0
    raise AssertionError("the stream ended without Finished")


# A running stream's room (see ``scored``): it is certainly still decoding when another
# request is admitted, however late the event loop is to submit it (the owner thread decodes
# on without it).
RUNNING = 2000


async def scored(
    engine: Engine,
    prompt: list[int],
    n: int,
    started: asyncio.Event | None = None,
    until: asyncio.Event | None = None,
    stop: frozenset[int] | None = None,
) -> tuple[list[tuple[int, float]], list[int]]:
    """The reply's first ``n`` tokens with their log probabilities, and the prompt tokens
    processed at each progress report; the reply ends before a ``stop`` token (default: the
    model's end-of-generation tokens). With ``until``, the request runs on (``RUNNING`` tokens
    of room, no stop token) and is cancelled once ``until`` is set; what it returns still
    ends where a stop token would have ended it."""
    running = until is not None
    stop = engine.info.eos_token_ids if stop is None else stop
    request = GenerationRequest(
        tuple(prompt),
        SamplingParams(temperature=0.0),
        RUNNING if running else n,
        frozenset() if running else stop,
        logprobs=0,
    )
    stream = engine.submit(request)
    out: list[tuple[int, float]] = []
    processed: list[int] = []
    async for item in stream:
        if isinstance(item, Token):
            assert item.logprobs is not None
            out.append((item.id, item.logprobs.logprob))
            if started is not None and len(out) == 3:
                started.set()
            if until is not None and until.is_set() and len(out) >= n:
                stream.cancel()
        elif isinstance(item, PromptProgress):
            processed.append(item.processed)
        elif isinstance(item, Finished):
            # Cancelled, so it decoded beside the other request from start to end.
            assert not running or item.reason == "cancelled", item
            end = next((i for i, (token, _) in enumerate(out) if token in stop), len(out))
            return out[: min(n, end)], processed
    raise AssertionError("the stream ended without Finished")


async def second_turn(
    warm: Engine, cold: Engine, turn1: list[int], follow: str, max_tokens: int
) -> tuple[Result, list[int], Result, Result]:
    """A chat's first turn on ``warm``, then its second (``turn1``, the reply, ``follow``) on
    ``warm`` and on ``cold``: (first, the second turn's prompt, second, cold second)."""
    first = await generate(warm, turn1, max_tokens)
    turn2 = turn1 + first.tokens + warm.tokenize(follow)
    second = await generate(warm, turn2, max_tokens)
    return first, turn2, second, await generate(cold, turn2, max_tokens)


# A draft that agrees with the tiny Qwen2 on part of a continuation: the same weights with
# noise of this scale added to its last layer's MLP (it then picks another greedy token now
# and then, so verification both accepts and rejects). In the name: a new scale, a new model.
NEAR_NOISE = 0.02
NEAR_NAME = "tiny-qwen2-near2"


def near_models(root: Path = MODELS_CACHE) -> dict[str, Path]:
    """The tiny Qwen2 with its last layer perturbed, as MLX and GGUF (made once, cached)."""
    # Its own copy: the weights below stay out of the shared one.
    mtm = load_script("make_test_models")
    plain = mtm.make_weights

    def perturbed(seed: int, n_vocab: int) -> dict[str, np.ndarray]:
        w = plain(seed, n_vocab)
        rng = np.random.default_rng(seed + 1)
        last = f"model.layers.{mtm.LAYERS - 1}.mlp."
        for name in (f"{last}up_proj.weight", f"{last}down_proj.weight"):
            noise = rng.standard_normal(w[name].shape, dtype=np.float32)
            w[name] = w[name] + noise * np.float32(NEAR_NOISE)
        return w

    mtm.make_weights = perturbed
    return mtm.generate(root, publisher=PUBLISHER, name=NEAR_NAME, seed=0)
