"""MLX engine: mlx-lm models, run on their own owner thread (MLX arrays belong to that thread)."""

from __future__ import annotations

import json
import logging
from collections import deque
from pathlib import Path
from typing import Any

import llguidance.hf
from mlx_lm import load as mlx_load
from mlx_lm.generate import (
    BatchGenerator,
    StopSequences,
)
from mlx_lm.models.cache import KVCache, make_prompt_cache

from backends.base import (
    CHECKPOINT_TAIL,
    EngineInfo,
    Job,
    LoadOptionUnsupported,
)
from backends.constraint import GrammarCache
from backends.mlx import release_thread_memory
from backends.mlx.kvquant import BITS, group_size_for
from backends.mlx.lm_adapter import hf_tokenizer
from backends.mlx.prefill import IDLE_PREFILL_CHUNK, PrefillBudget
from backends.mlx.prompt_cache import PromptCache
from backends.mlx.sampling import _logprobs
from backends.mlx.solo import SoloPaths
from backends.mlx.spill import MLXSpill
from backends.mlx.splice import Splice, key_shifts

log = logging.getLogger("mlxserve.backends")


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


class MLXEngine(SoloPaths):
    """An mlx-lm model behind the backend interface."""

    format = "mlx"
    # Whether prompt-cache entries are spilled to disk (a shard or an image prompt's KV is no
    # use to a later load of the whole text model).
    spills = True

    def _setup(self) -> None:
        super()._setup()
        # Requests in the batch by BatchGenerator uid, with the prompt positions their cache
        # held when inserted and how many prompt tokens were not computed.
        self._batched: dict[int, tuple[Job, int, int]] = {}
        # Requests whose cache is being spliced from a changed-middle prompt-cache hit.
        self._splices: list[tuple[Job, Splice]] = []
        self._prefill = PrefillBudget(self.options.prefill_chunk, self.options.slots("mlx"))
        # Draft models by folder, loaded into this engine for speculative decoding.
        self._drafts: dict[Path, Any] = {}
        # Requests waiting for one of the instance's ``parallel`` places: seeded, drafted and
        # image requests run beside the batch, so the batch alone cannot bound them.
        self._waiting: deque[Job] = deque()
        self._slots = self.options.slots("mlx")

    def prepare_draft(self, path: Path) -> None:
        if path in self._drafts:
            return
        model, tokenizer = mlx_load(str(path))[:2]
        if hf_tokenizer(tokenizer).get_vocab() != hf_tokenizer(self._tokenizer).get_vocab():
            raise ValueError("its vocabulary differs")
        self._drafts[path] = model

    def _load_model(self) -> tuple[Any, Any]:
        """The model and its tokenizer (a distributed engine loads its shard instead)."""
        model, tokenizer = mlx_load(str(self.path))[:2]
        return model, tokenizer

    def _load(self) -> EngineInfo:
        model, tokenizer = self._load_model()
        self._model = model
        options = self.options
        # BatchGenerator merges per-request caches into batch caches; a model whose cache
        # cannot merge runs every request on the single path.
        layers = make_prompt_cache(model)
        self._batchable = all(hasattr(c, "merge") for c in layers)
        # A cache that cannot be cut back to a shorter prefix (recurrent state, sliding
        # window) is kept as checkpoints: at the end of each prompt as well as of each reply.
        self._checkpoints = not all(type(c) is KVCache for c in layers)
        self._kv_group = self._kv_quantization(model)
        self._batch = self._new_batch()
        self._spill = (
            MLXSpill.open(self.path, options, len(layers), trimmable=not self._checkpoints)
            if self.spills
            else None
        )
        self._prompt_cache = PromptCache(
            options.prompt_cache_bytes,
            on_evict=self._spill.save if self._spill is not None else None,
        )
        self._key_shifts = key_shifts(model)
        self._tokenizer = tokenizer
        hf = hf_tokenizer(tokenizer)
        backend = hf.backend_tokenizer
        decoder = json.loads(backend.to_str()).get("decoder")
        kinds = _decoder_kinds(decoder)
        self._byte_level = "ByteLevel" in kinds
        # Read once: the tokenizer builds this table anew on every access, and the event loop
        # looks tokens up while it streams.
        added = hf.added_tokens_decoder
        self._special_ids = set(hf.all_special_ids) | {i for i, t in added.items() if t.special}
        self._added_pieces = {i: t.content.encode() for i, t in added.items()}
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
        args = model.args
        # Vision checkpoints' text-only view keeps its sizes in ``text_config``.
        vocab_size = int(getattr(args, "vocab_size", None) or args.text_config["vocab_size"])
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
            load_config=self._load_config(),
        )

    def _kv_quantization(self, model: Any) -> int | None:
        """The quantization group size of a quantized KV cache (None: not quantized)."""
        bits = self.options.kv_cache_bits
        if not bits:
            return None
        if bits not in BITS:
            raise LoadOptionUnsupported(
                f"KV cache quantization takes {BITS} bits, not {bits}", "kv_cache_quantization"
            )
        if not all(type(c) is KVCache for c in make_prompt_cache(model)):
            raise LoadOptionUnsupported(
                "this model's cache (sliding window or state) cannot be quantized",
                "kv_cache_quantization",
            )
        # A vision model's mlx-lm wrapper keeps the text model's arguments on its language model.
        args = getattr(getattr(model, "language_model", None), "args", None) or model.args
        head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
        group = group_size_for(int(head_dim))
        if group is None:
            raise LoadOptionUnsupported(
                f"a head size of {head_dim} cannot be quantized in groups of 32",
                "kv_cache_quantization",
            )
        return group

    def _load_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"parallel": self.options.slots("mlx")}
        if self._kv_group is not None:
            config["kv_cache_quantization"] = {
                "bits": self.options.kv_cache_bits,
                "group_size": self._kv_group,
            }
        return config

    def tokenize(self, text: str) -> list[int]:
        return list(hf_tokenizer(self._tokenizer).encode(text, add_special_tokens=False))

    def token_bytes(self, token_id: int) -> bytes:
        piece = self._piece_cache.get(token_id)
        if piece is None:
            piece = self._piece(token_id)
            self._piece_cache[token_id] = piece
        return piece

    def _piece(self, token_id: int) -> bytes:
        if token_id in self._special_ids:
            return b""
        if token_id in self._added_pieces:
            return self._added_pieces[token_id]
        token = hf_tokenizer(self._tokenizer).convert_ids_to_tokens(token_id)
        if token is None:
            return b""
        if self._byte_level:
            if all(c in _BYTE_DECODER for c in token):
                return bytes(_BYTE_DECODER[c] for c in token)
            return token.encode()
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            return bytes([int(token[3:5], 16)])
        return token.replace("\u2581", " ").encode()

    def _new_batch(self) -> BatchGenerator:
        size = self.options.slots("mlx")
        return BatchGenerator(
            self._model,
            completion_batch_size=size,
            prefill_batch_size=size,
            prefill_step_size=self.options.prefill_chunk,
        )

    # --- continuous batching (owner thread) ---------------------------------------------

    def _running(self) -> int:
        """Sequences holding a place: in the batch, being spliced, or beside the batch."""
        return len(self._batched) + len(self._splices) + len(self._solo)

    def _start(self, job: Job) -> None:
        self._waiting.append(job)
        self._start_waiting()

    def _start_waiting(self) -> None:
        """Admit waiting requests, oldest first, while fewer than ``parallel`` run."""
        if any(job.cancelled for job in self._waiting):
            for job in [j for j in self._waiting if j.cancelled]:
                self._waiting.remove(job)
                job.finish("cancelled")
        while self._waiting and self._running() < self._slots:
            super()._start(self._waiting.popleft())

    def _admit(self, job: Job) -> None:
        request = job.request
        if self._speculates(request):
            self._solo.append((job, self._spec_steps(job)))
            return
        if request.sampling.seed is not None or not self._batchable:
            super()._admit(job)
            return
        prompt = list(request.prompt)
        reuse = None
        if self._key_shifts is not None:
            reuse = self._prompt_cache.plan(prompt, self.options.cache_reuse)
        cache, cached = self._prompt_cache.fetch(prompt)
        if self._spill is not None:
            spilled, n = self._spill.fetch(prompt, cached)
            if spilled is not None:
                cache, cached = spilled, n
        # An exact prefix as long as what moving runs would serve is taken instead.
        if reuse is not None and reuse.reused > cached:
            self._splices.append((job, Splice(prompt, reuse, self._key_shifts or [])))
            job.progress(reuse.prefix, len(prompt), reuse.reused)
            return
        if cache is None:
            cache = self._fresh_cache()
        self._join_batch(job, cache, cached, cached)

    def _join_batch(self, job: Job, cache: list[Any] | None, start: int, cached: int) -> None:
        """Put a request in the batch with ``cache`` holding its first ``start`` prompt
        positions (``cached`` of them not computed for it)."""
        request = job.request
        prompt = list(request.prompt)
        stops = [[t] for t in sorted(request.stop_token_ids)]
        segments = [prompt[start:]]
        cut = self._checkpoint_at(prompt)
        if start < cut:
            # BatchGenerator stops at a segment's end: the prompt checkpoint is taken there.
            segments = [prompt[start:cut], prompt[cut:]]
        (uid,) = self._batch.insert_segments(
            [segments],
            max_tokens=[request.max_tokens],
            caches=[cache] if cache is not None else None,
            all_tokens=[prompt[:start]],
            samplers=[self._sampler(request.sampling)],
            logits_processors=[self._processors(request)],
            stop_sequences=[StopSequences(stops or None)],
        )
        self._batched[uid] = (job, start, cached)
        self._prefill.queued(uid, len(prompt) - start)
        if self._prompt_cache.budget > 0:
            job.cache_written = len(prompt) - cached
        job.progress(start, len(prompt), cached)

    def busy(self) -> bool:
        return bool(self._solo) or bool(self._batched) or bool(self._splices) or bool(self._waiting)

    @property
    def prompt_cache_held_bytes(self) -> int:
        return self._prompt_cache.nbytes

    def step(self) -> None:
        self._start_waiting()
        if self._solo:
            self._step_solo()
        if self._splices:
            self._step_splice()
        if self._batched:
            try:
                self._step_batch()
            except Exception as exc:
                log.exception("batched generation failed on %s", self.path.name)
                self._fail_batch(exc)

    def abort(self, exc: BaseException) -> None:
        super().abort(exc)
        waiting, self._waiting = self._waiting, deque()
        for job in waiting:
            job.fail(exc)
        splices, self._splices = self._splices, []
        for job, _ in splices:
            job.fail(exc)
        self._fail_batch(exc)

    def _fail_batch(self, exc: BaseException) -> None:
        batched, self._batched = self._batched, {}
        self._prefill.clear()
        for job, *_ in batched.values():
            job.fail(exc)
        try:
            self._batch.close()
        finally:
            self._batch = self._new_batch()

    def _decoding(self) -> bool:
        """Whether any stream is decoding (prompt work then waits on it)."""
        return any(job.generated for job, *_ in self._batched.values()) or any(
            job.generated for job, _ in self._solo
        )

    def _step_splice(self) -> None:
        """One chunk of the oldest splice's gap tokens; a complete splice joins the batch."""
        job, splice = self._splices[0]
        if job.cancelled:
            self._splices.pop(0)
            job.finish("cancelled")
            return
        decoding = self._decoding()
        chunk = self.options.prefill_chunk
        try:
            done = splice.advance(
                self._model, chunk if decoding else max(chunk, IDLE_PREFILL_CHUNK)
            )
            if done:
                self._splices.pop(0)
                self._join_batch(job, splice.cache, splice.filled, splice.reuse.reused)
            else:
                job.progress(splice.filled, len(job.request.prompt), splice.reuse.reused)
        except Exception as exc:
            log.exception("reusing the prompt cache failed on %s", self.path.name)
            if self._splices and self._splices[0][0] is job:
                self._splices.pop(0)
            job.fail(exc)

    def _step_batch(self) -> None:
        gone = [uid for uid, (job, *_) in self._batched.items() if job.cancelled]
        if gone:
            self._batch.remove(gone)
            for uid in gone:
                self._batched.pop(uid)[0].finish("cancelled")
            if not self._batched:
                return
        self._prefill.apply(self._batch, self._decoding(), self._batched)
        prompt_responses, responses = self._batch.next()
        self._prefill.stepped(prompt_responses)
        for pr in prompt_responses:
            entry = self._batched.get(pr.uid)
            if entry is not None:
                job, start, cached = entry
                job.progress(pr.progress[0] + start, pr.progress[1] + start, cached)
        if self._checkpoints and self._prompt_cache.budget > 0:
            self._checkpoint_prompts(prompt_responses)
        wanted = [
            (r.logprobs, r.token, job.request.logprobs)
            for r in responses
            if (entry := self._batched.get(r.uid)) is not None
            and (job := entry[0]).request.logprobs is not None
        ]
        computed = iter(_logprobs(wanted) if wanted else [])
        for r in responses:
            entry = self._batched.get(r.uid)
            if entry is None:
                continue
            job = entry[0]
            lp = next(computed) if job.request.logprobs is not None else None
            self.batched_tokens += 1
            done = self._accept(job, r.token, lp)
            if r.finish_reason is None and not done:
                continue
            del self._batched[r.uid]
            job.finish("stop" if r.finish_reason == "stop" else "length")
            cache, tokens = r.prompt_cache, r.all_tokens
            if r.finish_reason is None:
                cache, tokens = self._batch.remove([r.uid], return_prompt_caches=True)[r.uid]
            if cache is not None and tokens is not None:
                self._prompt_cache.store(self._cache_key(job, tokens), cache)

    def _cache_key(self, job: Job, tokens: list[int]) -> list[int]:
        """The prompt-cache key of a batched request's cache holding ``tokens`` (a vision
        engine puts its images' marks in place of their placeholder tokens)."""
        return tokens

    def _checkpoint_at(self, prompt: list[int]) -> int:
        """Where the prompt checkpoint of a model whose cache cannot be cut back is taken (0:
        none): the next turn's prompt extends this prompt but for its generation prompt,
        while the reply may come back re-rendered."""
        if not self._checkpoints or self._prompt_cache.budget <= 0:
            return 0
        return max(0, len(prompt) - CHECKPOINT_TAIL)

    def _checkpoint_prompts(self, prompt_responses: list[Any]) -> None:
        """Keep the caches of requests whose prompt was just processed up to its checkpoint
        (the end of its first segment, see :meth:`_join_batch`). Between two steps the
        prompt batch holds exactly that state; the snapshot is a copy, taken before the
        batch moves on."""
        ended = [
            pr.uid
            for pr in prompt_responses
            if pr.end_of_segment and not pr.end_of_prompt and pr.uid in self._batched
        ]
        if not ended:
            return
        for uid, (cache, tokens) in self._batch.extract_cache(ended).items():
            job = self._batched[uid][0]
            if len(tokens) == self._checkpoint_at(list(job.request.prompt)):
                self._prompt_cache.store(self._cache_key(job, tokens), cache)

    def _unload(self) -> None:
        self._batch.close()
        if self._spill is not None:
            for tokens, cache in self._prompt_cache.entries():
                self._spill.save(tokens, cache)
            self._spill.close()
        self._prompt_cache.clear()
        self._drafts.clear()
        del self._batch, self._prompt_cache, self._model
        release_thread_memory()
