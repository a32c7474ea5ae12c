"""GGUF engine: llama.cpp through llama-cpp-python, on its own owner thread."""

from __future__ import annotations

import ctypes
import logging
import os
import random
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import Llama
from llguidance.llamacpp import lltokenizer_from_vocab

from backends.base import (
    CHECKPOINT_TAIL,
    GGML_CACHE_TYPES,
    PENALTY_WINDOW,
    DraftStats,
    Engine,
    EngineInfo,
    Job,
    LoadOptionUnsupported,
    TokenLogprobs,
    VisionPrompt,
    common_prefix,
)
from backends.constraint import GrammarCache
from backends.llamacpp import adapter
from backends.llamacpp.adapter import LlamaSampler
from backends.llamacpp.draft import DraftModel, decode_threads
from backends.llamacpp.reuse import Run, attach, best_source, prepare_hold
from backends.llamacpp.spill import GGUFSpill
from backends.llamacpp.vision import DEFAULT_MAX_PIXELS, Chunks, Image, Projector, find_projector
from backends.logprobs import penalize, token_logprobs

log = logging.getLogger("mlxserve.backends")

# Prompt tokens evaluated per step when no sequence is decoding.
IDLE_PREFILL_CHUNK = 2048


def _threads() -> tuple[int, int]:
    """Threads for decoding and for prompt processing. Decoding leaves a core free: llama.cpp's
    threads spin-wait on each other, so one descheduled thread stalls every step."""
    cpus = os.cpu_count() or 1
    return max(1, cpus - 1), cpus


@dataclass
class _Seq:
    """A request decoding in the shared context as llama.cpp sequence ``seq``."""

    job: Job
    seq: int
    prompt: list[int]
    cached: int
    sampler: LlamaSampler
    # Tokens in the KV cache for this sequence, then the sampled token not yet evaluated.
    tokens: list[int] = field(default_factory=list)
    pending: int | None = None
    # The sampled tokens the sampler chain's penalties look at (for log probabilities).
    recent: deque[int] = field(default_factory=lambda: deque(maxlen=PENALTY_WINDOW))
    # Cells minus positions: images take fewer positions than cells on M-RoPE models.
    pos_shift: int = 0
    # Decoding through speculative rounds with this draft model (see _spec_round).
    draft: DraftModel | None = None
    # Prompt-cache runs moved to their new positions, waiting in sequence ``hold`` until
    # decoding reaches them (see backends.llamacpp.reuse).
    hold: int | None = None
    runs: deque[Run] = field(default_factory=deque)
    # The prompt's images not yet in the cache, evaluated one piece per step (see _image_piece).
    media: Chunks | None = None

    @property
    def reserve(self) -> int:
        return len(self.prompt) + self.job.request.max_tokens


def _moe_key(path: Path) -> str | None:
    """The metadata key that sets how many experts a mixture-of-experts GGUF uses per token,
    or None for a dense model. Reads the file's metadata and vocabulary only, no tensors."""
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    with adapter.quiet():
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


def _cache_type(name: str | None, default: int) -> int:
    if name is None:
        return default
    if name not in GGML_CACHE_TYPES:
        raise ValueError(f"unknown KV cache type {name!r}; use one of {sorted(GGML_CACHE_TYPES)}")
    return GGML_CACHE_TYPES[name]


class LlamaCppEngine(Engine):
    """A GGUF model behind the backend interface."""

    format = "gguf"

    def _load(self) -> EngineInfo:
        options = self.options
        kv_type = llama_cpp.GGML_TYPE_F32 if options.kv_cache_f32 else llama_cpp.GGML_TYPE_F16
        type_k = _cache_type(options.cache_type_k, kv_type)
        type_v = _cache_type(options.cache_type_v, kv_type)
        self._n_batch = options.eval_batch_size or options.prefill_chunk
        threads, threads_batch = _threads()
        # Flash attention only when asked (the load, or the server's setting): it skips other
        # sequences' cells (without it every chunk scores every used cell, the prompt cache's
        # kept sequences included), but its CPU kernel sums in f16 in cell order, so output
        # would depend on where earlier requests left free cells. llama.cpp keeps a quantized
        # V cache only with it.
        quantized_v = type_v not in (llama_cpp.GGML_TYPE_F32, llama_cpp.GGML_TYPE_F16)
        flash = bool(options.flash_attention) or quantized_v
        offload = options.offload_kv_cache_to_gpu is not False
        moe = _moe_key(self.path) if options.num_experts else None
        overrides: dict[str, bool | int | float | str] | None = None
        if moe and options.num_experts:
            overrides = {moe: options.num_experts}
        # The Llama object serves the vocabulary, metadata and sampler chains; generation
        # runs in a second context, shared by parallel sequences (see _open_context).
        try:
            llm = Llama(
                model_path=str(self.path),
                n_ctx=256,
                n_batch=64,
                n_gpu_layers=-1,
                n_threads=threads,
                n_threads_batch=threads_batch,
                last_n_tokens_size=PENALTY_WINDOW,
                verbose=False,
                type_k=type_k,
                type_v=type_v,
                flash_attn=flash,
                offload_kqv=offload,
                kv_overrides=overrides,
            )
        except ValueError as exc:
            quantized = [
                (param, name)
                for param, name, kind in (
                    ("cache_type_k", options.cache_type_k, type_k),
                    ("cache_type_v", options.cache_type_v, type_v),
                )
                if kind not in (llama_cpp.GGML_TYPE_F32, llama_cpp.GGML_TYPE_F16)
            ]
            if not quantized or not flash or "context" not in str(exc):
                raise
            # The weights loaded; the context did not: with flash attention and a quantized
            # cache type that is the type (its blocks of 32 values must tile each head).
            names = " and ".join(f"{param} {name}" for param, name in quantized)
            raise LoadOptionUnsupported(
                f"llama.cpp cannot keep this model's KV cache as {names} with flash attention "
                "(which a quantized V cache needs): a quantized cache type stores blocks of 32 "
                "values, so each attention head's size must be a multiple of 32",
                quantized[0][0],
            ) from exc
        load_config: dict[str, Any] = {
            "eval_batch_size": self._n_batch,
            "flash_attention": flash,
            "offload_kv_cache_to_gpu": offload,
        }
        if overrides:
            load_config["num_experts"] = options.num_experts
        load_config["parallel"] = options.slots("gguf")
        if options.cache_type_k:
            load_config["cache_type_k"] = options.cache_type_k
        if options.cache_type_v:
            load_config["cache_type_v"] = options.cache_type_v
        self._llm = llm
        self._projector: Projector | None = None
        projector = find_projector(self.path)
        if projector is not None:
            self._projector = Projector(projector, adapter.model_pointer(llm), threads_batch)
        self._open_context()
        # Image cells are keyed by their image's pixel hash (see Projector.tokenize), which
        # holds across loads of the same projector: its file is part of the identity.
        self._spill = GGUFSpill.open(
            self.path,
            options,
            {"k": type_k, "v": type_v, "flash": flash},
            self._ctx.ctx,
            trimmable=not self._whole_only,
            projector=projector,
        )
        vocab = adapter.vocab_pointer(llm)
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
            context_length=options.context_length,
            eos_token_ids=eog,
            bos_token_id=bos if bos >= 0 and llama_cpp.llama_vocab_get_add_bos(vocab) else None,
            bos_token=self._text(bos) if bos >= 0 else "",
            eos_token=self._text(llm.token_eos()),
            chat_template=meta.get("tokenizer.chat_template"),
            strip_leading_space=strip,
            load_config=load_config,
            vision=self._projector is not None,
            image_max_pixels=DEFAULT_MAX_PIXELS if self._projector is not None else None,
            image_marker=self._projector.marker if self._projector is not None else None,
        )

    def prepare_vision(self, text: str, images: list[Any]) -> VisionPrompt:
        projector = self._projector
        if projector is None:
            raise NotImplementedError(f"{self.path.name} has no projector")
        return self.call(lambda: projector.tokenize(text, images)).result()

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

    def _open_context(self) -> None:
        llm, options = self._llm, self.options
        self._parallel = options.kv_windows("gguf")
        model = adapter.model_pointer(llm)
        # A recurrent state (Mamba, Gated DeltaNet) cannot be cut back, and llama.cpp copies a
        # sequence's whole state whatever range is asked: a kept sequence of such a model is
        # reused only whole, so checkpoints are kept at the end of each prompt too.
        self._whole_only = bool(
            llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model)
        )
        # A sequence id per parallel slot runs a request, one more keeps a finished one for
        # prefix reuse, and with whole-only memory a third keeps its prompt checkpoint (each
        # costs such a model one more recurrent state).
        per_slot = 3 if self._whole_only else 2
        n_seq = min(per_slot * self._parallel, llama_cpp.llama_max_parallel_sequences())
        self._n_seq = n_seq
        self._cells = options.context_length * self._parallel
        self._step_tokens = max(self._n_batch, IDLE_PREFILL_CHUNK) + self._parallel
        params = type(llm.context_params).from_buffer_copy(llm.context_params)
        params.n_ctx = self._cells
        params.n_batch = self._step_tokens
        params.n_ubatch = min(self._n_batch, 512)
        params.n_seq_max = n_seq
        params.kv_unified = True
        with adapter.quiet():
            self._ctx = adapter.new_context(llm, params)
        self._mem = llama_cpp.llama_get_memory(self._ctx.ctx)
        # Changed-middle reuse moves KV cells; recurrent memory cannot (exact prefixes only).
        self._reuse = self.options.cache_reuse if llama_cpp.llama_memory_can_shift(self._mem) else 0
        self._batch = llama_cpp.llama_batch_init(self._step_tokens, 0, 1)
        n_head = max(1, llama_cpp.llama_model_n_head(model))
        kv_width = llama_cpp.llama_model_n_embd(model) * llama_cpp.llama_model_n_head_kv(model)
        bits = options.kv_element_bits("gguf")
        n_layer = llama_cpp.llama_model_n_layer(model)
        self._token_bytes = max(1, int(2 * n_layer * kv_width // n_head * bits / 8))
        self._free = list(range(n_seq))
        # Finished sequences kept for prefix reuse (least recently used first): their tokens.
        self._kept: OrderedDict[int, list[int]] = OrderedDict()
        # Their position shift: cells minus positions after an image (M-RoPE).
        self._kept_shift: dict[int, int] = {}

    # --- parallel sequences (owner thread) ----------------------------------------------

    def _setup(self) -> None:
        super()._setup()
        self._waiting: deque[Job] = deque()
        self._running: list[_Seq] = []
        # Draft models by folder, loaded into this engine for speculative decoding.
        self._drafts: dict[Path, DraftModel] = {}

    def prepare_draft(self, path: Path) -> None:
        if path not in self._drafts:
            self._drafts[path] = DraftModel(
                path, self._llm, self._n_seq, self._cells, self._n_batch
            )

    def _admit(self, job: Job) -> None:
        self._waiting.append(job)

    def busy(self) -> bool:
        return bool(self._waiting or self._running)

    def step(self) -> None:
        try:
            self._step()
        except Exception as exc:
            log.exception("generation failed on %s", self.path.name)
            for s in self._running:
                s.job.fail(exc)
                self._release_hold(s)
                self._drop(s.seq)
            self._running.clear()

    def abort(self, exc: BaseException) -> None:
        super().abort(exc)
        waiting, self._waiting = self._waiting, deque()
        running, self._running = self._running, []
        for job in waiting:
            job.fail(exc)
        for s in running:
            s.job.fail(exc)
        for s in running:
            self._release_hold(s)
            self._drop(s.seq)

    def _drop(self, seq: int) -> None:
        llama_cpp.llama_memory_seq_rm(self._mem, seq, -1, -1)
        for draft in self._drafts.values():
            draft.drop(seq)
        self._kept.pop(seq, None)
        self._kept_shift.pop(seq, None)
        self._free.append(seq)

    def _evict_until(self, fits: Any, keep: int | None = None) -> None:
        for seq in [s for s in self._kept if s != keep]:
            if fits():
                return
            self._spill_kept(seq)
            self._drop(seq)

    def _spill_kept(self, seq: int) -> None:
        tokens = self._kept[seq]
        if self._spill is not None:
            self._spill.save(seq, tokens, self._kept_shift.get(seq, 0))

    def _restore_spilled(self, job: Job) -> None:
        """Bring back the longest spilled prefix of the prompt as a kept sequence when no kept
        sequence shares as much of it: the search below then reuses it like the others."""
        request = job.request
        prompt = request.prompt
        if self._spill is None:
            return
        kept = [
            n
            for t in self._kept.values()
            if (n := common_prefix(t, prompt, len(prompt) - 1)) == len(t) or not self._whole_only
        ]
        key, _ = self._spill.store.longest(prompt, max(kept, default=0))
        if key is None:
            return
        need = len(key) + len(prompt) + request.max_tokens
        need += sum(s.reserve for s in self._running)

        def fits() -> bool:
            # One free sequence for the entry, one for the request.
            return need + self._kept_cells() <= self._cells and len(self._free) >= 2

        self._evict_until(fits)
        if not fits():
            return
        seq = self._free.pop()
        pos_shift = self._spill.restore(key, seq)
        if pos_shift is None:
            self._drop(seq)
            return
        self._kept[seq] = list(key)
        self._kept_shift[seq] = pos_shift

    def _kept_cells(self) -> int:
        return sum(len(t) for t in self._kept.values())

    def _start_seq(self, job: Job) -> None:
        self._restore_spilled(job)
        request = job.request
        prompt = list(request.prompt)
        # The kept sequence that serves most of the prompt: its exact shared prefix, then the
        # runs past it that can be moved (none for image prompts or after an image).
        min_run = self._reuse if request.vision is None else 0
        movable = {k: t for k, t in self._kept.items() if not self._kept_shift.get(k)}
        busy = [r.tokens for r in self._running]
        kept: Mapping[int, list[int]] = self._kept
        if self._whole_only:
            kept = {k: t for k, t in kept.items() if len(t) < len(prompt) and prompt[: len(t)] == t}
        source, shared, runs = best_source(kept, movable, busy, prompt, min_run)
        # Image cells are marked by their image's hash (negative ids): a prefix shared with a
        # kept sequence holds the same images, and is reused up to an image boundary.
        media: Chunks | None = request.vision
        if media is not None:
            shared = media.boundary(shared)
            if not shared:
                source = None
        first_media = next((i for i, t in enumerate(prompt) if t < 0), len(prompt))
        need = len(prompt) + request.max_tokens + sum(s.reserve for s in self._running)
        self._evict_until(lambda: need + self._kept_cells() <= self._cells, keep=source)
        if not self._free:
            self._evict_until(lambda: bool(self._free), keep=source)
        if need + self._kept_cells() > self._cells or not self._free:
            source, shared, runs = None, 0, []
            self._evict_until(lambda: need + self._kept_cells() <= self._cells and self._free)
        seq = self._free.pop()
        try:
            pos_shift = 0
            if source is not None and shared > first_media:
                pos_shift = self._kept_shift.get(source, 0)
                if media is not None:
                    pos_shift = media.shift_at(shared)
            if source is not None:
                self._kept.move_to_end(source)
                # Unified KV: the copy shares the source's cells, nothing is duplicated. The
                # range is in positions: after an image they lag the cells by its shift.
                llama_cpp.llama_memory_seq_cp(self._mem, source, seq, 0, shared - pos_shift)
            p = request.sampling
            seed = p.seed % (1 << 32) if p.seed is not None else random.getrandbits(31)
            self._llm.set_seed(seed)
            # llama-cpp-python's sampler chain (penalties, top-k/p, min-p, temperature, seeded
            # draw), one per sequence; a grammar masks the logits in place before it samples.
            sampler = adapter.sampler_chain(
                self._llm,
                top_k=p.top_k,
                top_p=p.top_p,
                min_p=p.min_p,
                temp=p.temperature,
                repeat_penalty=p.repeat_penalty,
                frequency_penalty=p.frequency_penalty,
                presence_penalty=p.presence_penalty,
            )
        except BaseException:
            # The sequence id goes back, its cells cleared, so that no slot leaks.
            self._drop(seq)
            raise
        state = _Seq(job, seq, prompt, shared, sampler, prompt[:shared], pos_shift=pos_shift)
        if media is not None:
            if any(i.start >= shared for i in media.images):
                state.media = media
            else:
                media.free()
        if source is not None and runs:
            # The kept sequence gives up its place in the cache and holds the moved runs.
            del self._kept[source]
            self._kept_shift.pop(source, None)
            prepare_hold(self._mem, source, shared, runs)
            state.hold, state.runs = source, deque(runs)
            state.cached += sum(r.n for r in runs)
        # Image prompts decode without their draft: its context holds no images. Nor do
        # recurrent models: rejected proposals cannot be removed from their state.
        if request.draft is not None and request.vision is None and not self._whole_only:
            state.draft = self._drafts[request.draft]
            job.draft = DraftStats()
        self._running.append(state)
        if len(prompt) * self._token_bytes <= self.options.prompt_cache_bytes:
            job.cache_written = len(prompt) - state.cached
        job.progress(shared, len(prompt), state.cached)

    def _next_image(self, s: _Seq) -> Image | None:
        """The first of ``s``'s images not decoded yet (its media freed once all are)."""
        media = s.media
        if media is None:
            return None
        image = next((i for i in media.images if i.start + i.n > len(s.tokens)), None)
        if image is None:
            media.free()
            s.media = None
            return None
        return image

    def _image_piece(self, s: _Seq, image: Image, room: int) -> None:
        """One bounded piece of ``s``'s image: its encoding, or the next at most ``room`` of
        its embeddings decoded at their positions (M-RoPE: 2-D ones)."""
        assert self._projector is not None and s.media is not None
        if image.embd is None:
            self._projector.encode(s.media, image)
            return
        pos_0 = image.start - s.pos_shift
        n = self._projector.decode(self._ctx.ctx, s.media, image, s.seq, pos_0, room)
        s.tokens.extend(s.prompt[len(s.tokens) : len(s.tokens) + n])
        if image.done == image.n:
            s.pos_shift += image.shift
        s.job.progress(len(s.tokens), len(s.prompt), s.cached)

    def _attach_runs(self, s: _Seq) -> None:
        """Give ``s`` the moved runs that start where its decoding has reached."""
        assert s.hold is not None
        while s.runs and s.runs[0].new == len(s.tokens):
            run = s.runs.popleft()
            attach(self._mem, s.hold, s.seq, run)
            s.tokens.extend(s.prompt[run.new : run.new + run.n])
        if not s.runs:
            self._release_hold(s)
        s.job.progress(len(s.tokens), len(s.prompt), s.cached)

    def _release_hold(self, s: _Seq) -> None:
        if s.hold is not None:
            llama_cpp.llama_memory_seq_rm(self._mem, s.hold, -1, -1)
            self._free.append(s.hold)
            s.hold = None
            s.runs.clear()

    def _finish_seq(self, s: _Seq) -> None:
        self._running.remove(s)
        if s.media is not None:
            s.media.free()
        self._release_hold(s)
        if s.draft is not None:
            s.draft.drop(s.seq)
        tokens = s.tokens
        size = len(tokens) * self._token_bytes
        if not tokens or size > self.options.prompt_cache_bytes:
            self._drop(s.seq)
            return
        # A kept sequence this one extends is covered by it, unless it cannot be cut back.
        for seq, kept in list(self._kept.items()):
            if len(kept) <= len(tokens) and tokens[: len(kept)] == kept and not self._whole_only:
                self._drop(seq)
        self._keep(s.seq, tokens, s.pos_shift)

    def _keep(self, seq: int, tokens: list[int], pos_shift: int) -> None:
        self._kept[seq] = tokens
        self._kept_shift[seq] = pos_shift
        budget = self.options.prompt_cache_bytes // self._token_bytes
        self._evict_until(lambda: self._kept_cells() <= budget, keep=seq)

    def _checkpoint_at(self, s: _Seq) -> int:
        """Where the prompt checkpoint of a model whose memory cannot be cut back is taken (0:
        none): the next turn's prompt extends this prompt but for its generation prompt,
        while the reply may come back re-rendered."""
        if not self._whole_only or s.pending is not None or s.job.generated:
            return 0
        return max(0, len(s.prompt) - CHECKPOINT_TAIL)

    def _checkpoint_prompt(self, s: _Seq) -> None:
        """Keep a copy of ``s`` as it is at its prompt checkpoint. The copy shares the KV
        cells; llama.cpp copies the recurrent state to a cell of its own when ``s`` next
        writes to it."""
        if len(s.tokens) * self._token_bytes > self.options.prompt_cache_bytes:
            return
        if any(t == s.tokens for t in self._kept.values()):
            return
        # A fresh checkpoint is worth more than the least recently used kept sequence.
        self._evict_until(lambda: bool(self._free))
        if not self._free:
            return
        seq = self._free.pop()
        llama_cpp.llama_memory_seq_cp(self._mem, s.seq, seq, -1, -1)
        self._keep(seq, list(s.tokens), s.pos_shift)

    def _step(self) -> None:
        for job in [j for j in self._waiting if j.cancelled]:
            self._waiting.remove(job)
            job.finish("cancelled")
        for s in [s for s in self._running if s.job.cancelled]:
            s.job.finish("cancelled")
            self._finish_seq(s)
        while self._waiting and len(self._running) < self._parallel:
            job = self._waiting.popleft()
            try:
                self._start_seq(job)
            except Exception as exc:
                log.exception("could not start a sequence on %s", self.path.name)
                job.fail(exc)
        if not self._running:
            return
        # The running streams' tokens and each prompt's chunk go to llama.cpp in decodes of
        # their own: its attention kernels change numerics with the number of tokens in a
        # micro-batch (the CPU flash-attention kernel tiles from 64 queries), so a token is
        # computed as it would be alone only if its neighbours in the micro-batch are too.
        decoding = [s for s in self._running if s.pending is not None and s.draft is None]
        self._batch.n_tokens = 0
        for s in decoding:
            assert s.pending is not None
            self._put(s, s.pending, True)
            s.pending = None
        if decoding:
            self._decode()
            self._take_samples([(s, i) for i, s in enumerate(decoding)])
        room = self._n_batch if decoding else self._step_tokens - self._parallel
        for s in list(self._running):
            if room <= 0:
                break
            if s.hold is not None:
                self._attach_runs(s)
            done = len(s.tokens)
            if done >= len(s.prompt):
                continue
            end = s.runs[0].new if s.runs else len(s.prompt)
            image = self._next_image(s)
            if image is not None and image.start + image.done == done:
                # Encoding an image is one piece that cannot be split: it takes the step's room.
                take = min(room, image.n - image.done) if image.embd is not None else room
                self._image_piece(s, image, room)
                room -= take
                continue
            if image is not None:
                end = min(end, image.start)
            if done < self._checkpoint_at(s):
                end = min(end, self._checkpoint_at(s))
            chunk = s.prompt[done : min(done + room, end)]
            if not chunk:
                continue
            room -= len(chunk)
            self._batch.n_tokens = 0
            for j, token in enumerate(chunk):
                self._put(s, token, done + j == len(s.prompt) - 1)
            self._decode()
            if 0 < len(s.tokens) == self._checkpoint_at(s):
                self._checkpoint_prompt(s)
            if len(s.tokens) < len(s.prompt):
                s.job.progress(len(s.tokens), len(s.prompt), s.cached)
            else:
                self._take_samples([(s, len(chunk) - 1)])
        # Drafted requests each take one speculative round of their own after the batch.
        for s in [s for s in self._running if s.pending is not None and s.draft is not None]:
            self._spec_round(s)

    def _take_samples(self, outputs: list[tuple[_Seq, int]]) -> None:
        """Sample each sequence's next token from its row of the last decode."""
        for s, i in outputs:
            token, lp = self._sample(s, i)
            self.batched_tokens += 1
            if self._accept(s.job, token, lp):
                self._finish_seq(s)
            else:
                s.pending = token

    def _put(self, s: _Seq, token: int, logits: bool) -> int:
        """Append ``token`` of sequence ``s`` to the batch at its next position; its index."""
        batch = self._batch
        i = batch.n_tokens
        batch.token[i] = token
        batch.pos[i] = len(s.tokens) - s.pos_shift
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = s.seq
        batch.logits[i] = logits
        batch.n_tokens = i + 1
        s.tokens.append(token)
        return i

    def _decode(self) -> None:
        rc = llama_cpp.llama_decode(self._ctx.ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _sample(self, s: _Seq, i: int) -> tuple[int, TokenLogprobs | None]:
        """Sample ``s``'s next token from row ``i`` of the last decode: grammar mask, then the
        sequence's sampler chain (which takes the token into its penalty window)."""
        request = s.job.request
        constraint = request.constraint
        logits = None
        if constraint is not None or request.logprobs is not None:
            logits = np.ctypeslib.as_array(
                llama_cpp.llama_get_logits_ith(self._ctx.ctx, i), shape=(self._n_vocab,)
            )
        if constraint is not None and logits is not None:
            constraint.mask_inplace(logits)
        if logits is not None and request.logprobs is not None:
            # The chain's penalty sampler works on its own copy: apply them here too.
            logits = penalize(logits, s.recent, request.sampling)
        token = s.sampler.sample(self._ctx, i)
        if constraint is not None:
            constraint.advance(token)
        lp = None
        if logits is not None and request.logprobs is not None:
            lp = token_logprobs(logits, token, request.logprobs)
            s.recent.append(token)
        return token, lp

    def _spec_round(self, s: _Seq) -> None:
        """One speculative round: the draft proposes up to ``num_draft_tokens`` greedy tokens
        after the pending one, the model evaluates them all in one decode, and its own samples
        are taken row by row while they match the proposals. Every token is sampled from the
        model's row for exactly the prefix it follows, through the same grammar and sampler
        state as without a draft, so the output is the same; the cache cells past the last
        accepted proposal are removed."""
        assert s.draft is not None and s.pending is not None and s.job.draft is not None
        job, stats = s.job, s.job.draft
        request = job.request
        # Never past max_tokens: the round yields at most k + 1 tokens.
        k = max(0, min(request.num_draft_tokens, request.max_tokens - job.generated - 1))
        pending, s.pending = s.pending, None
        proposed = s.draft.propose(s.seq, [*s.tokens, pending], k) if k else []
        stats.total += len(proposed)
        start = len(s.tokens)
        self._batch.n_tokens = 0
        for token in [pending, *proposed]:
            self._put(s, token, True)
        with decode_threads(self._ctx.ctx):
            self._decode()
        accepted, done = 0, False
        for i in range(len(proposed) + 1):
            token, lp = self._sample(s, i)
            # The stream's last item carries the stats: proposals not judged yet count as
            # ignored before a token that may end the reply is taken, and are judged after.
            stats.ignored += len(proposed) - i
            done = self._accept(job, token, lp)
            if done:
                break
            stats.ignored -= len(proposed) - i
            if i == len(proposed):
                s.pending = token
                break
            if token != proposed[i]:
                stats.rejected += len(proposed) - i
                s.pending = token
                break
            accepted += 1
            stats.accepted += 1
        keep = start + 1 + accepted
        if keep < len(s.tokens):
            llama_cpp.llama_memory_seq_rm(self._mem, s.seq, keep - s.pos_shift, -1)
            del s.tokens[keep:]
        if done:
            s.pending = None
            self._finish_seq(s)

    def _unload(self) -> None:
        if self._spill is not None:
            for seq in list(self._kept):
                self._spill_kept(seq)
            self._spill.close()
        if self._projector is not None:
            self._projector.close()
        for draft in self._drafts.values():
            draft.close()
        self._drafts.clear()
        llama_cpp.llama_batch_free(self._batch)
        self._ctx.close()
        self._llm.close()
        del self._llm, self._ctx
