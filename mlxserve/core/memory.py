"""The loading guardrail: how much memory a load needs, and how much the machine has free.

An estimate is the weights' size on disk plus the KV cache of the context the model is
loaded with (layers x KV heads x head size x 2 (keys, values) x bytes per element x tokens).
Embedding models keep no KV cache. Read from the model's files, never from its weights.
"""

from __future__ import annotations

import ctypes
import json
import logging
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxserve.core.registry import ModelInfo
from mlxserve.errors import MlxServeError

GB = 1_000_000_000

log = logging.getLogger("mlxserve.memory")


@dataclass(frozen=True)
class Estimate:
    weights: int
    kv_cache: int
    context_length: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache


class LoadRefused(MlxServeError):
    """A load the guardrail stopped: it would need more memory than the machine has free."""

    status = 400
    kind = "invalid_request_error"
    code = "insufficient_system_resources"

    def __init__(self, key: str, need: Estimate, available: int) -> None:
        super().__init__(
            f"Model loading was stopped due to insufficient system resources. Loading "
            f"'{key}' with a {need.context_length}-token context requires approximately "
            f"{need.total / GB:.2f} GB ({need.weights / GB:.2f} GB of weights, "
            f"{need.kv_cache / GB:.2f} GB of KV cache), but only about "
            f"{max(available, 0) / GB:.2f} GB is available. Unload other models or load "
            "this one with a smaller context_length. If you think this is incorrect, you can "
            "adjust the model loading guardrail in settings (--no-guardrail, "
            "MLXSERVE_LOAD_GUARDRAIL=false).",
            param="model",
        )
        self.need = need
        self.available = available


def _int(value: Any) -> int | None:
    if isinstance(value, list):  # per-layer values: the largest is what the cache must hold
        value = max((v for v in value if isinstance(v, int)), default=None)
    return value if isinstance(value, int) and value > 0 else None


def _mlx_geometry(folder: Path) -> tuple[int, int, int] | None:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(config.get("text_config"), dict):
        config = {**config, **config["text_config"]}
    layers = _int(config.get("num_hidden_layers"))
    heads = _int(config.get("num_attention_heads"))
    kv_heads = _int(config.get("num_key_value_heads")) or heads
    head_dim = _int(config.get("head_dim"))
    hidden = _int(config.get("hidden_size"))
    if head_dim is None and hidden and heads:
        head_dim = hidden // heads
    if not (layers and kv_heads and head_dim):
        return None
    return layers, kv_heads, head_dim


def _gguf_geometry(file: Path) -> tuple[int, int, int] | None:
    from mlxserve.core.gguf_header import GGUFFormatError, read_header

    try:
        meta = read_header(file).metadata
    except (OSError, GGUFFormatError):
        return None
    arch = meta.get("general.architecture")
    layers = _int(meta.get(f"{arch}.block_count"))
    heads = _int(meta.get(f"{arch}.attention.head_count"))
    kv_heads = _int(meta.get(f"{arch}.attention.head_count_kv")) or heads
    head_dim = _int(meta.get(f"{arch}.attention.key_length"))
    hidden = _int(meta.get(f"{arch}.embedding_length"))
    if head_dim is None and hidden and heads:
        head_dim = hidden // heads
    if not (layers and kv_heads and head_dim):
        return None
    return layers, kv_heads, head_dim


def estimate(
    info: ModelInfo,
    context_length: int,
    *,
    kv_f32: bool = False,
    windows: int = 1,
    kv_bits: float | None = None,
) -> Estimate:
    """What loading ``info`` with ``context_length`` needs (reads a few files: not on the loop);
    ``windows``: context windows of KV the engine reserves (one per parallel GGUF sequence);
    ``kv_bits``: bits per cached element when the cache is quantized."""
    kv = 0
    if info.type == "llm":
        geometry = (
            _mlx_geometry(info.path) if info.format == "mlx" else _gguf_geometry(info.weights)
        )
        if geometry is not None:
            layers, kv_heads, head_dim = geometry
            bits = kv_bits if kv_bits is not None else (32 if kv_f32 else 16)
            per_token = int(layers * kv_heads * head_dim * 2 * bits / 8)
            kv = per_token * context_length * windows
    return Estimate(info.size_bytes, kv, context_length)


def _meminfo_available() -> int | None:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    match = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def _vm_stat_available() -> int | None:
    """macOS: free, inactive, speculative and purgeable pages can all be handed out."""
    try:
        out = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    page = re.search(r"page size of (\d+) bytes", out)
    if page is None:
        return None
    pages = 0
    for name in ("Pages free", "Pages inactive", "Pages speculative", "Pages purgeable"):
        match = re.search(rf"^{name}:\s+(\d+)", out, re.MULTILINE)
        if match:
            pages += int(match.group(1))
    return pages * int(page.group(1))


def available_memory() -> int | None:
    """Bytes of memory a new load could use now, or None where the platform does not say."""
    if sys.platform.startswith("linux"):
        return _meminfo_available()
    if sys.platform == "darwin":
        return _vm_stat_available()
    return None


def budget(limit_gb: float | None, in_use: int, freed: int) -> int | None:
    """Bytes a new load may take. With a fixed ``limit_gb``: the limit less what the loaded
    models take (``in_use``) once ``freed`` bytes of them are unloaded. Otherwise: the memory
    free now plus ``freed``. None where the platform does not say what is free."""
    if limit_gb is not None:
        return int(limit_gb * GB) - (in_use - freed)
    free_now = available_memory()
    return None if free_now is None else free_now + freed


def check_fits(key: str, need: Estimate, available: int | None) -> None:
    """Raise :class:`LoadRefused` if ``need`` exceeds ``available`` (None: unknown, allowed)."""
    if available is not None and need.total > available:
        log.warning(
            "refusing to load %s: needs ~%d bytes, %d available", key, need.total, available
        )
        raise LoadRefused(key, need, available)


def give_back_freed_memory() -> None:
    """Return freed heap memory to the system. glibc keeps large freed blocks in its arenas
    (its mmap threshold grows after the first large free, and every engine thread gets an
    arena), so without this an unloaded model's memory stays in the process."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
