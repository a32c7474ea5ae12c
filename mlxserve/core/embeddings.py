"""The one path every embedding request takes: model, tokens, window, engine, vectors."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import numpy as np

from backends.embedding import EmbeddingCancelled, EmbeddingInfo
from backends.owner import QueueFull
from mlxserve.core.manager import ModelManager
from mlxserve.errors import EngineFailure, InputTooLong, InvalidRequest, Overloaded

Inputs = tuple[str, ...] | tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class EmbeddingRequest:
    """Texts, or token-id arrays (the text's tokens; the model's special tokens are added
    where missing), to embed with one model. ``single``: the client sent one input, not an
    array of them."""

    model: str
    inputs: Inputs
    single: bool = False
    # Cut inputs longer than the model's window to fit instead of refusing them.
    truncate: bool = False
    dimensions: int | None = None
    ttl: float | None = None


@dataclass(frozen=True)
class Embeddings:
    model: str  # the instance that made them
    vectors: np.ndarray  # float32, [inputs, dimensions]
    prompt_tokens: int


class EmbeddingsCancelled(Exception):
    """The client went away; nothing is sent."""


def _param(request: EmbeddingRequest, index: int) -> str:
    return "input" if request.single else f"input[{index}]"


def _check_dimensions(request: EmbeddingRequest, info: EmbeddingInfo) -> int:
    wanted = request.dimensions
    if wanted is None or wanted == info.dimensions:
        return info.dimensions
    if wanted > info.dimensions:
        raise InvalidRequest(
            f"dimensions must be at most {info.dimensions} for this model.", param="dimensions"
        )
    if not info.matryoshka_dimensions:
        raise InvalidRequest(
            f"This model does not support reduced dimensions; it always gives "
            f"{info.dimensions}. Omit dimensions or set it to {info.dimensions}.",
            param="dimensions",
        )
    return wanted


def _complete(
    request: EmbeddingRequest, token_lists: list[list[int]], info: EmbeddingInfo, *, ids: bool
) -> list[list[int]]:
    """Each input as the model sees it: within its special tokens, within its window. Token-id
    inputs may already hold the special tokens (as a tokenizer adds them by default)."""
    prefix, suffix = list(info.prefix), list(info.suffix)
    room = info.context_length - len(prefix) - len(suffix)
    out: list[list[int]] = []
    for i, body in enumerate(token_lists):
        if ids and prefix and body[: len(prefix)] == prefix:
            body = body[len(prefix) :]
        if ids and suffix and body[-len(suffix) :] == suffix:
            body = body[: -len(suffix)]
        if len(body) > room:
            if not request.truncate:
                which = "The input" if request.single else f"Input {i}"
                raise InputTooLong(
                    f"{which} has {len(body) + len(prefix) + len(suffix)} tokens, more than "
                    f"this model's maximum of {info.context_length} tokens per input. Shorten "
                    'it, or send "truncate": true to embed only its first tokens.',
                    param=_param(request, i),
                )
            body = body[:room]
        out.append(prefix + body + suffix)
    return out


async def embed(
    manager: ModelManager, request: EmbeddingRequest, cancel: threading.Event | None = None
) -> Embeddings:
    """Resolve the model, tokenize, fit every input to the window, embed in batches.

    Everything that can be the client's fault is raised before the engine sees the inputs.
    """
    # Leased until the work is queued: an engine closes only after its queued work.
    async with manager.lease_embedder(request.model, ttl=request.ttl) as instance:
        engine = instance.engine
        info = engine.info
        dimensions = _check_dimensions(request, info)
        texts = [t for t in request.inputs if isinstance(t, str)]
        if texts:
            token_lists = await asyncio.to_thread(engine.tokenize, texts)
        else:
            token_lists = [list(ids) for ids in request.inputs if not isinstance(ids, str)]
            for i, ids in enumerate(token_lists):
                bad = next((t for t in ids if t >= info.vocab_size), None)
                if bad is not None:
                    raise InvalidRequest(
                        f"Token id {bad} is out of range: this model's vocabulary has ids 0 "
                        f"to {info.vocab_size - 1}.",
                        param=_param(request, i),
                    )
        sequences = _complete(request, token_lists, info, ids=not texts)
        try:
            future = engine.embed(sequences, cancel)
        except QueueFull as exc:
            raise Overloaded(f"Model '{instance.id}' is busy: {exc}. Retry shortly.") from exc
    try:
        vectors = await asyncio.wrap_future(future)
    except EmbeddingCancelled as exc:
        raise EmbeddingsCancelled from exc
    except Exception as exc:
        raise EngineFailure(f"Embedding failed: {type(exc).__name__}: {exc}") from exc
    if dimensions < info.dimensions:
        vectors = np.ascontiguousarray(vectors[:, :dimensions])
        if info.normalize:
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return Embeddings(instance.id, vectors, sum(len(s) for s in sequences))
