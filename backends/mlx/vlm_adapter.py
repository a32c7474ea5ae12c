"""Every use of mlx-vlm's private parts, in one place.

Checked against mlx-vlm 0.7.10; a release that renames any of these breaks only this
module. ``load``, ``utils.prepare_inputs``, ``generate.generate_step``, a model's
``language_model``/``config`` and the language model's ``get_rope_index`` are used directly.

Private parts used here:

- ``_rope_deltas`` and ``_position_ids``: per-request M-RoPE state mlx-vlm's language
  models (Qwen2-VL and kin) keep on the module between decoding steps. The engine saves and
  restores them around each step so several image requests can interleave, and sets them
  from ``get_rope_index`` when a cached prefix skips the prompt's first pass.
"""

from __future__ import annotations

from typing import Any

_STEP_STATE = ("_rope_deltas", "_position_ids")


def step_state(lm: Any) -> dict[str, Any]:
    """A fresh (empty) per-request state for the attributes ``lm`` keeps."""
    return {k: None for k in _STEP_STATE if hasattr(lm, k)}


def rope_state(state: dict[str, Any], positions: Any, deltas: Any) -> dict[str, Any]:
    """``state`` holding these M-RoPE positions and deltas."""
    values = {"_position_ids": positions, "_rope_deltas": deltas}
    return {k: values[k] for k in state}


def load_state(lm: Any, state: dict[str, Any]) -> None:
    for key, value in state.items():
        setattr(lm, key, value)


def save_state(lm: Any, state: dict[str, Any]) -> dict[str, Any]:
    return {k: getattr(lm, k) for k in state}
