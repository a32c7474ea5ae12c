"""Inference engines, one per model format, behind the interface in :mod:`backends.base`.

Heavy libraries (mlx, llama_cpp) are imported only when a model is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from backends.base import Engine, LoadOptions


def open_engine(
    format: Literal["mlx", "gguf"], weights: Path, options: LoadOptions, *, max_queue: int = 64
) -> Engine:
    """Load ``weights`` (an MLX folder or a GGUF file) with the engine for its format."""
    if format == "mlx":
        from backends.mlx.engine import MLXEngine

        return MLXEngine(weights, options, max_queue=max_queue)
    if format == "gguf":
        from backends.llamacpp.engine import LlamaCppEngine

        return LlamaCppEngine(weights, options, max_queue=max_queue)
    raise ValueError(f"unknown model format {format!r}")
