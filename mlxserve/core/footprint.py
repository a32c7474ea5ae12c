"""What a model's files say about the memory it takes beyond its weights: the KV cache per
token, and the activations of its vision encoder. Read from ``config.json`` /
``preprocessor_config.json`` (MLX) or GGUF headers, never from the weights."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxserve.core.registry import ModelInfo

# Bytes of one activation value: vision encoders run in f32 on llama.cpp's CPU and Metal
# backends; MLX keeps the weights' dtype, at most f32.
ACTIVATION_BYTES = 4
# Activation values alive at once per patch, in units of the encoder's width: the residual
# stream, its norm, queries, keys, values and the attention output of one block (blocks run
# one after the other, so one block's worth is the peak), plus its MLP's hidden layer.
WIDTHS_PER_PATCH = 6
# llama.cpp warms Qwen2-VL-style projectors up with a 46x46-token image ("avoid OOM on
# warmup" in clip.cpp) and reserves its compute buffer for that size.
GGUF_WARMUP_TOKENS = 46 * 46
# llama.cpp keeps recurrent states in f32 whatever the KV cache's type.
STATE_BYTES = 4


def _int(value: Any) -> int | None:
    if isinstance(value, list):  # per-layer values: the largest is what the cache must hold
        value = max((v for v in value if isinstance(v, int)), default=None)
    return value if isinstance(value, int) and value > 0 else None


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _gguf_meta(file: Path) -> dict[str, Any]:
    from mlxserve.core.gguf_header import GGUFFormatError, read_header

    try:
        return read_header(file).metadata
    except (OSError, GGUFFormatError):
        return {}


@dataclass(frozen=True)
class Geometry:
    """The attention layers' shape: what one cached token costs."""

    layers: int
    kv_heads: int
    head_dim: int
    heads: int

    def kv_bytes_per_token(self, bits: float) -> int:
        """Keys and values of one token in every layer, at ``bits`` per element."""
        return int(self.layers * self.kv_heads * self.head_dim * 2 * bits / 8)

    def scores_bytes(self, queries: int, keys: int) -> int:
        """f32 attention scores of ``queries`` tokens against ``keys`` cells in one layer:
        what attention without flash attention materialises (layers run one by one)."""
        return self.heads * queries * keys * ACTIVATION_BYTES


def _geometry(
    layers: Any, heads: Any, kv_heads: Any, head_dim: Any, hidden: Any
) -> Geometry | None:
    n_layers, n_heads = _int(layers), _int(heads)
    n_kv = _int(kv_heads) or n_heads
    dim = _int(head_dim)
    width = _int(hidden)
    if dim is None and width and n_heads:
        dim = width // n_heads
    if not (n_layers and n_kv and dim):
        return None
    return Geometry(n_layers, n_kv, dim, n_heads or n_kv)


def geometry(info: ModelInfo) -> Geometry | None:
    """The KV geometry of a text model (None: unknown, or a model without a KV cache)."""
    if info.type != "llm":
        return None
    if info.format == "mlx":
        config = _json(info.path / "config.json")
        if isinstance(config.get("text_config"), dict):
            config = {**config, **config["text_config"]}
        return _geometry(
            config.get("num_hidden_layers"),
            config.get("num_attention_heads"),
            config.get("num_key_value_heads"),
            config.get("head_dim"),
            config.get("hidden_size"),
        )
    meta = _gguf_meta(info.weights)
    arch = meta.get("general.architecture")
    layers = _int(meta.get(f"{arch}.block_count"))
    interval = _int(meta.get(f"{arch}.full_attention_interval"))
    if layers and interval:
        # Qwen3-Next / Qwen3.5: one attention layer in ``interval``, the others recurrent
        # (llama.cpp keeps KV cells for the attention layers only).
        layers //= interval
    return _geometry(
        layers,
        meta.get(f"{arch}.attention.head_count"),
        meta.get(f"{arch}.attention.head_count_kv"),
        meta.get(f"{arch}.attention.key_length"),
        meta.get(f"{arch}.embedding_length"),
    )


@dataclass(frozen=True)
class Recurrent:
    """A GGUF model's recurrent layers (Mamba's SSM, Gated DeltaNet): llama.cpp keeps, for
    every sequence id of a context, one state per such layer, in f32, whatever the context
    length."""

    layers: int
    # One sequence's state over all those layers.
    state_bytes: int


def recurrent(info: ModelInfo) -> Recurrent | None:
    """The recurrent layers of a GGUF text model, from its ``ssm.*`` metadata (None: none).
    A model that says which layers attend (``full_attention_interval``) has the others
    recurrent; any other has every layer counted as recurrent (right for Mamba and for
    hybrids with both in every layer, an upper bound for the rest)."""
    if info.type != "llm" or info.format != "gguf":
        return None
    meta = _gguf_meta(info.weights)
    arch = meta.get("general.architecture")

    def ssm(key: str) -> int:
        return _int(meta.get(f"{arch}.ssm.{key}")) or 0

    inner, state = ssm("inner_size"), ssm("state_size")
    blocks = _int(meta.get(f"{arch}.block_count"))
    if not (inner and state and blocks):
        return None
    interval = _int(meta.get(f"{arch}.full_attention_interval"))
    layers = blocks - blocks // interval if interval else blocks
    # llama.cpp's per-layer sizes: the convolution's last kernel - 1 inputs over the x, B and
    # C channels (``n_embd_r``), and the SSM state (``n_embd_s``).
    conv = max(ssm("conv_kernel") - 1, 0) * (inner + 2 * ssm("group_count") * state)
    return Recurrent(layers, layers * (conv + state * inner) * STATE_BYTES)


def _encoder_bytes(pixels: int, patch: int, width: int, ffn: int, channels: int = 3) -> int:
    """Peak activations of a ViT encoding one image of ``pixels`` pixels: the f32 image, and
    one block's values per patch. Attention scores are not counted: llama.cpp's projector
    runs flash attention (it says so at load) and MLX's fused attention does not keep them
    on Metal; on a CPU without them each head adds patches² x 4 bytes."""
    patches = math.ceil(pixels / (patch * patch))
    image = pixels * channels * ACTIVATION_BYTES
    return image + patches * (WIDTHS_PER_PATCH * width + ffn) * ACTIVATION_BYTES


def vision_bytes(info: ModelInfo) -> int:
    """Memory a vision model's encoder takes on top of its weights: llama.cpp's projector
    compute buffer (sized at load by its warm-up image, or the largest image it accepts if
    that is larger), or mlx-vlm's activations for the largest image it accepts."""
    if info.type != "llm" or not info.vision:
        return 0
    return _projector_bytes(info.path) if info.format == "gguf" else _tower_bytes(info.path)


def _projector_bytes(folder: Path) -> int:
    projectors = sorted(p for p in folder.glob("mmproj*.gguf") if p.is_file())
    if not projectors:
        return 0
    meta = _gguf_meta(projectors[0])
    patch = _int(meta.get("clip.vision.patch_size")) or 14
    width = _int(meta.get("clip.vision.embedding_length")) or 0
    ffn = _int(meta.get("clip.vision.feed_forward_length")) or 4 * width
    merge = _int(meta.get("clip.vision.spatial_merge_size")) or 2
    side = math.isqrt(GGUF_WARMUP_TOKENS) * patch * merge
    largest = _int(meta.get("clip.vision.image_max_pixels")) or 0
    size = _int(meta.get("clip.vision.image_size")) or 0
    pixels = max(side * side, largest, size * size)
    return _encoder_bytes(pixels, patch, width, ffn)


def _tower_bytes(folder: Path) -> int:
    config = _json(folder / "config.json").get("vision_config") or {}
    pre = _json(folder / "preprocessor_config.json")
    patch = _int(config.get("patch_size")) or _int(pre.get("patch_size")) or 14
    width = _int(config.get("embed_dim")) or _int(config.get("hidden_size")) or 0
    ratio = config.get("mlp_ratio")
    ffn = _int(config.get("intermediate_size")) or int(width * (ratio or 4))
    temporal = _int(config.get("temporal_patch_size")) or 1
    pixels = _int(pre.get("max_pixels"))
    if pixels is None:
        size = pre.get("size")
        edge = _int(size.get("longest_edge")) if isinstance(size, dict) else None
        # Qwen-style processors give a pixel count there, others an edge in pixels (as the
        # MLX vision engine reads it).
        if edge is not None and edge >= 10_000:
            pixels = edge
        else:
            side = edge or _int(config.get("image_size")) or 0
            pixels = side * side
    # Qwen2-VL-style processors repeat a still image over ``temporal`` frames.
    return _encoder_bytes(pixels, patch, width, ffn, channels=3 * temporal)
