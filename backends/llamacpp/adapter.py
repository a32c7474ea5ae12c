"""Every use of llama-cpp-python's private parts, in one place.

Checked against llama-cpp-python 0.3.36; a release that renames any of these breaks only
this module. The low-level C API (``llama_cpp.llama_*``, ``llama_cpp.mtmd_cpp``) and the
``Llama`` class's public methods are llama-cpp-python's public API and are used directly.

Private parts used here:

- ``llama_cpp._internals.LlamaContext``: a context of our own shape (parallel sequences,
  unified KV cache) over the ``Llama``'s loaded model; the engine then uses its ``ctx``
  pointer and ``close()``.
- ``llama_cpp._internals.LlamaSampler``, made by ``Llama._init_sampler(...)``: the sampler
  chain the high-level API builds (penalties, top-k/p, min-p, temperature, seeded draw); the
  engine calls its ``sample(context, index)``.
- ``Llama._model`` (``LlamaModel``): its ``model`` and ``vocab`` pointers for the C API, and
  ``n_ctx_train()``.
- ``Llama._ctx`` and ``Llama._batch``: the ``Llama``'s own context and batch, for embedding
  passes over several sequences at once.
- ``llama_cpp._utils.suppress_stdout_stderr``: silences what llama.cpp prints from C while
  a model, context or projector loads.
- ``llama_cpp._logger.llama_log_callback``: llama-cpp-python's log callback (errors only),
  which mtmd's logging is routed to.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

from llama_cpp import Llama
from llama_cpp._internals import LlamaContext, LlamaSampler
from llama_cpp._utils import suppress_stdout_stderr

__all__ = ["LlamaContext", "LlamaSampler"]


def quiet() -> AbstractContextManager[Any]:
    """Silences llama.cpp's output from C (model, context and projector loads)."""
    return suppress_stdout_stderr(disable=False)


def model_pointer(llm: Llama) -> Any:
    """The ``llama_model*`` of a loaded ``Llama``, for the C API."""
    return llm._model.model


def vocab_pointer(llm: Llama) -> Any:
    """The ``llama_vocab*`` of a loaded ``Llama``, for the C API."""
    return llm._model.vocab


def train_context_length(llm: Llama) -> int:
    return int(llm._model.n_ctx_train())


def new_context(llm: Llama, params: Any) -> LlamaContext:
    """A context with ``params`` over ``llm``'s model (call inside :func:`quiet`)."""
    return LlamaContext(model=llm._model, params=params, verbose=False)


def sampler_chain(llm: Llama, **sampling: Any) -> LlamaSampler:
    """The sampler chain ``Llama`` builds for these sampling settings (``_init_sampler``'s
    keywords: top_k, top_p, min_p, temp, repeat_penalty, frequency_penalty, ...)."""
    return llm._init_sampler(**sampling)


def embed_sequences(llm: Llama, batch: Sequence[Sequence[int]]) -> Any:
    """Decodes each token list of ``batch`` as its own sequence (ids 0..n-1) in ``llm``'s
    own context, from an empty cache; returns the ``llama_context*`` to read embeddings."""
    llm._batch.reset()
    for seq_id, ids in enumerate(batch):
        llm._batch.add_sequence(ids, seq_id, True)
    llm._ctx.kv_cache_clear()
    llm._ctx.decode(llm._batch)
    return llm._ctx.ctx


def log_callback() -> Any:
    """llama-cpp-python's C log callback (logs errors only)."""
    from llama_cpp._logger import llama_log_callback

    return llama_log_callback
