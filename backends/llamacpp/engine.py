"""GGUF engine: llama.cpp through llama-cpp-python, on its own owner thread."""

from __future__ import annotations

import ctypes
import os
import random
from collections.abc import Generator
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import Llama
from llama_cpp._utils import suppress_stdout_stderr
from llguidance.llamacpp import lltokenizer_from_vocab

from backends.base import (
    PENALTY_WINDOW,
    Engine,
    EngineInfo,
    GenerationRequest,
    PromptProgress,
    TokenStream,
)
from backends.constraint import GrammarCache

# Prompt tokens evaluated between two cancellation checks (also llama.cpp's batch size).
PREFILL_CHUNK = 512


def _moe_key(path: Path) -> str | None:
    """The metadata key that sets how many experts a mixture-of-experts GGUF uses per token,
    or None for a dense model. Reads the file's metadata and vocabulary only, no tensors."""
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    with suppress_stdout_stderr(disable=False):
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        return None

    def meta(key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else None

    try:
        arch = meta("general.architecture")
        experts = meta(f"{arch}.expert_count") if arch else None
    finally:
        llama_cpp.llama_model_free(model)
    if not experts or experts == "0":
        return None
    return f"{arch}.expert_used_count"


class LlamaCppEngine(Engine):
    """A GGUF model behind the backend interface."""

    format = "gguf"

    def _load(self) -> EngineInfo:
        options = self.options
        kv_type = llama_cpp.GGML_TYPE_F32 if options.kv_cache_f32 else llama_cpp.GGML_TYPE_F16
        self._n_batch = options.eval_batch_size or PREFILL_CHUNK
        flash = bool(options.flash_attention)
        offload = options.offload_kv_cache_to_gpu is not False
        moe = _moe_key(self.path) if options.num_experts else None
        overrides: dict[str, bool | int | float | str] | None = None
        if moe and options.num_experts:
            overrides = {moe: options.num_experts}
        llm = Llama(
            model_path=str(self.path),
            n_ctx=options.context_length,
            n_batch=self._n_batch,
            n_gpu_layers=-1,
            n_threads=max(1, os.cpu_count() or 1),
            last_n_tokens_size=PENALTY_WINDOW,
            verbose=False,
            type_k=kv_type,
            type_v=kv_type,
            flash_attn=flash,
            offload_kqv=offload,
            kv_overrides=overrides,
        )
        load_config: dict[str, Any] = {
            "eval_batch_size": self._n_batch,
            "flash_attention": flash,
            "offload_kv_cache_to_gpu": offload,
        }
        if overrides:
            load_config["num_experts"] = options.num_experts
        self._llm = llm
        vocab = llm._model.vocab
        self._vocab = vocab
        self._piece_cache: dict[int, bytes] = {}
        n_vocab = llm.n_vocab()
        self._n_vocab = n_vocab
        eog = frozenset(t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t))
        meta = llm.metadata
        bos = llm.token_bos()
        strip = (
            llama_cpp.llama_vocab_type(vocab) == llama_cpp.LLAMA_VOCAB_TYPE_SPM
            and meta.get("tokenizer.ggml.add_space_prefix", "true") != "false"
        )
        self.grammars = GrammarCache(
            lambda: lltokenizer_from_vocab(vocab, n_vocab=n_vocab, eos_token=sorted(eog)),
            n_vocab,
        )
        return EngineInfo(
            format="gguf",
            context_length=llm.n_ctx(),
            eos_token_ids=eog,
            bos_token_id=bos if bos >= 0 and llama_cpp.llama_vocab_get_add_bos(vocab) else None,
            bos_token=self._text(bos) if bos >= 0 else "",
            eos_token=self._text(llm.token_eos()),
            chat_template=meta.get("tokenizer.chat_template"),
            strip_leading_space=strip,
            load_config=load_config,
        )

    def _text(self, token_id: int) -> str:
        raw = llama_cpp.llama_vocab_get_text(self._vocab, token_id)
        return raw.decode("utf-8", errors="replace") if raw else ""

    def tokenize(self, text: str) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def token_bytes(self, token_id: int) -> bytes:
        piece = self._piece_cache.get(token_id)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self._vocab, token_id, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self._vocab, token_id, buf, len(buf), 0, False)
            piece = buf.raw[: max(n, 0)]
            self._piece_cache[token_id] = piece
        return piece

    def _steps(
        self, request: GenerationRequest, stream: TokenStream
    ) -> Generator[int | PromptProgress, None, None]:
        llm = self._llm
        prompt = list(request.prompt)
        # Reuse the KV cache of the longest prefix shared with the previous request, then
        # evaluate the rest in chunks so that a cancelled request stops between them. The last
        # prompt token is always evaluated again: sampling needs its logits.
        shared = 0
        for a, b in zip(llm.input_ids[: llm.n_tokens], prompt[:-1], strict=False):
            if a != b:
                break
            shared += 1
        llm.n_tokens = shared
        total = len(prompt)
        while llm.n_tokens < total:
            if stream.cancelled:
                return
            llm.eval(prompt[llm.n_tokens : llm.n_tokens + self._n_batch])
            if llm.n_tokens < total:
                yield PromptProgress(llm.n_tokens, total)
        p = request.sampling
        llm.set_seed(p.seed % (1 << 32) if p.seed is not None else random.getrandbits(31))
        # llama-cpp-python's own sampler chain (penalties, top-k/p, min-p, temperature,
        # seeded draw); a grammar masks the context's logits in place before it samples, which
        # costs far less than its Python logits-processor hook.
        sampler = llm._init_sampler(
            top_k=p.top_k,
            top_p=p.top_p,
            min_p=p.min_p,
            temp=p.temperature,
            repeat_penalty=p.repeat_penalty,
            frequency_penalty=p.frequency_penalty,
            presence_penalty=p.presence_penalty,
        )
        constraint = request.constraint
        n_vocab = self._n_vocab
        while True:
            if constraint is not None:
                logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
                constraint.mask_inplace(logits)
            token = sampler.sample(llm._ctx, -1)
            if constraint is not None:
                constraint.advance(token)
            yield token
            llm.eval([token])

    def _unload(self) -> None:
        self._llm.close()
        del self._llm
