"""The loading guardrail: how much memory a load needs, and how much the machine has free.

An estimate adds up what a loaded model can come to hold, part by part (read from the
model's files by :mod:`mlxserve.core.footprint`, never from its weights):

- **weights**: the files' size (a GGUF projector included);
- **KV windows**: GGUF: the context windows of KV cells llama.cpp reserves (and clears) when
  the context is made, ``LoadOptions.kv_windows``: one pool its parallel sequences share by
  default; MLX: one per sequence decoded at once (``slots``), its batch growing one per running
  request, up to as many. A GGUF model with recurrent layers (Mamba, Gated DeltaNet) also
  gets a state per sequence id of its context (``footprint.recurrent``), in this part too;
- **prompt cache**: what keeping finished requests for reuse adds, up to
  ``prompt_cache_bytes``: MLX keeps their KV beside the batch; llama.cpp keeps them in the
  windows' own cells (counted above) and moves those new requests do not use to host
  memory, which is what the budget bounds there;
- **draft**: a speculative-decoding draft model's weights and KV (see :func:`draft_bytes`);
- **vision**: a vision model's encoder activations (see ``footprint.vision_bytes``);
- **compute**: llama.cpp without flash attention (a GGUF load with ``flash_attention: false``)
  materialises each layer's attention scores for a whole micro-batch against every cell in
  use; with it (the default) they are computed a block at a time, and what remains is the
  micro-batch's attention mask against every cell (:data:`MASK_BYTES` per entry);
- **runtime**: what a loaded text model holds besides all of that, measured
  (:data:`RUNTIME_BYTES`): its tokenizer (Hugging Face's and llguidance's), their caches,
  the engine's own buffers.

Embedding models keep no KV cache.

The prompt cache is the one part that gives way: it only holds what later requests may
reuse, so a load that fits without all of it gets a prompt cache cut to what is left
(:func:`fit`) instead of a refusal.
"""

from __future__ import annotations

import ctypes
import logging
import re
import resource
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from mlxserve.core import footprint
from mlxserve.core.registry import ModelInfo
from mlxserve.errors import MlxServeError

GB = 1_000_000_000

log = logging.getLogger("mlxserve.memory")


# What a loaded text model holds beyond its counted parts, by format: a load's RSS growth less
# its weights, as ``scripts/bench_memory.py`` measures it (tiny Qwen2, whose tokenizer has
# 151,936 tokens: MLX +43.8 MB, GGUF +51.0 MB; an earlier run +37.2 / +38.4 MB). Tokenizers
# dominate it, so a model with a smaller vocabulary holds somewhat less.
RUNTIME_BYTES = {"mlx": 44_000_000, "gguf": 51_000_000}

# llama.cpp's attention mask with flash attention, per query and cell: f32, and the f16 copy
# the kernel reads (filling the tiny Qwen2's 4 windows of 2048 grew RSS by 25.1 MB, the mask
# of 512 queries by 8192 cells is 25.2 MB).
MASK_BYTES = 6


@dataclass(frozen=True)
class Estimate:
    """Bytes a loaded model can come to hold, part by part."""

    weights: int
    kv_cache: int
    context_length: int
    # Context windows ``kv_cache`` holds (sequences decoded at once).
    windows: int = 1
    # Recurrent states ``kv_cache`` holds besides (GGUF: one per sequence id).
    states: int = 0
    prompt_cache: int = 0
    draft: int = 0
    vision: int = 0
    # Working memory of a forward pass that grows with the context (llama.cpp's attention
    # mask, and its attention scores without flash attention).
    compute: int = 0
    # Tokenizers and the engine's own buffers (see RUNTIME_BYTES).
    runtime: int = 0

    @property
    def total(self) -> int:
        return sum(self.parts().values())

    def parts(self) -> dict[str, int]:
        """Every part by name, as ``/api/v1/models/loaded`` reports them."""
        return {
            "weights": self.weights,
            "kv_cache": self.kv_cache,
            "prompt_cache": self.prompt_cache,
            "draft": self.draft,
            "vision": self.vision,
            "compute": self.compute,
            "runtime": self.runtime,
        }

    def with_draft(self, draft: int) -> Estimate:
        return replace(self, draft=self.draft + draft)

    def describe(self) -> str:
        """The non-zero parts in words: what a refusal lists."""
        windows = "window" if self.windows == 1 else "windows"
        states = f", {self.states} recurrent states" if self.states else ""
        words = {
            "weights": "weights",
            "kv_cache": f"KV cache ({self.windows} {windows} of {self.context_length} tokens"
            f"{states})",
            "prompt_cache": "prompt cache",
            "draft": "draft model",
            "vision": "vision encoder",
            "compute": "attention buffers",
            "runtime": "tokenizer and runtime",
        }
        return ", ".join(f"{size(n)} of {words[name]}" for name, n in self.parts().items() if n > 0)


def size(n: int) -> str:
    """Bytes in GB, or MB below a tenth of a GB (a tiny model's parts are not 0.00 GB)."""
    return f"{n / GB:.2f} GB" if n >= GB // 10 else f"{n / 1_000_000:.1f} MB"


class LoadRefused(MlxServeError):
    """A load the guardrail stopped: it would need more memory than the machine has free."""

    status = 400
    kind = "invalid_request_error"
    code = "insufficient_system_resources"

    def __init__(
        self,
        key: str,
        need: Estimate,
        available: int,
        *,
        what: str | None = None,
        param: str = "model",
    ) -> None:
        what = what or f"Loading '{key}' with a {need.context_length}-token context"
        super().__init__(
            f"Model loading was stopped due to insufficient system resources. {what} "
            f"requires approximately {need.total / GB:.2f} GB ({need.describe()}), but only "
            f"about {max(available, 0) / GB:.2f} GB is available. Unload other models or "
            "load this one with a smaller context_length or parallel. If you think this is "
            "incorrect, you can adjust the model loading guardrail in settings "
            "(--no-guardrail, MLXSERVE_LOAD_GUARDRAIL=false).",
            param=param,
        )
        self.need = need
        self.available = available


def estimate(
    info: ModelInfo,
    context_length: int,
    *,
    kv_f32: bool = False,
    windows: int = 1,
    kv_bits: float | None = None,
    prompt_cache: int = 0,
    scores: tuple[int, int] | None = None,
    mask: tuple[int, int] | None = None,
    sequences: int = 0,
) -> Estimate:
    """What loading ``info`` with ``context_length`` needs (reads a few files: not on the loop);
    ``windows``: context windows of KV (GGUF: those reserved; MLX: sequences decoded at
    once); ``kv_bits``: bits per
    cached element when the cache is quantized; ``prompt_cache``: bytes the engine may keep
    for prefix reuse outside those windows; ``scores``: (queries, keys) of the largest
    attention-score matrix a forward pass materialises (None: fused attention keeps none);
    ``mask``: (queries, keys) of llama.cpp's attention mask with flash attention;
    ``sequences``: sequence ids of a GGUF context, each with a state of a recurrent model's."""
    kv = compute = states = 0
    layers = footprint.recurrent(info)
    if layers is not None and sequences:
        states = sequences
        kv = layers.state_bytes * sequences
    shape = footprint.geometry(info)
    if shape is not None:
        bits = kv_bits if kv_bits is not None else (32 if kv_f32 else 16)
        kv += shape.kv_bytes_per_token(bits) * context_length * windows
        if scores is not None:
            compute = shape.scores_bytes(*scores)
    if mask is not None:
        compute += mask[0] * mask[1] * MASK_BYTES
    return Estimate(
        info.size_bytes,
        kv,
        context_length,
        windows=windows,
        states=states,
        prompt_cache=prompt_cache if info.type == "llm" else 0,
        vision=footprint.vision_bytes(info),
        compute=compute,
        runtime=RUNTIME_BYTES.get(info.format, 0) if info.type == "llm" else 0,
    )


def draft_bytes(
    draft: ModelInfo,
    main: ModelInfo,
    context_length: int,
    slots: int,
    *,
    windows: int = 1,
    flash: bool = True,
) -> int:
    """What a draft model adds to an instance of ``main``: its weights and its KV. A GGUF
    draft context mirrors the main one (its ``windows`` of cells, 16-bit KV, and
    attention scores when ``main`` runs without flash attention). MLX drafted requests run
    beside the batch, each in one of the instance's ``slots`` places (whose KV of ``main``
    the windows count already), each with a window of the draft's KV."""
    shape = footprint.geometry(draft)
    kv = 0
    if shape is not None:
        if draft.format == "gguf":
            cells = context_length * windows
            kv = shape.kv_bytes_per_token(16) * cells
            # Scores of up to 512 queries against every cell, or with flash attention its mask.
            kv += shape.scores_bytes(512, cells) if not flash else 512 * cells * MASK_BYTES
        else:
            bits = 32 if draft.quantization == "F32" else 16
            kv = shape.kv_bytes_per_token(bits) * context_length * slots
    return draft.size_bytes + kv


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


def process_resident() -> int | None:
    """This process's resident memory now (Linux), else None."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * resource.getpagesize()


def available_memory() -> int | None:
    """Bytes of memory a new load could use now, or None where the platform does not say."""
    if sys.platform.startswith("linux"):
        return _meminfo_available()
    if sys.platform == "darwin":
        return _vm_stat_available()
    return None


def budget(
    limit_gb: float | None, in_use: int, freed: int, resident: int | None = None
) -> int | None:
    """Bytes a new load may take, beside loaded models whose estimates add up to ``in_use``,
    ``freed`` of which are about to be unloaded.

    With a fixed ``limit_gb``: the limit less the estimates of the models that stay.
    Otherwise: the memory free now, plus what the unloads give back, less what the models
    that stay may still grow into (KV windows filling up, prompt caches, drafts loaded on
    first use). ``resident`` is what the process holds for models now (None: unknown, taken
    as all of their estimates); the models unloaded are taken to hold their share of it
    first. None where the platform does not say what is free."""
    if limit_gb is not None:
        return int(limit_gb * GB) - (in_use - freed)
    free_now = available_memory()
    if free_now is None:
        return None
    if resident is None:
        return free_now + freed
    kept_resident = max(resident - freed, 0)
    growth = max(in_use - freed - kept_resident, 0)
    return free_now + min(freed, resident) - growth


def fit(
    key: str,
    need: Estimate,
    available: int | None,
    *,
    what: str | None = None,
    param: str = "model",
    shrink: bool = True,
) -> Estimate:
    """``need``, or with ``shrink`` its prompt cache cut to what ``available`` leaves of it
    when the rest fits (the prompt cache only holds what may be reused; refusing a load it
    could serve without all of it would be worse); :class:`LoadRefused`, naming the parts
    that must fit, when even the rest does not."""
    if available is None or need.total <= available:
        return need
    rest = replace(need, prompt_cache=0)
    if shrink and need.prompt_cache and rest.total <= available:
        cut = replace(need, prompt_cache=available - rest.total)
        log.warning(
            "%s: prompt cache cut from %s to %s to fit in the %s available",
            key,
            size(need.prompt_cache),
            size(cut.prompt_cache),
            size(available),
        )
        return cut
    check_fits(key, rest if shrink else need, available, what=what, param=param)
    return need


def check_fits(
    key: str,
    need: Estimate,
    available: int | None,
    *,
    what: str | None = None,
    param: str = "model",
) -> None:
    """Raise :class:`LoadRefused` if ``need`` exceeds ``available`` (None: unknown, allowed);
    ``what`` names the load in the refusal (default: the model at its context length)."""
    if available is not None and need.total > available:
        log.warning(
            "refusing to load %s: needs ~%d bytes (%s), %d available",
            key,
            need.total,
            need.describe(),
            available,
        )
        raise LoadRefused(key, need, available, what=what, param=param)


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
