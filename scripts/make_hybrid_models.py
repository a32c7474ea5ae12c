#!/usr/bin/env python
"""Generate tiny seeded-random MLX models with unusual caches, for tests.

Real mlx-lm architectures, shrunk, with the tiny Qwen2's vocabulary, tokenizer and ChatML
template (scripts/make_test_models.py):

- ``tiny-qwen35-hybrid``: ``qwen3_5`` (Qwen3.5's text model), Gated DeltaNet linear-attention
  layers (a recurrent state: mlx-lm ``ArraysCache``) alternating with full-attention layers;
- ``tiny-gemma3-sliding``: ``gemma3_text``, 32-token sliding-window layers (mlx-lm
  ``RotatingKVCache``) alternating with global layers;
- ``tiny-gemma4-kvshared``: ``gemma4_text`` whose last two layers reuse earlier layers' keys
  and values (KV-shared), so its cache list is shorter than its layers.

The first two caches cannot be rolled back to an earlier position once the window has moved or
the state has absorbed a token. Layout (LM Studio): ``<out>/<publisher>/<name>-mlx/``, and for
the Qwen3.5 one also ``<name>-gguf/<name>-f32.gguf`` (llama.cpp's ``qwen35``). Output is
deterministic and idempotent: an existing, stamped output is kept.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
from script_loader import load_script

REPO_ROOT = Path(__file__).resolve().parents[1]
_SOURCE_SHA256 = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
STAMP_FILE = ".mlxserve-test-model.json"
CONTEXT = 4096
SLIDING_WINDOW = 32
# Wider than the tests' prompts and replies: speculative decoding needs caches it can trim.
KV_SHARED_WINDOW = 512

# Config shapes of the real checkpoints (Qwen3.5's text config, Gemma 3's), scaled down.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "tiny-qwen35-hybrid": {
        "architectures": ["Qwen3_5ForCausalLM"],
        "model_type": "qwen3_5",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "full_attention_interval": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1_000_000.0,
            "partial_rotary_factor": 0.5,
        },
        "max_position_embeddings": CONTEXT,
        "tie_word_embeddings": True,
    },
    "tiny-gemma3-sliding": {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": SLIDING_WINDOW,
        "sliding_window_pattern": 2,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": CONTEXT,
        "tie_word_embeddings": True,
    },
    "tiny-gemma4-kvshared": {
        "architectures": ["Gemma4ForCausalLM"],
        "model_type": "gemma4_text",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
        "num_kv_shared_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "global_head_dim": 16,
        "hidden_size_per_layer_input": 0,
        "use_double_wide_mlp": False,
        "sliding_window": KV_SHARED_WINDOW,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": CONTEXT,
        "tie_word_embeddings": True,
    },
}
# As in make_test_models.py: a scale at which attention and MLP outputs matter next to the
# embeddings, so that outputs depend on the whole context.
EMBED_STD, LINEAR_STD, CONV_STD = 0.02, 0.15, 0.3
# Gemma's norms scale by (1 + weight).
NEUTRAL_NORM = {"qwen3_5": 1.0, "gemma3_text": 0.0, "gemma4_text": 1.0}


def make_weights(config: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    """Weights under mlx-lm's own parameter names, drawn in sorted-name order."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    params = cast(
        list[tuple[str, Any]], tree_flatten(model_class(args_class.from_dict(config)).parameters())
    )
    shapes = {name: tuple(p.shape) for name, p in params}
    rng = np.random.default_rng(seed)
    neutral = NEUTRAL_NORM[config["model_type"]]
    out: dict[str, np.ndarray] = {}
    for name in sorted(shapes):
        shape = shapes[name]
        leaf = name.rsplit(".", 1)[0]
        if name.endswith("A_log"):
            out[name] = np.log(rng.uniform(1, 16, shape)).astype(np.float32)
        elif name.endswith("dt_bias"):
            out[name] = np.ones(shape, np.float32)
        elif leaf.endswith("norm") or leaf.endswith("layernorm") or name.endswith("layer_scalar"):
            out[name] = np.full(shape, neutral, np.float32)
        else:
            std = EMBED_STD if "embed_tokens" in name else LINEAR_STD
            std = CONV_STD if "conv1d" in name else std
            out[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    return out


def _gguf_tensors(config: dict[str, Any], weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The qwen3_5 weights under llama.cpp's qwen35 tensor names (conv1d squeezed, ``A_log``
    as ``-exp(A_log)``)."""
    parts = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "post_attention_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "linear_attn.in_proj_qkv": "attn_qkv",
        "linear_attn.in_proj_z": "attn_gate",
        "linear_attn.in_proj_b": "ssm_beta",
        "linear_attn.in_proj_a": "ssm_alpha",
        "linear_attn.conv1d": "ssm_conv1d",
        "linear_attn.norm": "ssm_norm",
        "linear_attn.out_proj": "ssm_out",
    }
    out: dict[str, np.ndarray] = {}
    for name, array in weights.items():
        if name == "language_model.model.embed_tokens.weight":
            out["token_embd.weight"] = array
            continue
        if name == "language_model.model.norm.weight":
            out["output_norm.weight"] = array
            continue
        layer, rest = name.removeprefix("language_model.model.layers.").split(".", 1)
        if rest == "linear_attn.A_log":
            out[f"blk.{layer}.ssm_a"] = -np.exp(array)
        elif rest == "linear_attn.dt_bias":
            out[f"blk.{layer}.ssm_dt.bias"] = array
        else:
            module, kind = rest.rsplit(".", 1)
            out[f"blk.{layer}.{parts[module]}.{kind}"] = (
                array[..., 0] if module == "linear_attn.conv1d" else array
            )
    return out


def write_gguf(path: Path, config: dict[str, Any], weights: dict[str, np.ndarray]) -> None:
    """``tiny-qwen35-hybrid`` for llama.cpp (arch ``qwen35``): the MLX folder's weights by
    name, vocabulary and template. llama.cpp's greedy output on it differs from mlx-lm's (some
    layout its converter applies is not reproduced here): the tests compare GGUF runs with
    each other only."""
    import gguf

    qwen2 = load_script("make_test_models")
    vocab = qwen2.read_vocab(qwen2.find_vocab())
    arch = "qwen35"
    rope = config["rope_parameters"]
    rotary = int(config["head_dim"] * rope["partial_rotary_factor"])
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_name(path.stem)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_rope_dimension_count(rotary)
    # Text positions are equal on every M-RoPE axis: the sections only need to add up.
    writer.add_rope_dimension_sections([rotary // 4, rotary // 8, rotary // 8, 0])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_ssm_conv_kernel(config["linear_conv_kernel_dim"])
    writer.add_ssm_state_size(config["linear_key_head_dim"])
    writer.add_ssm_group_count(config["linear_num_key_heads"])
    writer.add_ssm_time_step_rank(config["linear_num_value_heads"])
    writer.add_ssm_inner_size(config["linear_num_value_heads"] * config["linear_value_head_dim"])
    writer.add_full_attention_interval(config["full_attention_interval"])
    qwen2.add_tokenizer(writer, vocab, qwen2.CHAT_TEMPLATE)
    for name, array in _gguf_tensors(config, weights).items():
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    qwen2.finish_gguf(writer)


# The architectures written as GGUF too (llama.cpp's default full-size sliding-window cache
# can be cut back, so only recurrent ones need checkpoints there).
GGUF_ARCHITECTURES = {"tiny-qwen35-hybrid"}


def _stamp(fmt: str, name: str, seed: int, folder: Path) -> dict[str, Any]:
    files = sorted(p for p in folder.iterdir() if p.name != STAMP_FILE)
    return {
        "generator": "mlxserve make_hybrid_models",
        "source_sha256": _SOURCE_SHA256,
        "format": fmt,
        "name": name,
        "seed": seed,
        "files": {p.name: p.stat().st_size for p in files},
    }


def generate(
    out_root: Path, name: str, publisher: str = "mlxserve-test", seed: int = 0
) -> dict[str, Path]:
    """Write ``<out_root>/<publisher>/<name>-mlx`` (``name`` a key of ARCHITECTURES) and, for
    GGUF_ARCHITECTURES, ``<name>-gguf/<name>-f32.gguf``; return {"mlx": folder, "gguf": file}."""
    from safetensors.numpy import save_file

    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(ARCHITECTURES)}")
    base = Path(out_root) / publisher
    folders = {"mlx": base / f"{name}-mlx"}
    if name in GGUF_ARCHITECTURES:
        folders["gguf"] = base / f"{name}-gguf"
    result = {f: d / f"{name}-f32.gguf" if f == "gguf" else d for f, d in folders.items()}
    qwen2 = load_script("make_test_models")
    todo = [
        f for f, d in folders.items() if not qwen2.is_stamped(d, partial(_stamp, f, name, seed))
    ]
    if not todo:
        return result
    vocab = qwen2.read_vocab(qwen2.find_vocab())
    config = {**ARCHITECTURES[name], "vocab_size": len(vocab.tokens)}
    eot, im_end = vocab.id_of("<|endoftext|>"), vocab.id_of("<|im_end|>")
    config.update(bos_token_id=eot, eos_token_id=im_end, torch_dtype="float32")
    weights = make_weights(config, seed)
    base.mkdir(parents=True, exist_ok=True)

    def write(fmt: str, tmp: Path) -> None:
        if fmt == "gguf":
            write_gguf(tmp / result[fmt].name, config, weights)
        else:
            # The tiny Qwen2's tokenizer files, then this architecture's config and weights.
            qwen2.write_mlx(tmp, {}, vocab, qwen2.build_tokenizer_json(vocab))
            config_json = json.dumps(config, indent=2) + "\n"
            (tmp / "config.json").write_text(config_json, encoding="utf-8")
            save_file(weights, str(tmp / "model.safetensors"), {"format": "mlx"})

    for fmt in todo:
        qwen2.build(folders[fmt], partial(write, fmt), partial(_stamp, fmt, name, seed))
        print(f"wrote {fmt} model {result[fmt]}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="models root (LM Studio layout)")
    parser.add_argument("--publisher", default="mlxserve-test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("names", nargs="*", default=list(ARCHITECTURES), help="models to write")
    args = parser.parse_args(argv)
    try:
        for name in args.names:
            generate(args.out, name, args.publisher, args.seed)
    except ValueError as exc:
        parser.exit(1, f"error: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
