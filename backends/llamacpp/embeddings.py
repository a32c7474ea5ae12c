"""GGUF embedding engine: llama.cpp in embedding mode, pooled as the file declares."""

from __future__ import annotations

import os
from collections.abc import Sequence

import llama_cpp
import numpy as np
from llama_cpp import Llama

from backends.embedding import EmbeddingEngine, EmbeddingInfo, Pooling
from backends.llamacpp import adapter

_POOLING: dict[int, Pooling] = {
    llama_cpp.LLAMA_POOLING_TYPE_MEAN: "mean",
    llama_cpp.LLAMA_POOLING_TYPE_CLS: "cls",
    llama_cpp.LLAMA_POOLING_TYPE_LAST: "last",
}
# Tokens of one llama_decode call. llama.cpp packs the sequences without padding, but its
# encoder attends over the whole pass (masked per sequence), so the work grows with the
# square of the pass: on CPU, 256 short texts ran at 150 texts/s in 512-token passes, 190
# in 256-token ones and 30 in 2048-token ones. An input longer than this gets its own pass.
PASS_TOKENS = 256


class LlamaCppEmbeddingEngine(EmbeddingEngine):
    """A GGUF embedding model (BERT and the other encoders llama.cpp runs)."""

    format = "gguf"
    padded = False
    batch_tokens = PASS_TOKENS

    def _load(self) -> EmbeddingInfo:
        # The whole of one input must fit in one pass of a non-causal encoder.
        window = self.options.context_length
        llm = Llama(
            model_path=str(self.path),
            embedding=True,
            n_ctx=window,
            n_batch=window,
            n_ubatch=window,
            n_gpu_layers=-1,
            n_threads=max(1, os.cpu_count() or 1),
            verbose=False,
        )
        pooling_type = int(llm.pooling_type())  # typed as str by llama-cpp-python, but an int
        pooling = _POOLING.get(pooling_type)
        if pooling is None:
            llm.close()
            raise ValueError(f"pooling type {pooling_type} does not give one vector per input")
        self._llm = llm
        self.batch_tokens = min(PASS_TOKENS, window)
        self.max_batch_inputs = int(llm.context_params.n_seq_max)
        plain = llm.tokenize(b"hello world", add_bos=False, special=False)
        full = llm.tokenize(b"hello world", add_bos=True, special=False)
        start = next((i for i in range(len(full)) if full[i : i + len(plain)] == plain), len(full))
        return EmbeddingInfo(
            format="gguf",
            dimensions=llm.n_embd(),
            context_length=min(window, adapter.train_context_length(llm)),
            vocab_size=llm.n_vocab(),
            pooling=pooling,
            # GGUF files do not say; llama.cpp's server normalizes by default, as OpenAI does.
            normalize=True,
            prefix=tuple(full[:start]),
            suffix=tuple(full[start + len(plain) :]),
        )

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        # Special tokens written in the text are parsed, as Hugging Face tokenizers do.
        return [self._llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in texts]

    def _encode(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        llm = self._llm
        ctx = adapter.embed_sequences(llm, batch)
        out = np.empty((len(batch), self.info.dimensions), np.float32)
        for seq_id in range(len(batch)):
            ptr = llama_cpp.llama_get_embeddings_seq(ctx, seq_id)
            if not ptr:
                raise RuntimeError(f"llama.cpp returned no embedding for sequence {seq_id}")
            out[seq_id] = np.ctypeslib.as_array(ptr, shape=(self.info.dimensions,))
        return out

    def _unload(self) -> None:
        self._llm.close()
        del self._llm
