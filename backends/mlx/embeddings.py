"""MLX embedding engine: a BERT encoder (backends.mlx.bert) with the model's own pooling and
normalization, as its sentence-transformers configuration declares them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tokenizers import Tokenizer

from backends.embedding import EmbeddingEngine, EmbeddingInfo, Pooling
from backends.mlx import release_thread_memory
from backends.mlx.bert import Bert, BertConfig

_POOLING_MODES: dict[str, Pooling] = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "last",
}


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def sentence_transformers_head(folder: Path) -> tuple[Pooling, bool]:
    """(pooling, normalize) from a sentence-transformers folder's ``modules.json``. A plain
    Hugging Face folder gets what sentence-transformers gives it: mean pooling (and we
    normalize, as OpenAI-style embeddings are)."""
    if not (folder / "modules.json").is_file():
        return "mean", True
    pooling: Pooling = "mean"
    normalize = False
    for module in _read_json(folder / "modules.json"):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Transformer":
            continue
        if kind == "Pooling":
            config = _read_json(folder / str(module.get("path", "")) / "config.json")
            enabled = [k for k, v in config.items() if k.startswith("pooling_mode_") and v]
            if len(enabled) != 1 or enabled[0] not in _POOLING_MODES:
                raise ValueError(f"unsupported sentence-transformers pooling {enabled}")
            pooling = _POOLING_MODES[enabled[0]]
        elif kind == "Normalize":
            normalize = True
        else:
            raise ValueError(f"sentence-transformers module {kind!r} is not supported")
    return pooling, normalize


def _special_tokens(tokenizer: Tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The special tokens the tokenizer puts before and after a text."""
    plain = tokenizer.encode("hello world", add_special_tokens=False).ids
    full = tokenizer.encode("hello world", add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return tuple(full[:start]), tuple(full[start + len(plain) :])
    return (), ()


def _load_tokenizer(folder: Path) -> Tokenizer:
    if (folder / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder)).backend_tokenizer
    # Some tokenizer.json files pad and truncate (all-MiniLM-L6-v2's to 128): the engine
    # pads, and the core truncates or refuses as the request asks.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


class MLXEmbeddingEngine(EmbeddingEngine):
    """A BERT-family sentence-embedding model in MLX format."""

    format = "mlx"
    batch_tokens = 8192
    padded = True

    def _load(self) -> EmbeddingInfo:
        config = _read_json(self.path / "config.json")
        bert_config = BertConfig.from_dict(config)
        pooling, normalize = sentence_transformers_head(self.path)
        model = Bert(bert_config)
        weights: dict[str, mx.array] = {}
        for file in sorted(self.path.glob("*.safetensors")):
            weights.update(mx.load(str(file)))  # type: ignore[arg-type]
        weights = Bert.sanitize(weights)
        quantization = config.get("quantization")
        if isinstance(quantization, dict):
            nn.quantize(
                model,
                group_size=int(quantization["group_size"]),
                bits=int(quantization["bits"]),
                class_predicate=lambda p, m: f"{p}.scales" in weights,
            )
        model.load_weights(list(weights.items()), strict=True)
        mx.eval(model.parameters())
        model.eval()
        self._model = model
        self._pooling = pooling
        self._pad_id = bert_config.pad_token_id
        self._tokenizer = _load_tokenizer(self.path)
        prefix, suffix = _special_tokens(self._tokenizer)
        matryoshka = config.get("matryoshka_dimensions") or ()
        return EmbeddingInfo(
            format="mlx",
            dimensions=bert_config.hidden_size,
            context_length=min(self.options.context_length, bert_config.max_position_embeddings),
            vocab_size=bert_config.vocab_size,
            pooling=pooling,
            normalize=normalize,
            prefix=prefix,
            suffix=suffix,
            matryoshka_dimensions=tuple(sorted(int(d) for d in matryoshka)),
        )

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def _encode(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        width = max(len(ids) for ids in batch)
        padded = np.full((len(batch), width), self._pad_id, np.int32)
        for row, ids in enumerate(batch):
            padded[row, : len(ids)] = ids
        lengths = mx.array([len(ids) for ids in batch])
        hidden = self._model(mx.array(padded), lengths).astype(mx.float32)
        pooled = self._pool(hidden, lengths)
        mx.eval(pooled)
        return np.array(pooled, copy=True)

    def _pool(self, hidden: mx.array, lengths: mx.array) -> mx.array:
        pooling = self._pooling
        if pooling == "cls":
            return hidden[:, 0]
        if pooling == "last":
            return hidden[mx.arange(hidden.shape[0]), lengths - 1]
        keep = (mx.arange(hidden.shape[1])[None] < lengths[:, None])[..., None]
        if pooling == "max":
            return mx.where(keep, hidden, -mx.inf).max(axis=1)
        return (hidden * keep).sum(axis=1) / lengths[:, None].astype(mx.float32)

    def _unload(self) -> None:
        del self._model
        release_thread_memory()
