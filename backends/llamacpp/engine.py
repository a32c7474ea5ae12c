"""GGUF engine: llama.cpp through llama-cpp-python, on its own owner thread."""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp import Llama
from llguidance.llamacpp import lltokenizer_from_vocab

from backends.base import (
    GGML_CACHE_TYPES,
    PENALTY_WINDOW,
    EngineInfo,
    Job,
    LoadOptionUnsupported,
    VisionPrompt,
)
from backends.constraint import GrammarCache
from backends.llamacpp import adapter
from backends.llamacpp.budget import STEP_SHARE, tokens_within
from backends.llamacpp.draft import DraftModel
from backends.llamacpp.hostcache import HostCache
from backends.llamacpp.pool import PooledSequences
from backends.llamacpp.sampling import NoRoom
from backends.llamacpp.sequence import _Seq
from backends.llamacpp.spill import GGUFSpill
from backends.llamacpp.vision import DEFAULT_MAX_PIXELS, Image, Projector, find_projector

log = logging.getLogger("mlxserve.backends")

# Prompt tokens evaluated per step when no sequence is decoding.
IDLE_PREFILL_CHUNK = 2048
# What one cell costs a token's attention per head beyond its 2 * head_dim multiply-adds,
# in multiply-adds: without flash attention each head's f32 score is written, masked,
# softmaxed and read back, and on the engine's threads (f32 KV for the f32 bench model) this
# part shares the cores worse than the weight products. Measured on the server's own steps
# (llama.cpp 0.3.36, the 2-core Linux CPU, the bench's full model): with 160 (a one-thread
# f32 fit in CPU time, scripts/bench_step_cost.py) a 4k prompt's admission steps rose from
# ~250 to ~390 ms as its cells grew, each priced alike; with 960 they held at 200-275 ms
# from first to last.
SCORE_COST = 960


def _threads() -> tuple[int, int]:
    """Threads for decoding and for prompt processing. Decoding leaves a core free: llama.cpp's
    threads spin-wait on each other, so one descheduled thread stalls every step."""
    cpus = os.cpu_count() or 1
    return max(1, cpus - 1), cpus


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


def weight_cells(weights: int, n_layer: int, n_embd: int, n_head: int) -> int:
    """A token's products with the model's ``weights`` (its parameters but the embeddings)
    in units of what one cell in use costs it without flash attention: per layer the cell's
    2 * ``n_embd`` multiply-adds, and per head its score (``SCORE_COST``). A prompt chunk of
    T tokens with C cells in use then costs T * (this + C + T) units (see _chunk_tokens)."""
    return max(1, weights // max(1, n_layer * (2 * n_embd + SCORE_COST * n_head)))


def cell_costs(llm: Llama) -> tuple[int, int]:
    """What one cell in use costs a token of ``llm`` in multiply-adds (see weight_cells), and
    its weight_cells: a draft model's tokens are priced in its model's cells with them."""
    model = adapter.model_pointer(llm)
    n_embd = llama_cpp.llama_model_n_embd(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(adapter.vocab_pointer(llm))
    weights = llama_cpp.llama_model_n_params(model) - n_vocab * n_embd
    n_layer = llama_cpp.llama_model_n_layer(model)
    n_head = llama_cpp.llama_model_n_head(model)
    cell = n_layer * (2 * n_embd + SCORE_COST * n_head)
    return cell, weight_cells(weights, n_layer, n_embd, n_head)


def _cache_type(name: str | None, default: int) -> int:
    if name is None:
        return default
    if name not in GGML_CACHE_TYPES:
        raise ValueError(f"unknown KV cache type {name!r}; use one of {sorted(GGML_CACHE_TYPES)}")
    return GGML_CACHE_TYPES[name]


class LlamaCppEngine(PooledSequences):
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
        self._flash = flash
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
        self._parallel = options.slots("gguf")
        model = adapter.model_pointer(llm)
        # A recurrent state (Mamba, Gated DeltaNet) cannot be cut back, and llama.cpp copies a
        # sequence's whole state whatever range is asked: a kept sequence of such a model is
        # reused only whole, so checkpoints are kept at the end of each prompt too.
        self._whole_only = bool(
            llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model)
        )
        # The same count the guardrail gives each of such a model's recurrent states.
        n_seq = min(
            options.sequence_ids("gguf", self._whole_only),
            llama_cpp.llama_max_parallel_sequences(),
        )
        self._n_seq = n_seq
        # One pool of cells for all sequences by default (llama-server's unified KV): llama.cpp
        # reserves and clears every cell at creation, so each window is resident from load.
        self._cells = options.context_length * options.kv_windows("gguf")
        self._headroom = max(16, self._cells // 16)
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
        # Without flash attention a prompt token costs this plus one per cell in use.
        self._weight_cells = cell_costs(llm)[1]
        self._free = list(range(n_seq))
        # Finished sequences kept for prefix reuse (least recently used first): their tokens.
        self._kept: OrderedDict[int, list[int]] = OrderedDict()
        # Their position shift: cells minus positions after an image (M-RoPE).
        self._kept_shift: dict[int, int] = {}
        # Kept sequences out of the context, so that their cells cost no attention.
        self._host = HostCache(self._ctx.ctx, trimmable=not self._whole_only)

    # --- parallel sequences (owner thread) ----------------------------------------------

    def _setup(self) -> None:
        super()._setup()
        self._waiting: deque[Job] = deque()
        self._running: list[_Seq] = []
        # Sequences preempted for room, in admission order: they resume before new admissions.
        self._preempted: list[_Seq] = []
        self._marks = {}
        self._admissions = itertools.count()
        self._stalled = False
        # Draft models by folder, loaded into this engine for speculative decoding.
        self._drafts: dict[Path, DraftModel] = {}

    def prepare_draft(self, path: Path) -> None:
        if path not in self._drafts:
            self._drafts[path] = DraftModel(
                path, self._llm, self._n_seq, self._cells, self._n_batch, cell_costs
            )

    def _admit(self, job: Job) -> None:
        self._waiting.append(job)

    @property
    def prompt_cache_held_bytes(self) -> int:
        # Kept sequences in the context hold cells reserved at load: only parked ones add.
        return self._host.bytes

    def busy(self) -> bool:
        return bool(self._waiting or self._running or self._preempted)

    def step(self) -> None:
        try:
            try:
                self._step()
            except NoRoom:
                self._relieve()
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
        preempted, self._preempted = self._preempted, []
        for job in [*waiting, *(s.job for s in preempted)]:
            job.fail(exc)
        for s in preempted:
            self._release_parked(s)
        for s in running:
            s.job.fail(exc)
        for s in running:
            self._release_hold(s)
            self._drop(s.seq)

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

    def _step(self) -> None:
        for job in [j for j in self._waiting if j.cancelled]:
            self._waiting.remove(job)
            job.finish("cancelled")
        for s in [s for s in self._running if s.job.cancelled]:
            s.job.finish("cancelled")
            self._finish_seq(s)
        for s in [s for s in self._preempted if s.job.cancelled]:
            self._preempted.remove(s)
            self._release_parked(s)
            s.job.finish("cancelled")
            if s.media is not None:
                s.media.free()
        self._resume()
        used: set[int] = set()
        admitted = False
        parked: list[int] = []
        while (
            self._waiting
            and not self._preempted
            and not (self._stalled and self._running)
            and len(self._running) < self._parallel
        ):
            job = self._waiting.popleft()
            try:
                if not self._start_seq(job, used):
                    # Running sequences only grow: try again once one has finished.
                    self._waiting.appendleft(job)
                    self._stalled = True
                    break
            except Exception as exc:
                log.exception("could not start a sequence on %s", self.path.name)
                job.fail(exc)
            admitted = True
        if admitted and not self._flash:
            # Kept sequences the new requests do not use leave the context, so that prompt
            # chunks and decode steps do not attend over their cells (see
            # backends.llamacpp.hostcache). Flash attention skips other sequences' cells:
            # there they stay (a copy out and back would buy nothing).
            parked = [k for k in self._kept if k not in used]
            freed = sum(len(self._kept[k]) for k in parked)
            for seq in parked:
                self._park(seq)
            if parked:
                self._relocate(freed)
        if not self._running:
            return
        self._make_room()
        # Without flash attention a step is one llama_decode: the running streams' tokens and
        # the prompts' chunks share one pass over the weights, and a prompt's last row rides
        # on the streams' output projection (a second decode paid both again, slowing the
        # streams that run while others are admitted: the 8-stream fairness figure). With
        # flash attention each part is decoded alone: its CPU kernel changes numerics with
        # the number of tokens in a micro-batch (it tiles from 64 queries), so a token is
        # computed as it would be alone only if its neighbours in the micro-batch are too.
        alone = self._flash
        decoding = [s for s in self._running if s.pending is not None and s.draft is None]
        # Streams wait for this step's prompt work, drafted ones too (their rounds follow it).
        streaming = any(s.pending is not None for s in self._running)
        self._batch.n_tokens = 0
        outputs: list[tuple[_Seq, int]] = []
        for s in decoding:
            assert s.pending is not None
            outputs.append((s, self._put(s, s.pending, True)))
            s.pending = None
        if decoding and alone:
            self._decode()
            self._take_samples(outputs)
            outputs = []
        cap = self._n_batch if streaming else self._step_tokens - self._parallel
        # Prompt chunks take only free cells, leaving the drafted sequences' rounds theirs.
        room = min(cap, self._free_cells() - sum(map(self._round_cells, self._running)))
        if parked and streaming:
            # The copies out took this step's time: prompt chunks wait for the next step, so
            # that running streams never wait for a copy and a chunk in one step.
            room = 0
        chunks: list[tuple[_Seq, int]] = []
        # Image pieces decode on their own after the shared batch (they replace its logits).
        images: list[tuple[_Seq, Image, int]] = []
        # While streams decode, a step's prompt chunks cost at most STEP_SHARE of one chunk of
        # eval_batch_size tokens on an empty context: without flash attention a chunk attends
        # over every cell in use, so it gets fewer tokens as the cells grow.
        budget: float | None = None
        if streaming and not self._flash:
            budget = STEP_SHARE * self._n_batch * (self._weight_cells + self._n_batch)
            cells = self._in_use()
        # Drafts behind their requests' tokens take their chunks first, from the same budget
        # and tokens (their own cells: the draft's context is another).
        drafted, cost, full = self._catch_up_drafts(budget, 0 if parked and streaming else cap)
        room = min(room, cap - drafted)
        if budget is not None:
            budget -= cost
        first = not drafted
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
                if image.embd is not None and self._piece_cells(s) > room:
                    # Decoded whole (non-causal attention): once its cells are free.
                    continue
                if alone:
                    self._image_piece(s, image, room)
                else:
                    images.append((s, image, room))
                room -= take
                continue
            if image is not None:
                end = min(end, image.start)
            if done < self._checkpoint_at(s):
                end = min(end, self._checkpoint_at(s))
            chunk = s.prompt[done : min(done + room, end)]
            if budget is not None:
                n = self._chunk_tokens(budget, cells, len(chunk))
                chunk = chunk[: max(n, 1) if first else n]
                budget -= len(chunk) * (self._weight_cells + cells + len(chunk))
                cells += len(chunk)
            if not chunk:
                continue
            first = False
            room -= len(chunk)
            if alone:
                self._batch.n_tokens = 0
            for j, token in enumerate(chunk):
                last = self._put(s, token, done + j == len(s.prompt) - 1)
            if alone:
                self._decode()
                self._take_samples(self._chunk_done(s, last))
            else:
                chunks.append((s, last))
        if not alone and self._batch.n_tokens:
            self._decode()
            for s, last in chunks:
                outputs += self._chunk_done(s, last)
            self._take_samples(outputs)
        for s, image, limit in images:
            self._image_piece(s, image, limit)
        # Drafted requests each take one speculative round of their own after the batch, once
        # their draft has caught up.
        for s in [s for s in self._running if s.pending is not None and s.draft is not None]:
            if self._ready(s, full):
                self._spec_round(s)

    def _chunk_done(self, s: _Seq, last: int) -> list[tuple[_Seq, int]]:
        """After the decode that took ``s``'s prompt chunk (its last row at ``last``): the
        prompt checkpoint and progress; the row to sample once the whole prompt is in."""
        if 0 < len(s.tokens) == self._checkpoint_at(s):
            self._checkpoint_prompt(s)
        if len(s.tokens) < len(s.prompt):
            s.job.progress(len(s.tokens), len(s.prompt), s.cached)
            return []
        return [(s, last)]

    def _in_use(self) -> int:
        """The cells in use, estimated (shared prefixes counted per sequence): without flash
        attention llama.cpp scores every micro-batch against all cells up to the highest."""
        return self._kept_cells() + sum(len(s.tokens) for s in self._running)

    def _chunk_tokens(self, budget: float, cells: int, want: int) -> int:
        """How many of ``want`` prompt tokens fit a step's remaining attention ``budget`` when
        ``cells`` cells are in use: T tokens cost T * (weights + cells + T) in cell units."""
        return tokens_within(budget, self._weight_cells + cells, want)

    def _unload(self) -> None:
        if self._spill is not None:
            for seq in list(self._kept):
                self._spill_kept(seq)
            self._spill_host_until(lambda: not self._host)
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
