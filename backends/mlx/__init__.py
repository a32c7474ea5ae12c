"""MLX engines (mlx-lm for chat, our BERT for embeddings)."""

from __future__ import annotations

import gc


def release_thread_memory() -> None:
    """Run on an owner thread after it dropped its model: free MLX's buffers for real and
    the thread's streams (left behind, MLX's CPU backend may abort the process at exit with
    "terminate called without an active exception")."""
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()
    clear_streams = getattr(mx, "clear_streams", None)
    if clear_streams is not None:
        clear_streams()
