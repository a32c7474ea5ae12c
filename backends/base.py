"""The backend interface: the one seam between the dialect-neutral core and an inference engine.

An engine owns one thread (the "owner thread"). Every call into the inference library
(loading, prompt processing, sampling) happens on that thread; the event loop only
enqueues work and reads results from a :class:`TokenStream`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from backends.owner import OwnerThread
from backends.stream import (
    DraftStats,
    EngineError,
    Finished,
    PromptProgress,
    Relay,
    Sampled,
    Token,
    TokenLogprobs,
    TokenStream,
)

if TYPE_CHECKING:
    from backends.constraint import GrammarCache, GrammarConstraint

log = logging.getLogger("mlxserve.backends")

T = TypeVar("T")

# How many recent tokens repetition, presence and frequency penalties look at, on both backends.
PENALTY_WINDOW = 64

# Where a model whose cache cannot be cut back keeps its prompt checkpoint: this many tokens
# before the prompt's end, so that it holds none of the generation prompt, which the next
# turn's history may render differently (a thinking template's "<think>" opener, harmony's
# channel); mlx-lm's server and LM Studio's MLX engine use the same margin.
CHECKPOINT_TAIL = 11


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """How many leading tokens ``a`` and ``b`` share, at most ``limit`` (both prompt caches)."""
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings a request may set; both backends honour all of them."""

    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """What an engine generates: prompt token ids in, sampled token ids out."""

    prompt: tuple[int, ...]
    sampling: SamplingParams
    max_tokens: int
    stop_token_ids: frozenset[int] = frozenset()
    # Constrained decoding: only tokens this grammar allows are sampled.
    constraint: GrammarConstraint | None = None
    # Log probabilities: None computes none; n reports the sampled token's and the n most
    # likely tokens' (see :class:`TokenLogprobs`).
    logprobs: int | None = None
    # Speculative decoding: the draft model's folder (see Engine.prepare_draft) and how many
    # tokens it proposes per step.
    draft: Path | None = None
    num_draft_tokens: int = 3
    # Images: the ``payload`` of the engine's :meth:`Engine.prepare_vision` for this prompt.
    vision: Any = None


@dataclass(frozen=True)
class VisionPrompt:
    """A prompt with images, as a vision engine prepared it: the token ids with each image's
    placeholder expanded to the positions it takes, an engine-specific payload (pixel
    values...) for :attr:`GenerationRequest.vision`, and how many of the tokens are image
    tokens."""

    tokens: tuple[int, ...]
    payload: Any
    image_tokens: int


# GGUF sequences decoded in parallel by default, at most (they share one pool of KV cells).
GGUF_MAX_PARALLEL = 4
# Sequence ids a llama.cpp context takes (its LLAMA_MAX_SEQ, llama_max_parallel_sequences()).
GGUF_MAX_SEQUENCES = 256

# llama.cpp KV-cache types a load may name: ggml type id and bits per element.
GGML_CACHE_TYPES = {
    "f32": 0,
    "f16": 1,
    "q4_0": 2,
    "q4_1": 3,
    "q5_0": 6,
    "q5_1": 7,
    "q8_0": 8,
    "iq4_nl": 20,
}
GGML_CACHE_BITS = {
    "f32": 32.0,
    "f16": 16.0,
    "q4_0": 4.5,
    "q4_1": 5.0,
    "q5_0": 5.5,
    "q5_1": 6.0,
    "q8_0": 8.5,
    "iq4_nl": 4.5,
}


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model. ``context_length`` is the window the instance serves."""

    context_length: int
    # Keep the KV cache in 32-bit floats: right for f32 weights, where MLX computes (and
    # caches) in f32 too, so both formats give the same logits.
    kv_cache_f32: bool = False
    # LM Studio's llama.cpp load options (None: the engine's default). Engines that have no
    # such setting ignore them and leave them out of ``EngineInfo.load_config``.
    eval_batch_size: int | None = None
    flash_attention: bool | None = None
    offload_kv_cache_to_gpu: bool | None = None
    # Experts used per token, for mixture-of-experts models.
    num_experts: int | None = None
    # Sequences decoded together in one batch; more requests wait for a free place.
    max_batch_size: int = 8
    # The instance's own number of parallel sequences (LM Studio's ``parallel``), set at
    # load; None takes ``max_batch_size`` (GGUF: at most GGUF_MAX_PARALLEL).
    parallel: int | None = None
    # Prompt tokens processed per step while other requests decode.
    prefill_chunk: int = 512
    # Memory the prompt cache (KV of finished requests, for prefix reuse) may add; 0 turns
    # it off. MLX: its entries beside the batch. GGUF: kept requests parked in host memory
    # (those kept in the context's own cells, which llama.cpp reserved at load, are bounded
    # by the context, not by this).
    prompt_cache_bytes: int = 1 << 30
    # GGUF: the guardrail's cut of that host memory when less is free (None: not cut). A cut
    # to 0 parks nothing in host memory but, unlike ``prompt_cache_bytes`` 0, still keeps
    # requests in the context's cells for reuse.
    host_cache_bytes: int | None = None
    # Where prompt-cache entries are spilled to disk (``<home>/prompt-cache``; None: never)
    # and how many bytes all models' files there may take together.
    prompt_cache_dir: Path | None = None
    prompt_cache_disk_bytes: int = 0
    # Shortest run of matching tokens past the first difference that the prompt cache moves
    # to its new position instead of computing it again; 0: exact prefix reuse only.
    cache_reuse: int = 0
    # KV-cache quantization. MLX: bits per element (mlx.quantize; 2, 3, 4, 6 or 8). GGUF:
    # llama.cpp cache types for K and V by name ("f16", "q8_0", "q4_0", ...).
    kv_cache_bits: int | None = None
    # The key of the instance's default draft model (speculative decoding): reported in
    # ``load_config`` and resolved by the core per request; engines load it on first use.
    draft_model: str | None = None
    cache_type_k: str | None = None
    cache_type_v: str | None = None
    # Context windows of KV cells a GGUF context reserves for its parallel sequences (at most
    # ``slots``): 1 is one pool they share, preempting a sequence when it runs out.
    reserved_windows: int = 1

    def slots(self, fmt: str) -> int:
        """Requests a model of format ``fmt`` decodes at once."""
        if self.parallel is not None:
            return max(1, self.parallel)
        if fmt == "gguf":
            return max(1, min(self.max_batch_size, GGUF_MAX_PARALLEL))
        return max(1, self.max_batch_size)

    def kv_element_bits(self, fmt: str) -> float:
        """Bits one cached K or V element takes, quantization scales included (an MLX group
        of 64 adds a scale and a bias in the model's dtype; llama.cpp's blocks of 32 add a
        16-bit scale)."""
        if fmt == "mlx" and self.kv_cache_bits:
            return self.kv_cache_bits + (1.0 if self.kv_cache_f32 else 0.5)
        plain = 32.0 if self.kv_cache_f32 else 16.0
        if fmt == "gguf" and (self.cache_type_k or self.cache_type_v):
            k = GGML_CACHE_BITS.get(self.cache_type_k or "", plain)
            v = GGML_CACHE_BITS.get(self.cache_type_v or "", plain)
            return (k + v) / 2
        return plain

    def sequence_ids(self, fmt: str, recurrent: bool) -> int:
        """Sequence ids a GGUF context keeps (0 on MLX): per parallel slot one runs a request
        and one keeps a finished one for prefix reuse; with recurrent memory (reused only
        whole) a third keeps its prompt checkpoint. llama.cpp gives each one a recurrent
        state; it takes at most GGUF_MAX_SEQUENCES."""
        if fmt != "gguf":
            return 0
        return min((3 if recurrent else 2) * self.slots(fmt), GGUF_MAX_SEQUENCES)

    def kv_windows(self, fmt: str) -> int:
        """Context windows of KV cache a model of format ``fmt`` can come to hold: a GGUF
        context reserves ``reserved_windows`` at load (one pool its parallel sequences share
        by default, at most one per sequence); MLX's batch grows one per running sequence."""
        if fmt != "gguf":
            return self.slots(fmt)
        return max(1, min(self.reserved_windows, self.slots(fmt)))


@dataclass(frozen=True)
class EngineInfo:
    """What the core needs to know about a loaded model."""

    format: Literal["mlx", "gguf"]
    context_length: int
    eos_token_ids: frozenset[int]
    # Prepended to raw-text prompts when the model's tokenizer adds it by default.
    bos_token_id: int | None
    bos_token: str
    eos_token: str
    chat_template: str | None
    # SentencePiece-style vocabularies encode a leading space on the first word.
    strip_leading_space: bool = False
    # The load options (beyond the context length) this engine applied, as LM Studio names
    # them: what ``load_config`` reports.
    load_config: dict[str, Any] = field(default_factory=dict)
    # Takes images (see :meth:`Engine.prepare_vision`), scaled down beforehand to at most
    # ``image_max_pixels`` (the model's largest supported resolution).
    vision: bool = False
    image_max_pixels: int | None = None
    # Engines that take images as a marker in the prompt text (llama.cpp mtmd): image parts
    # are rendered as this text; None: the chat template renders image parts itself.
    image_marker: str | None = None


class LoadOptionUnsupported(ValueError):
    """A load option this model cannot take (a client error, not a failed load): ``param``
    names the option."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class DraftUnsupported(Exception):
    """This engine has no speculative decoding."""


class Job:
    """One request on the owner thread: applies stop tokens and ``max_tokens`` to what the
    engine samples, and ends the request's stream exactly once."""

    def __init__(
        self, request: GenerationRequest, stream: TokenStream, release: Callable[[], None]
    ) -> None:
        self.request = request
        self.stream = stream
        self._release = release
        self.generated = 0
        self.done = False
        self.draft: DraftStats | None = None
        # Set at admission by an engine that will keep this prompt in its prompt cache.
        self.cache_written = 0

    @property
    def cancelled(self) -> bool:
        return self.stream.cancelled

    def progress(self, processed: int, total: int, cached: int = 0) -> None:
        if 0 < processed < total:
            self.stream.put(PromptProgress(processed, total, cached))

    def accept(self, token: int, logprobs: TokenLogprobs | None = None) -> bool:
        """Take a sampled token; True when the request is finished."""
        self.generated += 1
        if token in self.request.stop_token_ids:
            self.finish("stop")
            return True
        self.stream.put(Token(token, logprobs))
        if self.generated >= self.request.max_tokens:
            self.finish("length")
        return self.done

    def finish(self, reason: Literal["stop", "length", "cancelled"]) -> None:
        if not self.done:
            self.done = True
            # Released first: whoever sees the end of the stream sees the engine free too.
            self._release()
            self.stream.put(Finished(reason, self.generated, self.draft, self.cache_written))

    def fail(self, exc: BaseException) -> None:
        if not self.done:
            self.done = True
            self._release()
            self.stream.put(EngineError(f"{type(exc).__name__}: {exc}"))


class Engine(ABC):
    """One loaded model. Subclasses implement :meth:`_load`, :meth:`_steps` and the tokenizer.

    Requests run interleaved on the owner thread: each owner-thread step advances every
    running request by one token. By default each request runs its own :meth:`_steps`
    generator; engines that batch override :meth:`_admit`, :meth:`busy` and :meth:`step`.
    """

    format: Literal["mlx", "gguf"]
    # Set by ``_load``: the engine's llguidance tokenizer and compiled grammars.
    grammars: GrammarCache

    def __init__(self, path: Path, options: LoadOptions, *, max_queue: int = 64) -> None:
        self.path = path
        self.options = options
        self.generated_tokens = 0
        # Of them, tokens sampled in a forward pass shared by a batch of requests.
        self.batched_tokens = 0
        # Times a running request was preempted to make room (GGUF: its KV cells moved to
        # host memory while the shared pool was full; it resumed where it stopped).
        self.preempted = 0
        # The relay of the event loop requests come from (see :meth:`relayed`).
        self._relay: Relay | None = None
        self._setup()
        self._owner = OwnerThread(f"engine:{path.name}", max_queue, pump=self)
        try:
            self.info: EngineInfo = self._owner.call(self._load).result()
        except BaseException:
            self._owner.close()  # a failed load must not leave its owner thread behind
            raise

    # --- to implement -------------------------------------------------------------------

    def _setup(self) -> None:
        """Initialise scheduling state before the owner thread starts (no library calls);
        overrides call this first."""
        self._solo: list[tuple[Job, Generator[Sampled | PromptProgress, None, None]]] = []

    @abstractmethod
    def _load(self) -> EngineInfo:
        """Load the model (on the owner thread) and describe it."""

    def _steps(
        self, request: GenerationRequest, stream: TokenStream
    ) -> Generator[Sampled | PromptProgress, None, None]:
        """Process the prompt, then yield sampled token ids forever (the caller stops it),
        each with its log probabilities when the request asked for them.

        Called on the owner thread by the default :meth:`_admit`; engines that schedule
        requests themselves may leave it out. Between prompt chunks it yields
        :class:`PromptProgress` so that a cancelled request is dropped before its prompt is
        fully processed.
        """
        raise NotImplementedError(f"{type(self).__name__} schedules its requests itself")

    def prepare_draft(self, path: Path) -> None:
        """Load (once) the draft model at ``path`` for speculative decoding, on the owner
        thread; ValueError if it cannot draft for this model (another vocabulary)."""
        raise DraftUnsupported(f"speculative decoding is not available for {self.format} models")

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``, special tokens parsed, no BOS added. Thread-safe."""

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (empty for control tokens). Thread-safe."""

    def prepare_vision(self, text: str, images: list[Any]) -> VisionPrompt:
        """Tokenize a rendered prompt holding image placeholders, with its decoded (RGB PIL)
        images in order. Thread-safe; only engines whose ``info.vision`` is set."""
        raise NotImplementedError(f"{type(self).__name__} takes no images")

    @abstractmethod
    def _unload(self) -> None:
        """Free the model's memory (on the owner thread)."""

    # --- shared machinery ---------------------------------------------------------------

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` on the owner thread."""
        return self._owner.call(fn)

    def submit(self, request: GenerationRequest) -> TokenStream:
        """Queue a generation; its tokens arrive on the returned stream."""
        loop = asyncio.get_running_loop()
        relay = self._relay
        if relay is None or relay.loop is not loop:
            relay = self._relay = Relay(loop)
        stream = TokenStream(loop, relay)
        job = Job(request, stream, self._owner.reserve())
        self._owner.call(lambda: self._start(job))
        return stream

    @property
    def pending(self) -> int:
        """Requests queued or running."""
        return self._owner.pending

    @property
    @abstractmethod
    def prompt_cache_held_bytes(self) -> int:
        """Bytes the prompt cache holds now beside the KV windows reserved at load (read from
        any thread: a count the owner thread keeps)."""

    def close(self) -> None:
        """Stop the owner thread after the queued and running work, and free the model."""
        self._owner.close(self._unload)

    # --- scheduling (owner thread) ------------------------------------------------------

    def _start(self, job: Job) -> None:
        if job.cancelled:
            job.finish("cancelled")
            return
        try:
            self._admit(job)
        except Exception as exc:
            log.exception("admitting a request failed on %s", self.path.name)
            job.fail(exc)

    def _admit(self, job: Job) -> None:
        """Take a request in; it starts at the next step."""
        self._solo.append((job, self._steps(job.request, job.stream)))

    def busy(self) -> bool:
        """Whether requests are running (the owner thread then keeps calling :meth:`step`)."""
        return bool(self._solo)

    def step(self) -> None:
        """Advance every running request by one token."""
        self._step_solo()

    def abort(self, exc: BaseException) -> None:
        """Fail every request this engine holds and reset its scheduling state: the owner
        thread calls it when :meth:`step` raised. Overrides call this too."""
        solo, self._solo = self._solo, []
        for job, steps in solo:
            job.fail(exc)
            try:
                steps.close()
            except Exception:
                log.exception("closing a request failed on %s", self.path.name)

    def relayed(self) -> contextlib.AbstractContextManager[None]:
        """On the owner thread, around a step's tokens for all its streams: they reach the
        event loop in one wake-up when the step's puts are done."""
        relay = self._relay
        return relay.hold() if relay is not None else contextlib.nullcontext()

    def _accept(self, job: Job, token: int, logprobs: TokenLogprobs | None = None) -> bool:
        self.generated_tokens += 1
        return job.accept(token, logprobs)

    def _step_solo(self) -> None:
        for entry in list(self._solo):
            job, steps = entry
            try:
                if job.cancelled:
                    job.finish("cancelled")
                else:
                    item = next(steps, None)
                    if item is None:
                        job.finish("cancelled" if job.cancelled else "length")
                    elif isinstance(item, PromptProgress):
                        job.stream.put(item)
                    elif isinstance(item, int):
                        self._accept(job, item)
                    else:
                        self._accept(job, *item)
            except Exception as exc:
                log.exception("generation failed on %s", self.path.name)
                job.fail(exc)
            if job.done:
                steps.close()
                self._solo.remove(entry)
