"""A request decoding in the GGUF engine's shared context, as one llama.cpp sequence."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from backends.base import PENALTY_WINDOW, Job
from backends.llamacpp.adapter import LlamaSampler
from backends.llamacpp.draft import DraftModel
from backends.llamacpp.hostcache import StateFile
from backends.llamacpp.reuse import Run
from backends.llamacpp.vision import Chunks


@dataclass
class _Seq:
    """A request decoding in the shared context as llama.cpp sequence ``seq``."""

    job: Job
    seq: int
    prompt: list[int]
    cached: int
    sampler: LlamaSampler
    # Tokens in the KV cache for this sequence, then the sampled token not yet evaluated.
    tokens: list[int] = field(default_factory=list)
    pending: int | None = None
    # The sampled tokens the sampler chain's penalties look at (for log probabilities).
    recent: deque[int] = field(default_factory=lambda: deque(maxlen=PENALTY_WINDOW))
    # Cells minus positions: images take fewer positions than cells on M-RoPE models.
    pos_shift: int = 0
    # Decoding through speculative rounds with this draft model (see _spec_round).
    draft: DraftModel | None = None
    # Prompt-cache runs moved to their new positions, waiting in sequence ``hold`` until
    # decoding reaches them (see backends.llamacpp.reuse).
    hold: int | None = None
    runs: deque[Run] = field(default_factory=deque)
    # The prompt's images not yet in the cache, evaluated one piece per step (see _image_piece).
    media: Chunks | None = None
    # Admission order: a preempted sequence resumes at its place among the running ones.
    order: int = 0
    # The kept sequence whose first ``borrowed`` cells this one shares (llama_memory_seq_cp),
    # while it is kept: those cells are counted once, with it (see KeptSequences._cells_used).
    source: int | None = None
    borrowed: int = 0
    # Its llama.cpp state while preempted (out of the context, see PooledSequences._preempt):
    # in host memory, or in a file when the host budget is spent.
    parked: memoryview | StateFile | None = None
