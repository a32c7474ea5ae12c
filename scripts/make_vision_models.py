#!/usr/bin/env python
"""Generate a tiny seeded-random Qwen2-VL vision model for tests, as MLX and as GGUF.

The language model is the tiny Qwen2 of make_test_models.py (same sizes, same real Qwen2
vocabulary, with Qwen2-VL's vision tokens in place of the first unused [PAD] tokens); a
two-block vision tower and merger feed it. Layout (LM Studio):

    <out>/<publisher>/<name>-mlx/    config.json, model.safetensors, tokenizer and
                                     preprocessor files (mlx-vlm)
    <out>/<publisher>/<name>-gguf/   <name>-f32.gguf and its projector
                                     mmproj-<name>-f32.gguf (llama.cpp mtmd)

Output is deterministic and the run is idempotent: an existing, stamped output is kept.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from script_loader import load_script

GENERATOR_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parents[1]
_SOURCE_SHA256 = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()

# Qwen2-VL's added tokens, at the ids the real checkpoints give them.
VISION_TOKENS = {
    151652: "<|vision_start|>",
    151653: "<|vision_end|>",
    151654: "<|vision_pad|>",
    151655: "<|image_pad|>",
    151656: "<|video_pad|>",
}
VISION_DEPTH, VISION_DIM, VISION_HEADS, MLP_RATIO = 2, 32, 2, 4
PATCH, MERGE, TEMPORAL = 14, 2, 2
# Halves of the head dimension (16) given to time, height and width positions.
MROPE_SECTION = (2, 3, 3)
# Small images keep the tests cheap: at most (448/28)^2 = 256 image tokens.
MIN_PIXELS, MAX_PIXELS = 56 * 56, 448 * 448
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]

# Qwen2-VL's template, reduced to what the tests need: text and image parts, ChatML turns.
VISION_TEMPLATE = r"""
{%- for message in messages -%}
  {{- '<|im_start|>' + message.role + '\n' -}}
  {%- if message.content is string -%}{{- message.content -}}
  {%- else -%}
    {%- for part in message.content -%}
      {%- if part.type == 'text' -%}{{- part.text -}}
      {%- elif part.type == 'image' or part.type == 'image_url' -%}
        {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
  {{- '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
""".strip()


def _base() -> ModuleType:
    """make_test_models.py, whose sizes, vocabulary and writers the vision model shares."""
    return load_script("make_test_models")


def vision_vocab(base: ModuleType, vocab_path: Path | None) -> Any:
    from gguf import TokenType

    voc = base.read_vocab(base.find_vocab(vocab_path))
    tokens, types = list(voc.tokens), list(voc.token_types)
    for i, text in VISION_TOKENS.items():
        assert tokens[i].startswith("[PAD"), f"token {i} is {tokens[i]!r}, not a free [PAD]"
        tokens[i], types[i] = text, TokenType.CONTROL
    return base.Vocab(tokens, types, voc.merges)


def vision_weights(seed: int) -> dict[str, np.ndarray]:
    """The vision tower and merger under Hugging Face Qwen2-VL names (PyTorch layouts)."""
    rng = np.random.default_rng(seed + 1000)

    def normal(std: float, *shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)

    d, hidden = VISION_DIM, 64
    w = {"visual.patch_embed.proj.weight": normal(0.05, d, 3, TEMPORAL, PATCH, PATCH)}
    for i in range(VISION_DEPTH):
        p = f"visual.blocks.{i}."
        for norm in ("norm1", "norm2"):
            w[f"{p}{norm}.weight"] = np.ones(d, np.float32)
            w[f"{p}{norm}.bias"] = np.zeros(d, np.float32)
        w[f"{p}attn.qkv.weight"] = normal(0.15, 3 * d, d)
        w[f"{p}attn.qkv.bias"] = normal(0.15, 3 * d)
        w[f"{p}attn.proj.weight"] = normal(0.15, d, d)
        w[f"{p}attn.proj.bias"] = normal(0.15, d)
        w[f"{p}mlp.fc1.weight"] = normal(0.15, d * MLP_RATIO, d)
        w[f"{p}mlp.fc1.bias"] = normal(0.15, d * MLP_RATIO)
        w[f"{p}mlp.fc2.weight"] = normal(0.15, d, d * MLP_RATIO)
        w[f"{p}mlp.fc2.bias"] = normal(0.15, d)
    merged = d * MERGE * MERGE
    w["visual.merger.ln_q.weight"] = np.ones(d, np.float32)
    w["visual.merger.ln_q.bias"] = np.zeros(d, np.float32)
    w["visual.merger.mlp.0.weight"] = normal(0.15, merged, merged)
    w["visual.merger.mlp.0.bias"] = normal(0.15, merged)
    w["visual.merger.mlp.2.weight"] = normal(0.5, hidden, merged)
    w["visual.merger.mlp.2.bias"] = normal(0.5, hidden)
    return w


def write_mlx(base: ModuleType, folder: Path, seed: int, vocab_path: Path | None) -> None:
    voc = vision_vocab(base, vocab_path)
    weights = base.make_weights(seed, len(voc.tokens))
    base.write_mlx(folder, weights, voc, base.build_tokenizer_json(voc), VISION_TEMPLATE)
    from safetensors.numpy import save_file

    save_file(
        {**weights, **vision_weights(seed)},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config.update(
        {
            "architectures": ["Qwen2VLForConditionalGeneration"],
            "model_type": "qwen2_vl",
            "vision_start_token_id": 151652,
            "vision_end_token_id": 151653,
            "vision_token_id": 151654,
            "image_token_id": 151655,
            "video_token_id": 151656,
            "rope_scaling": {"type": "mrope", "mrope_section": list(MROPE_SECTION)},
            "vision_config": {
                "model_type": "qwen2_vl",
                "depth": VISION_DEPTH,
                "embed_dim": VISION_DIM,
                "hidden_size": config["hidden_size"],
                "num_heads": VISION_HEADS,
                "mlp_ratio": MLP_RATIO,
                "in_channels": 3,
                "in_chans": 3,
                "patch_size": PATCH,
                "spatial_patch_size": PATCH,
                "spatial_merge_size": MERGE,
                "temporal_patch_size": TEMPORAL,
                "hidden_act": "quick_gelu",
            },
        }
    )
    base._write_json(folder / "config.json", config)
    tok_config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok_config["processor_class"] = "Qwen2VLProcessor"
    base._write_json(folder / "tokenizer_config.json", tok_config)
    image_processor = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "rescale_factor": 1 / 255,
        "resample": 3,
        "image_mean": IMAGE_MEAN,
        "image_std": IMAGE_STD,
        "min_pixels": MIN_PIXELS,
        "max_pixels": MAX_PIXELS,
        "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        "patch_size": PATCH,
        "temporal_patch_size": TEMPORAL,
        "merge_size": MERGE,
    }
    base._write_json(folder / "preprocessor_config.json", image_processor)
    base._write_json(folder / "chat_template.json", {"chat_template": VISION_TEMPLATE})


def write_gguf(
    base: ModuleType, folder: Path, name: str, seed: int, vocab_path: Path | None
) -> None:
    """The same model for llama.cpp: ``<name>-f32.gguf`` (arch qwen2vl) and its projector
    ``mmproj-<name>-f32.gguf``, tensors named as llama.cpp's converter names them."""
    import gguf

    voc = vision_vocab(base, vocab_path)
    weights = base.make_weights(seed, len(voc.tokens))
    writer = gguf.GGUFWriter(str(folder / f"{name}-f32.gguf"), arch="qwen2vl")
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(base.CONTEXT)
    writer.add_embedding_length(base.HIDDEN)
    writer.add_block_count(base.LAYERS)
    writer.add_feed_forward_length(base.INTERMEDIATE)
    writer.add_head_count(base.HEADS)
    writer.add_head_count_kv(base.KV_HEADS)
    writer.add_rope_freq_base(base.ROPE_THETA)
    writer.add_layer_norm_rms_eps(base.RMS_EPS)
    writer.add_rope_dimension_sections([*MROPE_SECTION, 0])
    base.add_tokenizer(writer, voc, VISION_TEMPLATE)
    for hf_name, array in weights.items():
        writer.add_tensor(base.gguf_name(hf_name), array)
    base.finish_gguf(writer)

    proj = gguf.GGUFWriter(str(folder / f"mmproj-{name}-f32.gguf"), arch="clip")
    proj.add_type(gguf.GGUFType.MMPROJ)
    proj.add_name(name)
    proj.add_file_type(gguf.LlamaFileType.ALL_F32)
    proj.add_clip_projector_type(gguf.VisionProjectorType.QWEN2VL)
    proj.add_clip_has_vision_encoder(True)
    proj.add_vision_projection_dim(base.HIDDEN)
    proj.add_vision_image_size(560)
    proj.add_vision_patch_size(PATCH)
    proj.add_vision_embedding_length(VISION_DIM)
    proj.add_vision_feed_forward_length(VISION_DIM * MLP_RATIO)
    proj.add_vision_block_count(VISION_DEPTH)
    proj.add_vision_head_count(VISION_HEADS)
    proj.add_vision_attention_layernorm_eps(1e-6)
    proj.add_vision_image_mean(IMAGE_MEAN)
    proj.add_vision_image_std(IMAGE_STD)
    proj.add_vision_min_pixels(MIN_PIXELS)
    proj.add_vision_max_pixels(MAX_PIXELS)
    for hf_name, array in vision_weights(seed).items():
        for gguf_name, part in _mmproj_tensors(hf_name, array):
            proj.add_tensor(gguf_name, np.ascontiguousarray(part))
    base.finish_gguf(proj)


def _mmproj_tensors(hf_name: str, array: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """llama.cpp's names (conversion/qwenvl.py): the temporal Conv3D split into two Conv2Ds,
    qkv split into q, k and v."""
    if hf_name == "visual.patch_embed.proj.weight":
        return [("v.patch_embd.weight", array[:, :, 0]), ("v.patch_embd.weight.1", array[:, :, 1])]
    kind = hf_name.rsplit(".", 1)[1]
    fixed = {
        "visual.merger.ln_q": "v.post_ln",
        "visual.merger.mlp.0": "mm.0",
        "visual.merger.mlp.2": "mm.2",
    }
    module = hf_name.rsplit(".", 1)[0]
    if module in fixed:
        return [(f"{fixed[module]}.{kind}", array)]
    _, _, block, rest = module.split(".", 3)
    prefix = f"v.blk.{block}"
    if rest == "attn.qkv":
        q, k, v = np.split(array, 3, axis=0)
        return [(f"{prefix}.attn_{n}.{kind}", t) for n, t in (("q", q), ("k", k), ("v", v))]
    names = {
        "norm1": "ln1",
        "norm2": "ln2",
        "attn.proj": "attn_out",
        "mlp.fc1": "ffn_up",
        "mlp.fc2": "ffn_down",
    }
    return [(f"{prefix}.{names[rest]}.{kind}", array)]


def _stamp(folder: Path, name: str, seed: int) -> dict[str, Any]:
    files = sorted(p for p in folder.iterdir() if p.name != ".mlxserve-test-model.json")
    return {
        "generator": "mlxserve make_vision_models",
        "version": GENERATOR_VERSION,
        "source_sha256": _SOURCE_SHA256,
        "name": name,
        "seed": seed,
        "files": {p.name: p.stat().st_size for p in files},
    }


def generate(
    out_root: Path,
    publisher: str = "mlxserve-test",
    name: str = "tiny-qwen2-vl",
    seed: int = 0,
    vocab: Path | None = None,
) -> dict[str, Path]:
    """Write the models (those not there already); return {"mlx": folder, "gguf": folder}."""
    base = _base()
    stamp = partial(_stamp, name=name, seed=seed)
    out = {}
    for fmt in ("mlx", "gguf"):
        folder = Path(out_root) / publisher / f"{name}-{fmt}"
        out[fmt] = folder
        if base.is_stamped(folder, stamp):
            continue
        folder.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "mlx":
            base.build(folder, lambda tmp: write_mlx(base, tmp, seed, vocab), stamp)
        else:
            base.build(folder, lambda tmp: write_gguf(base, tmp, name, seed, vocab), stamp)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="models root (LM Studio layout)")
    parser.add_argument("--publisher", default="mlxserve-test")
    parser.add_argument("--name", default="tiny-qwen2-vl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab", type=Path, default=None)
    args = parser.parse_args(argv)
    result = generate(args.out, args.publisher, args.name, args.seed, args.vocab)
    print(result["mlx"], result["gguf"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
