"""The embedding-engine interface: token ids in, one pooled vector per input out.

Like a generation :class:`~backends.base.Engine`, an embedding engine owns one thread and
makes every call into its inference library there; the event loop only queues work and
awaits a future. A request's inputs are embedded in batches (sorted by length, so that
similar lengths share a batch), never one by one.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from backends.base import LoadOptions
from backends.owner import OwnerThread

Pooling = Literal["mean", "cls", "last", "max"]


@dataclass(frozen=True)
class EmbeddingInfo:
    """What the core needs to know about a loaded embedding model."""

    format: Literal["mlx", "gguf"]
    dimensions: int
    # Most tokens one input may have, the model's own special tokens included.
    context_length: int
    vocab_size: int
    pooling: Pooling
    normalize: bool
    # Special tokens the model's tokenizer puts around every input (BERT: [CLS] ... [SEP]).
    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()
    # Reduced sizes the model was trained to give (Matryoshka), smallest first; empty if none.
    matryoshka_dimensions: tuple[int, ...] = ()


class EmbeddingCancelled(Exception):
    """The request was cancelled before all its inputs were embedded."""


class EmbeddingEngine(ABC):
    """One loaded embedding model. Subclasses implement :meth:`_load`, :meth:`_encode`,
    :meth:`tokenize` and :meth:`_unload`; :meth:`embed` does the batching."""

    format: Literal["mlx", "gguf"]
    # Token budget of one forward pass, and whether padding counts against it (a padded
    # [batch, longest] tensor) or only real tokens do (llama.cpp packs sequences).
    batch_tokens: int = 4096
    padded: bool = True
    max_batch_inputs: int = 256

    def __init__(self, path: Path, options: LoadOptions, *, max_queue: int = 64) -> None:
        self.path = path
        self.options = options
        self.embedded_inputs = 0
        self._owner = OwnerThread(f"embed:{path.name}", max_queue)
        try:
            self.info: EmbeddingInfo = self._owner.call(self._load).result()
        except BaseException:
            self._owner.close()  # a failed load must not leave its owner thread behind
            raise

    # --- to implement -------------------------------------------------------------------

    @abstractmethod
    def _load(self) -> EmbeddingInfo:
        """Load the model (on the owner thread) and describe it."""

    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without the model's special tokens. Thread-safe."""

    @abstractmethod
    def _encode(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """Pooled, not yet normalized float32 vectors ``[len(batch), dimensions]`` of complete
        inputs (special tokens included). Called on the owner thread."""

    @abstractmethod
    def _unload(self) -> None:
        """Free the model's memory (on the owner thread)."""

    # --- shared machinery ---------------------------------------------------------------

    def embed(
        self, inputs: Sequence[Sequence[int]], cancel: threading.Event | None = None
    ) -> Future[np.ndarray]:
        """Queue ``inputs`` (complete token sequences, each within the context length); the
        future holds their float32 vectors in order, normalized if the model says so.
        Setting ``cancel`` drops the work between two batches."""
        stop = cancel or threading.Event()
        return self._owner.submit(lambda: self._embed_all(inputs, stop))

    @property
    def pending(self) -> int:
        """Requests queued or running."""
        return self._owner.pending

    def close(self) -> None:
        """Stop the owner thread after the queued work and free the model."""
        self._owner.close(self._unload)

    def batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Indices of the inputs grouped into forward passes: shortest first, each pass within
        the token budget (one input longer than the budget gets a pass of its own)."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        groups: list[list[int]] = []
        current: list[int] = []
        cost = 0
        for i in order:
            n = lengths[i]
            # Sorted ascending, so with padding the newest input sets the width of the pass.
            new_cost = n * (len(current) + 1) if self.padded else cost + n
            if current and (new_cost > self.batch_tokens or len(current) >= self.max_batch_inputs):
                groups.append(current)
                current, new_cost = [], n
            current.append(i)
            cost = new_cost
        if current:
            groups.append(current)
        return groups

    def _embed_all(self, inputs: Sequence[Sequence[int]], cancel: threading.Event) -> np.ndarray:
        out = np.empty((len(inputs), self.info.dimensions), np.float32)
        for group in self.batches([len(x) for x in inputs]):
            if cancel.is_set():
                raise EmbeddingCancelled
            out[group] = self._encode([inputs[i] for i in group])
        if self.info.normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        self.embedded_inputs += len(inputs)
        return out
