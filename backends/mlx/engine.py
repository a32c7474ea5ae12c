"""MLX engine: mlx-lm models, run on their own owner thread (MLX arrays belong to that thread)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Generator
from typing import Any

import llguidance.hf
import mlx.core as mx
from mlx_lm import load as mlx_load
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors

from backends.base import (
    PENALTY_WINDOW,
    Engine,
    EngineInfo,
    GenerationRequest,
    PromptProgress,
    SamplingParams,
    TokenStream,
)
from backends.constraint import GrammarCache, GrammarConstraint
from backends.mlx import release_thread_memory

# Prompt tokens processed between two cancellation checks.
PREFILL_CHUNK = 512


class _PrefillCancelled(Exception):
    pass


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte <-> printable character table used by byte-level BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


def _decoder_kinds(decoder: dict[str, Any] | None) -> set[str]:
    if not decoder:
        return set()
    if decoder.get("type") == "Sequence":
        return {str(d.get("type")) for d in decoder.get("decoders", [])}
    return {str(decoder.get("type"))}


def _constrain(
    constraint: GrammarConstraint, n_prompt: int
) -> Callable[[mx.array, mx.array], mx.array]:
    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        generated = tokens.size - n_prompt
        if generated > 0:
            constraint.observe(generated, int(tokens[-1].tolist()))  # type: ignore[arg-type]
        allowed = mx.array(constraint.allowed(logits.shape[-1]))
        return mx.where(allowed, logits, -mx.inf)

    return process


class MLXEngine(Engine):
    """An mlx-lm model behind the backend interface."""

    format = "mlx"

    def _load(self) -> EngineInfo:
        model, tokenizer = mlx_load(str(self.path))[:2]
        self._model = model
        self._tokenizer = tokenizer
        hf = tokenizer._tokenizer
        backend = hf.backend_tokenizer
        decoder = json.loads(backend.to_str()).get("decoder")
        kinds = _decoder_kinds(decoder)
        self._byte_level = "ByteLevel" in kinds
        self._special_ids = set(hf.all_special_ids) | {
            i for i, t in hf.added_tokens_decoder.items() if t.special
        }
        self._piece_cache: dict[int, bytes] = {}
        probe = hf.encode("a", add_special_tokens=True)
        adds_bos = (
            probe[0] if hf.bos_token_id is not None and probe[:1] == [hf.bos_token_id] else None
        )
        strip = False
        if decoder and decoder.get("type") == "Sequence":
            strip = any(
                d.get("type") == "Strip" and d.get("start", 0) > 0
                for d in decoder.get("decoders", [])
            )
        vocab_size = int(model.args.vocab_size)
        self._vocab_size = vocab_size
        self.grammars = GrammarCache(
            lambda: llguidance.hf.from_tokenizer(
                hf, n_vocab=vocab_size, eos_token=sorted(tokenizer.eos_token_ids)
            ),
            vocab_size,
        )
        return EngineInfo(
            format="mlx",
            context_length=self.options.context_length,
            eos_token_ids=frozenset(tokenizer.eos_token_ids),
            bos_token_id=adds_bos,
            bos_token=hf.bos_token or "",
            eos_token=hf.eos_token or "",
            chat_template=hf.chat_template if isinstance(hf.chat_template, str) else None,
            strip_leading_space=strip,
        )

    def tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer._tokenizer.encode(text, add_special_tokens=False))

    def token_bytes(self, token_id: int) -> bytes:
        piece = self._piece_cache.get(token_id)
        if piece is None:
            piece = self._piece(token_id)
            self._piece_cache[token_id] = piece
        return piece

    def _piece(self, token_id: int) -> bytes:
        if token_id in self._special_ids:
            return b""
        hf = self._tokenizer._tokenizer
        if token_id in hf.added_tokens_decoder:
            return hf.added_tokens_decoder[token_id].content.encode()
        token = hf.convert_ids_to_tokens(token_id)
        if token is None:
            return b""
        if self._byte_level:
            if all(c in _BYTE_DECODER for c in token):
                return bytes(_BYTE_DECODER[c] for c in token)
            return token.encode()
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            return bytes([int(token[3:5], 16)])
        return token.replace("\u2581", " ").encode()

    def _sampler(self, p: SamplingParams) -> Callable[[mx.array], mx.array]:
        if p.temperature == 0:
            return lambda logprobs: mx.argmax(logprobs, axis=-1)
        filters: list[Callable[[mx.array], mx.array]] = []
        # A top-k as large as the vocabulary keeps every token (mlx-lm refuses such a k).
        if 0 < p.top_k < self._vocab_size:
            filters.append(lambda x: apply_top_k(x, p.top_k))
        if 0 < p.top_p < 1:
            filters.append(lambda x: apply_top_p(x, p.top_p))
        if p.min_p > 0:
            filters.append(lambda x: apply_min_p(x, p.min_p))
        # A key per request, not MLX's global random state, so that a seeded request is
        # reproducible whatever else runs.
        seed = p.seed % (1 << 63) if p.seed is not None else random.getrandbits(62)
        key = mx.random.key(seed)
        inv_temp = 1.0 / p.temperature

        def sample(logprobs: mx.array) -> mx.array:
            nonlocal key
            key, sub = mx.random.split(key)
            for f in filters:
                logprobs = f(logprobs)
            return mx.random.categorical(logprobs * inv_temp, key=sub)

        return sample

    def _steps(
        self, request: GenerationRequest, stream: TokenStream
    ) -> Generator[int | PromptProgress, None, None]:
        p = request.sampling
        processors = make_logits_processors(
            repetition_penalty=p.repeat_penalty if p.repeat_penalty != 1.0 else None,
            repetition_context_size=PENALTY_WINDOW,
            presence_penalty=p.presence_penalty or None,
            presence_context_size=PENALTY_WINDOW,
            frequency_penalty=p.frequency_penalty or None,
            frequency_context_size=PENALTY_WINDOW,
        )

        if request.constraint is not None:
            processors.append(_constrain(request.constraint, len(request.prompt)))

        def on_progress(done: int, total: int) -> None:
            if stream.cancelled:
                raise _PrefillCancelled
            if 0 < done < total:
                stream.put(PromptProgress(done, total))

        try:
            for token, _ in generate_step(
                mx.array(request.prompt),
                self._model,
                max_tokens=-1,
                sampler=self._sampler(p),
                logits_processors=processors,
                prefill_step_size=PREFILL_CHUNK,
                prompt_progress_callback=on_progress,
            ):
                yield int(token)
        except _PrefillCancelled:
            return

    def _unload(self) -> None:
        del self._model
        release_thread_memory()
