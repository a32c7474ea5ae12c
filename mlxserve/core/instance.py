"""A loaded model instance and how it stays resident: the records the manager, the loader
and the idle reaper share."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from backends.base import Engine
from backends.embedding import EmbeddingEngine
from mlxserve.core.families import LoadedFamily, load_family
from mlxserve.core.memory import Estimate
from mlxserve.core.metrics import ModelMeter
from mlxserve.core.registry import ModelInfo
from mlxserve.core.templates import ChatTemplate


@dataclass(frozen=True)
class LoadRequest:
    """How to load a model: LM Studio's load options (None: the default). The llama.cpp-only
    ones are ignored for MLX models and for embedding models."""

    context_length: int | None = None
    eval_batch_size: int | None = None
    flash_attention: bool | None = None
    offload_kv_cache_to_gpu: bool | None = None
    num_experts: int | None = None
    # Requests decoded at once (LM Studio's ``parallel``): GGUF parallel sequences, MLX batch.
    parallel: int | None = None
    # KV-cache quantization: bits for MLX models; llama.cpp cache types for GGUF models.
    kv_cache_quantization: int | None = None
    cache_type_k: str | None = None
    cache_type_v: str | None = None
    # The draft model requests use for speculative decoding unless they name their own.
    draft_model: str | None = None
    # The instance id to give it (LM Studio's ``--identifier``); default: the key, then key:2...
    identifier: str | None = None
    ttl: float | None = None


@dataclass(kw_only=True)
class Residency:
    """How an instance stays loaded: who loaded it, its idle TTL, and who is using it."""

    jit: bool = False
    ttl: float | None = None
    # What it was loaded with, as LM Studio reports it (``load_config``).
    load_config: dict[str, Any] = field(default_factory=dict)
    # What the guardrail counts for it, in all and part by part (a draft loaded on first use
    # adds to both), and the draft models counted in them.
    memory_bytes: int = 0
    memory: Estimate | None = None
    drafts: set[str] = field(default_factory=set)
    last_used: float = 0.0
    # Seen busy by the reaper since it last counted idle time.
    busy_seen: bool = False
    # A later just-in-time load evicts this one once it is idle (it was busy at the time).
    evict_when_idle: bool = False
    # Leases held on it; it is never closed while one is held.
    holds: int = 0
    released: asyncio.Event = field(default_factory=asyncio.Event)
    # Where its generations report tokens and latencies (set when an observer is attached).
    meter: ModelMeter | None = None


@dataclass
class Instance(Residency):
    """A model loaded in memory and ready to serve."""

    id: str
    info: ModelInfo
    engine: Engine
    template: ChatTemplate
    loaded_at: float
    load_seconds: float

    @property
    def context_length(self) -> int:
        return self.engine.info.context_length

    @cached_property
    def family(self) -> LoadedFamily:
        """The model's family (its tool-call and reasoning formats), judged once per load."""
        config = {"architecture": self.info.architecture}
        return load_family(self.template.source, config, self.engine.tokenize)


@dataclass
class EmbeddingInstance(Residency):
    """An embedding model loaded in memory and ready to serve."""

    id: str
    info: ModelInfo
    engine: EmbeddingEngine
    loaded_at: float
    load_seconds: float

    @property
    def context_length(self) -> int:
        return self.engine.info.context_length


Loaded = Instance | EmbeddingInstance


def is_busy(instance: Loaded) -> bool:
    """Leased, or with requests queued or running on its engine."""
    return instance.holds > 0 or instance.engine.pending > 0


def memory_report(instance: Loaded) -> dict[str, int]:
    """What the guardrail counts for ``instance``, part by part (``memory`` in
    ``/api/v1/models`` and ``/api/v1/models/loaded``); the parts add up to ``total_bytes``."""
    need = instance.memory
    if need is None:
        return {"total_bytes": instance.memory_bytes}
    report = {"total_bytes": instance.memory_bytes, "kv_windows": need.windows}
    report |= {f"{name}_bytes": n for name, n in need.parts().items()}
    return report
