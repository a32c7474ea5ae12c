"""The GGUF engine's per-step budget for prompt work beside decoding streams: T tokens
evaluated with C cells in use cost T * (W + C + T) in units of one cell (W: the model's
weight_cells), as the prompt chunks and a draft's catch-up are priced (see
LlamaCppEngine._step)."""

from __future__ import annotations

import math

# The share of one eval_batch_size chunk on an empty context that a step's prompt work may
# cost while streams decode. The admission bound (one chunk alone plus one step) is met or
# missed by the longest of a 4k prompt's 18-24 steps, and on the 2-core Linux CPU steps priced
# alike spread by a third around their median: replayed in llama.cpp (bench_step_cost.py
# --schedule, full bench model, 4-5 rounds), the longest step read 1.17-1.46x the bound at a
# whole chunk and 0.99-1.09x at 3/4, the prompt's own time within the runs' spread (its
# attention costs the same in smaller chunks; each extra step adds a pass over the weights).
STEP_SHARE = 0.75


def tokens_within(budget: float, base: float, want: int) -> int:
    """How many of ``want`` tokens fit ``budget`` when T tokens cost T * (``base`` + T)."""
    fit = int((math.sqrt(base * base + 4 * max(budget, 0.0)) - base) / 2)
    return max(0, min(want, fit))
