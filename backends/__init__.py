"""Inference engines, one per model format, behind the interface in :mod:`backends.base`.

Heavy libraries (mlx, llama_cpp) are imported only when a model is loaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from backends.base import Engine, LoadOptions
from backends.embedding import EmbeddingEngine

if TYPE_CHECKING:
    from backends.mlx.distributed import DistributedGroup


def mlx_vision_available() -> bool:
    """Whether mlx-vlm and Pillow are installed (the ``vision`` extra)."""
    return all(importlib.util.find_spec(name) is not None for name in ("mlx_vlm", "PIL"))


def open_engine(
    format: Literal["mlx", "gguf"],
    weights: Path,
    options: LoadOptions,
    *,
    max_queue: int = 64,
    distributed: DistributedGroup | None = None,
) -> Engine:
    """Load ``weights`` (an MLX folder or a GGUF file) with the engine for its format;
    with ``distributed``, an MLX model sharded across that group's ranks."""
    if distributed is not None:
        if format != "mlx":
            raise ValueError("a distributed server serves MLX models only")
        from backends.mlx.distributed import DistributedMLXEngine

        return DistributedMLXEngine(weights, options, group=distributed, max_queue=max_queue)
    if format == "mlx":
        if mlx_vision_available():
            from backends.mlx.vision import MLXVisionEngine, has_vision_tower

            if has_vision_tower(weights):
                return MLXVisionEngine(weights, options, max_queue=max_queue)
        from backends.mlx.engine import MLXEngine

        return MLXEngine(weights, options, max_queue=max_queue)
    if format == "gguf":
        from backends.llamacpp.engine import LlamaCppEngine

        return LlamaCppEngine(weights, options, max_queue=max_queue)
    raise ValueError(f"unknown model format {format!r}")


def open_embedding_engine(
    format: Literal["mlx", "gguf"], weights: Path, options: LoadOptions, *, max_queue: int = 64
) -> EmbeddingEngine:
    """Load the embedding model ``weights`` (an MLX folder or a GGUF file)."""
    if format == "mlx":
        from backends.mlx.embeddings import MLXEmbeddingEngine

        return MLXEmbeddingEngine(weights, options, max_queue=max_queue)
    if format == "gguf":
        from backends.llamacpp.embeddings import LlamaCppEmbeddingEngine

        return LlamaCppEmbeddingEngine(weights, options, max_queue=max_queue)
    raise ValueError(f"unknown model format {format!r}")
