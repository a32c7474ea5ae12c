"""Loaded model instances and their lifecycle, with LM Studio's semantics.

- **JIT:** an inference request naming a downloaded model loads it; concurrent first
  requests for one model share one load.
- **TTL:** a model loaded just in time is unloaded after ``ttl`` idle seconds (a request's
  ``ttl``, else the default); explicitly loaded models only if they were loaded with one.
- **Auto-evict:** loading a model just in time first unloads the earlier JIT loads of the
  same kind (text or embedding); explicitly loaded models are never evicted.
- **Never under a request:** a request holds its instance from resolution until its work is
  queued on the engine, and an engine closes only after its queued work; unloading waits.
- **Guardrail:** a load whose estimated memory exceeds what is free is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from backends import open_embedding_engine, open_engine
from backends.base import Engine, LoadOptions
from backends.embedding import EmbeddingEngine
from mlxserve.core import memory
from mlxserve.core.metrics import LifecycleObserver, ModelMeter
from mlxserve.core.registry import ModelInfo, Registry
from mlxserve.core.templates import ChatTemplate, TemplateError
from mlxserve.errors import (
    InstanceNotFound,
    InvalidRequest,
    ModelLoadFailed,
    ModelNotFound,
    ModelNotLoaded,
)
from mlxserve.settings import Settings

if TYPE_CHECKING:
    from backends.mlx.distributed import DistributedGroup

log = logging.getLogger("mlxserve.manager")

T = TypeVar("T")

# While a model that has a TTL is busy, how often the reaper looks at it again (seconds).
BUSY_RECHECK_SECONDS = 1.0
_IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,255}$")


@dataclass(frozen=True)
class LoadRequest:
    """How to load a model: LM Studio's load options (None: the default). The llama.cpp-only
    ones are ignored for MLX models and for embedding models."""

    context_length: int | None = None
    eval_batch_size: int | None = None
    flash_attention: bool | None = None
    offload_kv_cache_to_gpu: bool | None = None
    num_experts: int | None = None
    # The instance id to give it (LM Studio's ``--identifier``); default: the key, then key:2...
    identifier: str | None = None
    ttl: float | None = None


@dataclass(kw_only=True)
class Residency:
    """How an instance stays loaded: who loaded it, its idle TTL, and who is using it."""

    jit: bool = False
    ttl: float | None = None
    # What it was loaded with, as LM Studio reports it (``load_config``).
    load_config: dict[str, Any] = field(default_factory=dict)
    memory_bytes: int = 0
    last_used: float = 0.0
    # Seen busy by the TTL task since it last counted idle time.
    busy_seen: bool = False
    holds: int = 0
    released: asyncio.Event = field(default_factory=asyncio.Event)
    # Where its generations report tokens and latencies (set when an observer is attached).
    meter: ModelMeter | None = None


@dataclass
class Instance(Residency):
    """A model loaded in memory and ready to serve."""

    id: str
    info: ModelInfo
    engine: Engine
    template: ChatTemplate
    loaded_at: float
    load_seconds: float

    @property
    def context_length(self) -> int:
        return self.engine.info.context_length


@dataclass
class EmbeddingInstance(Residency):
    """An embedding model loaded in memory and ready to serve."""

    id: str
    info: ModelInfo
    engine: EmbeddingEngine
    loaded_at: float
    load_seconds: float

    @property
    def context_length(self) -> int:
        return self.engine.info.context_length


Loaded = Instance | EmbeddingInstance


def _not_a_text_model(key: str) -> InvalidRequest:
    return InvalidRequest(
        f"Model '{key}' is an embedding model and cannot generate text; "
        "use POST /v1/embeddings with it.",
        param="model",
    )


def _not_an_embedding_model(key: str) -> InvalidRequest:
    return InvalidRequest(
        f"Model '{key}' is a text-generation model, not an embedding model; "
        "it cannot make embeddings.",
        param="model",
    )


def _close_engine(engine: Engine | EmbeddingEngine) -> None:
    """Close after the queued work, then collect what pointed at the weights (the MLX engine
    clears its buffer cache on its owner thread; llama.cpp frees its context in close)."""
    engine.close()
    gc.collect()
    memory.give_back_freed_memory()


class ModelManager:
    """Owns every loaded engine and decides when each is loaded and unloaded."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        *,
        clock: Callable[[], float] = time.monotonic,
        observer: LifecycleObserver | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self._clock = clock
        # Told of every load and unload (the metrics registry).
        self.observer = observer
        self._instances: dict[str, Instance] = {}
        self._embedders: dict[str, EmbeddingInstance] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # Serializes evict-then-load, so that two JIT loads cannot both keep their model.
        self._evict_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._reaper: asyncio.Task[None] | None = None
        # Loads and unloads that finish even if whoever asked for them has gone.
        self._background: set[asyncio.Future[Any]] = set()
        # Set by ``serve --distributed``: text models load sharded across this group's ranks.
        self.distributed: DistributedGroup | None = None

    # --- what is loaded -----------------------------------------------------------------

    def loaded(self) -> list[Instance]:
        return list(self._instances.values())

    def loaded_embedders(self) -> list[EmbeddingInstance]:
        return list(self._embedders.values())

    def _all(self) -> list[Loaded]:
        return [*self._instances.values(), *self._embedders.values()]

    def instances_of(self, key: str) -> list[Loaded]:
        """The loaded instances of the model ``key``, oldest first."""
        return [i for i in self._all() if i.info.key == key]

    def next_instance_id(self, key: str) -> str:
        """The id a new instance of ``key`` gets: the key, then ``key:2``, ``key:3``..."""
        taken = set(self._instances) | set(self._embedders)
        instance_id, n = key, 1
        while instance_id in taken:
            n += 1
            instance_id = f"{key}:{n}"
        return instance_id

    def find_model(self, model: str) -> ModelInfo:
        """The downloaded model a request names: its key, or its folder name when unique."""
        if not model or len(model) > 512:
            raise ModelNotFound(model[:64])
        if "/" in model:
            info = self.registry.get(model)
            if info is None:
                raise ModelNotFound(model)
            return info
        matches = [m for m in self.registry.scan() if m.name == model]
        if len(matches) != 1:
            raise ModelNotFound(model)
        return matches[0]

    # --- using a model ------------------------------------------------------------------

    def resolve(self, model: str) -> Instance | ModelInfo:
        """The loaded instance serving ``model`` (an instance id or a model key), or the model
        to load for it. Raises when it names nothing, or a model that may not be loaded now."""
        instance = self._instances.get(model)
        if instance is not None:
            return instance
        if model in self._embedders:
            raise _not_a_text_model(self._embedders[model].info.key)
        info = self.find_model(model)
        if info.type != "llm":
            raise _not_a_text_model(info.key)
        candidates = [i for i in self._instances.values() if i.info.key == info.key]
        if candidates:
            return min(candidates, key=lambda i: i.engine.pending)
        if not self.settings.jit_loading:
            raise ModelNotLoaded(
                f"Model '{info.key}' is not loaded and just-in-time loading is off; load it "
                "first (POST /api/v1/models/load).",
                param="model",
            )
        return info

    async def get(self, model: str, *, ttl: float | None = None) -> Instance:
        """The instance serving ``model``, loading it if allowed. Hold it (:meth:`holding`)
        across any await before its work reaches the engine."""
        instance, _ = await self._acquire(model, ttl, None)
        self._release(instance)
        return instance

    @contextlib.asynccontextmanager
    async def use(
        self, model: str, *, ttl: float | None = None, context_length: int | None = None
    ) -> AsyncIterator[tuple[Instance, float | None]]:
        """Hold the instance serving ``model`` (loading it if allowed, with ``context_length``)
        for the block; yields it and the load time if this call loaded it."""
        instance, load_seconds = await self._acquire(model, ttl, context_length)
        try:
            yield instance, load_seconds
        finally:
            self._release(instance)

    @contextlib.contextmanager
    def holding(self, instance: Loaded) -> Iterator[None]:
        """Keep ``instance`` loaded for the block: unloading it waits until the block ends."""
        self._hold(instance)
        try:
            yield
        finally:
            self._release(instance)

    def _hold(self, instance: Loaded) -> None:
        instance.holds += 1
        instance.released.clear()

    def _release(self, instance: Loaded) -> None:
        instance.holds -= 1
        instance.last_used = self._clock()
        if not instance.holds:
            instance.released.set()

    async def _acquire(
        self, model: str, ttl: float | None, context_length: int | None
    ) -> tuple[Instance, float | None]:
        """The instance serving ``model``, returned held: the caller releases it."""
        found = self.resolve(model)
        if isinstance(found, Instance):
            self._touch(found, ttl)
            self._hold(found)
            return found, None
        instance, load_seconds = await self._jit(found, ttl, LoadRequest(context_length))
        assert isinstance(instance, Instance)
        return instance, load_seconds

    def _touch(self, instance: Loaded, ttl: float | None) -> None:
        instance.last_used = self._clock()
        if ttl is not None and instance.jit:
            instance.ttl = ttl
            self._wake.set()

    async def get_embedder(self, model: str, *, ttl: float | None = None) -> EmbeddingInstance:
        """The embedding instance serving ``model`` (an instance id or a model key), loading
        it if allowed."""
        embedder = self._embedders.get(model)
        if embedder is None:
            if model in self._instances:
                raise _not_an_embedding_model(self._instances[model].info.key)
            info = self.find_model(model)
            if info.type != "embedding":
                raise _not_an_embedding_model(info.key)
            candidates = [e for e in self._embedders.values() if e.info.key == info.key]
            if candidates:
                embedder = min(candidates, key=lambda e: e.engine.pending)
            elif not self.settings.jit_loading:
                raise ModelNotLoaded(
                    f"Model '{info.key}' is not loaded and just-in-time loading is off; load "
                    "it first (POST /api/v1/models/load).",
                    param="model",
                )
            else:
                loaded, _ = await self._jit(info, ttl, LoadRequest())
                assert isinstance(loaded, EmbeddingInstance)
                self._release(loaded)
                return loaded
        self._touch(embedder, ttl)
        return embedder

    # --- loading ------------------------------------------------------------------------

    async def _shielded(self, work: Awaitable[T], orphaned: Callable[[T], None] | None = None) -> T:
        """Run ``work`` to its end even if the caller is cancelled (a client leaving mid-load
        must not leave an engine loaded but unregistered, or unregistered but not closed);
        ``orphaned`` then gets its result."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:

            def settle(done: asyncio.Future[T]) -> None:
                if not done.cancelled() and done.exception() is None and orphaned is not None:
                    orphaned(done.result())

            task.add_done_callback(settle)
            raise

    async def _jit(
        self, info: ModelInfo, ttl: float | None, request: LoadRequest
    ) -> tuple[Loaded, float | None]:
        """Load ``info`` just in time (or find it loaded meanwhile); returned held."""
        return await self._shielded(
            self._jit_locked(info, ttl, request), lambda result: self._release(result[0])
        )

    async def _jit_locked(
        self, info: ModelInfo, ttl: float | None, request: LoadRequest
    ) -> tuple[Loaded, float | None]:
        lock = self._locks.setdefault(info.key, asyncio.Lock())
        async with lock:
            # A concurrent first request may have loaded it while this one waited.
            existing = self.instances_of(info.key)
            if existing:
                self._touch(existing[0], ttl)
                self._hold(existing[0])
                return existing[0], None
            if ttl is None and self.settings.ttl_seconds > 0:
                ttl = self.settings.ttl_seconds
            async with self._evict_lock:
                victims: list[Loaded] = []
                if self.settings.auto_evict:
                    victims = [i for i in self._all() if i.jit and i.info.type == info.type]
                instance = await self._open(info, request, jit=True, ttl=ttl, victims=victims)
                # Held before anything else can run: a JIT load waiting for the evict lock
                # must not evict it before its requester has used it.
                self._hold(instance)
            return instance, instance.load_seconds

    async def load_any(
        self, info: ModelInfo, request: LoadRequest | None = None, *, reuse: bool = False
    ) -> Loaded:
        """Load ``info`` (text or embedding model) explicitly, as ``POST /api/v1/models/load``
        does: each call makes a new instance unless ``reuse``."""
        request = request or LoadRequest()
        if request.identifier is not None:
            self._check_identifier(info, request.identifier)
        return await self._shielded(self._load_locked(info, request, reuse))

    async def _load_locked(self, info: ModelInfo, request: LoadRequest, reuse: bool) -> Loaded:
        lock = self._locks.setdefault(info.key, asyncio.Lock())
        async with lock:
            existing = self.instances_of(info.key)
            if reuse and existing:
                return existing[0]
            if request.identifier is not None:
                self._check_identifier(info, request.identifier)
            return await self._open(info, request, jit=False, ttl=request.ttl, victims=[])

    def _check_identifier(self, info: ModelInfo, identifier: str) -> None:
        if not _IDENTIFIER.match(identifier):
            raise InvalidRequest(
                "identifier must be 1-256 letters, digits and . _ : / @ - characters, "
                "starting with a letter or digit.",
                param="identifier",
            )
        if identifier in self._instances or identifier in self._embedders:
            raise InvalidRequest(
                f"A loaded instance already has the identifier '{identifier}'; unload it or "
                "choose another.",
                param="identifier",
            )
        other = self.registry.get(identifier) if "/" in identifier else None
        if other is not None and other.key != info.key:
            raise InvalidRequest(
                f"The identifier '{identifier}' is another model's key.", param="identifier"
            )

    def _options(self, info: ModelInfo, request: LoadRequest) -> LoadOptions:
        context_length = min(
            request.context_length or self.settings.default_context_length,
            info.max_context_length,
        )
        if info.type == "embedding":
            return LoadOptions(context_length=context_length)
        return LoadOptions(
            context_length=context_length,
            kv_cache_f32=info.quantization == "F32",
            eval_batch_size=request.eval_batch_size,
            flash_attention=request.flash_attention,
            offload_kv_cache_to_gpu=request.offload_kv_cache_to_gpu,
            num_experts=request.num_experts,
            max_batch_size=self.settings.max_batch_size,
            prefill_chunk=self.settings.prefill_chunk,
            prompt_cache_bytes=self.settings.prompt_cache_bytes,
        )

    async def _guard(
        self, info: ModelInfo, options: LoadOptions, victims: list[Loaded]
    ) -> memory.Estimate:
        """Refuse a load that would not fit; ``victims`` are about to be unloaded first."""
        need = await asyncio.to_thread(
            memory.estimate,
            info,
            options.context_length,
            kv_f32=options.kv_cache_f32,
            windows=options.kv_windows(info.format),
        )
        if self.settings.load_guardrail:
            in_use = sum(i.memory_bytes for i in self._all())
            freed = sum(v.memory_bytes for v in victims)
            limit = self.settings.guardrail_memory_gb
            available = await asyncio.to_thread(memory.budget, limit, in_use, freed)
            memory.check_fits(info.key, need, available)
        return need

    async def _open(
        self,
        info: ModelInfo,
        request: LoadRequest,
        *,
        jit: bool,
        ttl: float | None,
        victims: list[Loaded],
    ) -> Loaded:
        options = self._options(info, request)
        if self.distributed is not None:
            self._check_distributed(info, victims)
        need = await self._guard(info, options, victims)
        for victim in victims:
            await self._retire(victim, "auto-evicted for a just-in-time load")
        started = time.perf_counter()
        log.info("loading %s (%s, context %d)", info.key, info.format, options.context_length)
        try:
            if info.type == "embedding":
                engine: Engine | EmbeddingEngine = await asyncio.to_thread(
                    open_embedding_engine,
                    info.format,
                    info.weights,
                    options,
                    max_queue=self.settings.max_queue_per_model,
                )
            else:
                engine = await asyncio.to_thread(
                    open_engine,
                    info.format,
                    info.weights,
                    options,
                    max_queue=self.settings.max_queue_per_model,
                    distributed=self.distributed,
                )
        except Exception as exc:
            log.exception("loading %s failed", info.key)
            if self.observer is not None:
                self.observer.load_failed(info.key)
            # Whatever the failed load allocated is garbage now: give it back.
            await asyncio.to_thread(gc.collect)
            # The exception text may hold the file's absolute path: it stays in the log.
            raise ModelLoadFailed(
                f"Model '{info.key}' failed to load ({type(exc).__name__}); the server log "
                "has the details."
            ) from exc
        elapsed = time.perf_counter() - started
        instance_id = request.identifier or self.next_instance_id(info.key)
        residency: dict[str, Any] = {
            "jit": jit,
            "ttl": ttl,
            "memory_bytes": need.total,
            "last_used": self._clock(),
        }
        loaded: Loaded
        if isinstance(engine, EmbeddingEngine):
            loaded = EmbeddingInstance(
                id=instance_id,
                info=info,
                engine=engine,
                loaded_at=time.time(),
                load_seconds=elapsed,
                load_config={"context_length": engine.info.context_length},
                **residency,
            )
            self._embedders[instance_id] = loaded
        else:
            loaded = Instance(
                id=instance_id,
                info=info,
                engine=engine,
                template=self._template(info, engine),
                loaded_at=time.time(),
                load_seconds=elapsed,
                load_config={"context_length": engine.info.context_length}
                | engine.info.load_config,
                **residency,
            )
            self._instances[instance_id] = loaded
        if ttl is not None:
            self._wake.set()
        if self.observer is not None:
            loaded.meter = self.observer.loaded(
                instance_id,
                seconds=elapsed,
                memory_bytes=need.total,
                kv_cache_bytes=need.kv_cache,
                batch_slots=options.kv_windows("gguf")
                if info.format == "gguf"
                else options.max_batch_size,
            )
        log.info("loaded %s in %.2fs%s", instance_id, elapsed, " (JIT)" if jit else "")
        return loaded

    def _check_distributed(self, info: ModelInfo, victims: list[Loaded]) -> None:
        if info.type == "embedding" or info.format != "mlx":
            raise InvalidRequest(
                f"Model '{info.key}' cannot be served: this distributed server serves MLX "
                "text models only."
            )
        held = [i.id for i in self._instances.values() if i not in victims]
        if held:
            raise InvalidRequest(
                f"Model '{info.key}' cannot be loaded: this distributed server serves one "
                f"model at a time and '{held[0]}' is loaded; unload it first."
            )

    @staticmethod
    def _template(info: ModelInfo, engine: Engine) -> ChatTemplate:
        try:
            return ChatTemplate(
                engine.info.chat_template,
                bos_token=engine.info.bos_token,
                eos_token=engine.info.eos_token,
            )
        except TemplateError as exc:
            log.warning("%s: %s; using a plain ChatML template", info.key, exc)
            return ChatTemplate(None)

    # --- unloading ----------------------------------------------------------------------

    async def unload(self, instance_id: str) -> Loaded:
        """Unload an instance, after the requests using it are done."""
        instance = self._instances.get(instance_id) or self._embedders.get(instance_id)
        if instance is None:
            raise InstanceNotFound(instance_id)
        await self._retire(instance, "unloaded on request")
        return instance

    async def _retire(self, instance: Loaded, reason: str) -> None:
        # Out of the tables first, in the same step as the caller's decision, so that no new
        # request can pick it up; then wait for the requests already holding it.
        if self._instances.get(instance.id) is instance:
            del self._instances[instance.id]
        elif self._embedders.get(instance.id) is instance:
            del self._embedders[instance.id]
        else:
            return
        log.info("unloading %s: %s", instance.id, reason)
        await self._shielded(self._close_when_idle(instance))

    async def _close_when_idle(self, instance: Loaded) -> None:
        started = time.perf_counter()
        while instance.holds:
            await instance.released.wait()
        await asyncio.to_thread(_close_engine, instance.engine)
        if self.observer is not None:
            self.observer.unloaded(instance.id, seconds=time.perf_counter() - started)

    def _busy(self, instance: Loaded) -> bool:
        return instance.holds > 0 or instance.engine.pending > 0

    def ttl_left(self, instance: Loaded) -> float | None:
        """Seconds until ``instance`` is unloaded for idleness (its whole TTL while busy);
        None without a TTL."""
        if instance.ttl is None:
            return None
        if self._busy(instance):
            return instance.ttl
        return max(instance.last_used + instance.ttl - self._clock(), 0.0)

    async def _reap(self) -> float | None:
        """Unload the instances idle past their TTL; returns seconds until the next look."""
        now = self._clock()
        wait: float | None = None
        for instance in self._all():
            if instance.ttl is None:
                continue
            if self._busy(instance):
                instance.busy_seen = True
                wait = min(wait or BUSY_RECHECK_SECONDS, BUSY_RECHECK_SECONDS)
                continue
            if instance.busy_seen:
                # Its work ended since the last look: idle time counts from now.
                instance.busy_seen = False
                instance.last_used = max(instance.last_used, now)
            left = instance.last_used + instance.ttl - now
            if left <= 0:
                await self._retire(instance, f"idle for {instance.ttl:g}s (TTL)")
            else:
                wait = left if wait is None else min(wait, left)
        return wait

    async def _reap_forever(self) -> None:
        while True:
            self._wake.clear()
            try:
                wait = await self._reap()
            except Exception:
                log.exception("unloading idle models failed; trying again shortly")
                wait = BUSY_RECHECK_SECONDS
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    def start(self) -> None:
        """Start the TTL task (the app's lifespan calls this)."""
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_forever(), name="mlxserve-ttl")

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        # Loads and unloads still in flight finish first, so none leaves an engine open.
        await asyncio.gather(*self._background, return_exceptions=True)
        for instance in self._all():
            await self._retire(instance, "shutting down")
