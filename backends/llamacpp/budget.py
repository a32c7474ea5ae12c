"""The GGUF engine's per-step budget for prompt work beside decoding streams: T tokens
evaluated with C cells in use cost T * (W + C + T) in units of one cell (W: the model's
weight_cells), as the prompt chunks and a draft's catch-up are priced (see
LlamaCppEngine._step)."""

from __future__ import annotations

import math


def tokens_within(budget: float, base: float, want: int) -> int:
    """How many of ``want`` tokens fit ``budget`` when T tokens cost T * (``base`` + T)."""
    fit = int((math.sqrt(base * base + 4 * max(budget, 0.0)) - base) / 2)
    return max(0, min(want, fit))
