"""Which model instances are loaded, and leases on them, with LM Studio's semantics.

- **JIT:** an inference request naming a downloaded model loads it; concurrent first
  requests for one model share one load.
- **Leases:** every use of an instance holds a lease on it (:meth:`ModelManager.lease`):
  nothing unloads it while one is held, and its idle time counts from the last lease's end.
- **TTL:** a model loaded just in time is unloaded after ``ttl`` idle seconds (a request's
  ``ttl``, else the default); explicitly loaded models only if they were loaded with one.
- **Auto-evict:** loading a model just in time unloads the earlier JIT loads of the same kind
  (text or embedding); one with requests leased, queued or running goes only once it is idle,
  unless the guardrail says the two do not fit, when it goes before the load (after its
  queued work). Explicitly loaded models are never evicted.
- **Guardrail:** a load whose estimated memory exceeds what is free is refused.

Opening engines is :mod:`mlxserve.core.loader`'s; unloading idle ones,
:mod:`mlxserve.core.reaper`'s.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from mlxserve.core import heap, memory
from mlxserve.core.instance import EmbeddingInstance, Instance, Loaded, LoadRequest, is_busy
from mlxserve.core.loader import ModelLoader
from mlxserve.core.metrics import LifecycleObserver
from mlxserve.core.reaper import IdleReaper
from mlxserve.core.registry import ModelInfo, Registry
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

__all__ = ["EmbeddingInstance", "Instance", "Lease", "Loaded", "LoadRequest", "ModelManager"]

log = logging.getLogger("mlxserve.manager")

T = TypeVar("T")
L = TypeVar("L", bound="Instance | EmbeddingInstance")

_IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,255}$")


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


def _jit_off(key: str) -> ModelNotLoaded:
    return ModelNotLoaded(
        f"Model '{key}' is not loaded and just-in-time loading is off; load it first "
        "(POST /api/v1/models/load).",
        param="model",
    )


class Lease(Generic[L]):
    """``async with manager.lease(model) as instance:`` — the instance serving ``model``
    (loaded just in time if allowed), kept loaded until the block ends. After entering,
    :attr:`load_seconds` is the load time when this lease loaded it, else None."""

    def __init__(
        self,
        acquire: Callable[[], Awaitable[tuple[L, float | None]]],
        release: Callable[[Loaded], None],
    ) -> None:
        self._acquire = acquire
        self._release = release
        self._instance: L | None = None
        self.load_seconds: float | None = None

    async def __aenter__(self) -> L:
        if self._instance is not None:
            raise RuntimeError("a lease is entered once")
        self._instance, self.load_seconds = await self._acquire()
        return self._instance

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._instance is not None:
            self._release(self._instance)


class ModelManager:
    """Owns every loaded instance and decides when each is loaded and unloaded."""

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
        # Told of every load and unload (the metrics registry).
        self.observer = observer
        self.loader = ModelLoader(settings)
        self._clock = clock
        self._instances: dict[str, Instance] = {}
        self._embedders: dict[str, EmbeddingInstance] = {}
        # Instances out of the tables but not closed yet: their memory is not free until then.
        self._closing: dict[int, Loaded] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # Serializes evict-then-load, so that two JIT loads cannot both keep their model.
        self._evict_lock = asyncio.Lock()
        self.reaper = IdleReaper(self._all, self._retire, clock)
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

    def _in_use(self) -> int:
        """Bytes the loaded instances take, those still closing included."""
        closing = sum(i.memory_bytes for i in self._closing.values())
        return sum(i.memory_bytes for i in self._all()) + closing

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

    def ttl_left(self, instance: Loaded) -> float | None:
        """Seconds until ``instance`` is unloaded for idleness; None without a TTL."""
        return self.reaper.ttl_left(instance)

    async def find_model(self, model: str) -> ModelInfo:
        """The downloaded model a request names: its key, or its folder name when unique."""
        if not model or len(model) > 512:
            raise ModelNotFound(model[:64])
        if "/" in model:
            info = await self.registry.find(model)
            if info is None:
                raise ModelNotFound(model)
            return info
        matches = [m for m in await self.registry.models() if m.name == model]
        if len(matches) != 1:
            raise ModelNotFound(model)
        return matches[0]

    # --- leasing a model ----------------------------------------------------------------

    async def resolve(self, model: str) -> Instance | ModelInfo:
        """The loaded instance serving ``model`` (an instance id or a model key), or the model
        to load for it. Raises when it names nothing, or a model that may not be loaded now."""
        instance = self._instances.get(model)
        if instance is not None:
            return instance
        if model in self._embedders:
            raise _not_a_text_model(self._embedders[model].info.key)
        info = await self.find_model(model)
        if info.type != "llm":
            raise _not_a_text_model(info.key)
        candidates = [i for i in self._instances.values() if i.info.key == info.key]
        if candidates:
            return min(candidates, key=lambda i: i.engine.pending)
        if not self.settings.jit_loading:
            raise _jit_off(info.key)
        return info

    async def _resolve_embedder(self, model: str) -> EmbeddingInstance | ModelInfo:
        embedder = self._embedders.get(model)
        if embedder is not None:
            return embedder
        if model in self._instances:
            raise _not_an_embedding_model(self._instances[model].info.key)
        info = await self.find_model(model)
        if info.type != "embedding":
            raise _not_an_embedding_model(info.key)
        candidates = [e for e in self._embedders.values() if e.info.key == info.key]
        if candidates:
            return min(candidates, key=lambda e: e.engine.pending)
        if not self.settings.jit_loading:
            raise _jit_off(info.key)
        return info

    def lease(
        self, model: str, *, ttl: float | None = None, context_length: int | None = None
    ) -> Lease[Instance]:
        """A lease on the text instance serving ``model`` (an instance id, a model key or a
        folder name), loading it just in time (with ``context_length``) if allowed; ``ttl``
        sets a JIT instance's idle TTL."""

        async def acquire() -> tuple[Instance, float | None]:
            found = await self.resolve(model)
            if isinstance(found, Instance):
                self._touch(found, ttl)
                self._hold(found)
                return found, None
            loaded, seconds = await self._jit(found, ttl, LoadRequest(context_length))
            assert isinstance(loaded, Instance)
            return loaded, seconds

        return Lease(acquire, self._release)

    def lease_embedder(self, model: str, *, ttl: float | None = None) -> Lease[EmbeddingInstance]:
        """A lease on the embedding instance serving ``model``, as :meth:`lease`."""

        async def acquire() -> tuple[EmbeddingInstance, float | None]:
            found = await self._resolve_embedder(model)
            if isinstance(found, EmbeddingInstance):
                self._touch(found, ttl)
                self._hold(found)
                return found, None
            loaded, seconds = await self._jit(found, ttl, LoadRequest())
            assert isinstance(loaded, EmbeddingInstance)
            return loaded, seconds

        return Lease(acquire, self._release)

    def _hold(self, instance: Loaded) -> None:
        instance.holds += 1
        instance.released.clear()

    def _release(self, instance: Loaded) -> None:
        instance.holds -= 1
        instance.last_used = self._clock()
        if not instance.holds:
            instance.released.set()

    def _touch(self, instance: Loaded, ttl: float | None) -> None:
        instance.last_used = self._clock()
        if ttl is not None and instance.jit:
            instance.ttl = ttl
            self.reaper.wake()

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

    async def _evict_now(
        self, info: ModelInfo, need: memory.Estimate, victims: list[Loaded]
    ) -> tuple[list[Loaded], memory.Estimate]:
        """Which of ``victims`` go before the load: the idle ones, and the busy ones too only
        when the load does not fit whole beside them (or a distributed group serves one
        model); and what the load may take (see :meth:`ModelLoader.check_fits`)."""
        idle = [v for v in victims if not is_busy(v)]
        busy = [v for v in victims if is_busy(v)]
        in_use = self._in_use()
        if busy and self.distributed is None:
            try:
                await self.loader.check_fits(info, need, in_use, sum(v.memory_bytes for v in idle))
            except memory.LoadRefused:
                log.info("%s does not fit beside the busy JIT models: evicting them", info.key)
            else:
                for victim in busy:
                    victim.evict_when_idle = True
                    log.info("deferring the eviction of %s until it is idle", victim.id)
                self.reaper.wake()
                return idle, need
        freed = sum(v.memory_bytes for v in victims)
        return victims, await self.loader.check_fits(info, need, in_use, freed, shrink=True)

    async def _open(
        self,
        info: ModelInfo,
        request: LoadRequest,
        *,
        jit: bool,
        ttl: float | None,
        victims: list[Loaded],
    ) -> Loaded:
        options = self.loader.options(info, request)
        if self.distributed is not None:
            self._check_distributed(info, victims)
        draft = await self.registry.find(options.draft_model) if options.draft_model else None
        need = await self.loader.estimate(info, options, draft)
        if victims:
            victims, need = await self._evict_now(info, need, victims)
        else:
            need = await self.loader.check_fits(info, need, self._in_use(), 0, shrink=True)
        cut = need.prompt_cache < options.prompt_cache_bytes
        if cut and info.type == "llm" and info.format == "gguf":
            # What is free holds only part of the prompt cache's host memory: the engine parks
            # that much (requests kept in its context's cells cost nothing more and stay).
            options = replace(options, host_cache_bytes=need.prompt_cache)
        elif cut and info.type == "llm":
            # What is free holds only part of the prompt cache: the engine keeps that much.
            options = replace(options, prompt_cache_bytes=need.prompt_cache)
        for victim in victims:
            await self._retire(victim, "auto-evicted for a just-in-time load")
        instance_id = request.identifier or self.next_instance_id(info.key)
        residency: dict[str, Any] = {
            "jit": jit,
            "ttl": ttl,
            "memory_bytes": need.total,
            "memory": need,
            "drafts": {draft.key} if draft is not None else set(),
            "last_used": self._clock(),
        }
        try:
            loaded = await self.loader.open(
                info,
                options,
                instance_id=instance_id,
                residency=residency,
                distributed=self.distributed,
            )
        except ModelLoadFailed:
            if self.observer is not None:
                self.observer.load_failed(info.key)
            raise
        loaded.last_used = self._clock()
        if isinstance(loaded, EmbeddingInstance):
            self._embedders[loaded.id] = loaded
        else:
            self._instances[loaded.id] = loaded
        if ttl is not None:
            self.reaper.wake()
        if self.observer is not None:
            loaded.meter = self.observer.loaded(
                loaded.id,
                seconds=loaded.load_seconds,
                memory_bytes=need.total,
                kv_cache_bytes=need.kv_cache,
                batch_slots=options.slots(info.format),
            )
        heap.settle()
        log.info("loaded %s in %.2fs%s", loaded.id, loaded.load_seconds, " (JIT)" if jit else "")
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

    async def add_draft(
        self, instance: Instance, draft: ModelInfo, load: Callable[[], Awaitable[None]]
    ) -> None:
        """Run ``load`` (which loads ``draft`` into ``instance``'s engine, for speculative
        decoding) once the guardrail says the draft fits beside every loaded model; from
        then on its memory counts in the instance's. A draft counted already just loads."""
        lock = self._locks.setdefault(f"{instance.id}\0draft", asyncio.Lock())
        async with lock:
            if draft.key in instance.drafts:
                await load()
                return
            cost = await self.loader.draft_cost(instance, draft)
            need = memory.Estimate(0, 0, instance.context_length, draft=cost)
            await self.loader.check_fits(
                draft,
                need,
                self._in_use(),
                0,
                what=f"Loading the draft model '{draft.key}' into '{instance.id}'",
                param="draft_model",
            )
            await load()
            instance.drafts.add(draft.key)
            instance.memory_bytes += cost
            if instance.memory is not None:
                instance.memory = instance.memory.with_draft(cost)
            if instance.meter is not None:
                instance.meter.memory(instance.memory_bytes)
            log.info("draft %s loaded into %s (~%d bytes)", draft.key, instance.id, cost)

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
        # request can pick it up; then wait for the leases still held on it.
        if self._instances.get(instance.id) is instance:
            del self._instances[instance.id]
        elif self._embedders.get(instance.id) is instance:
            del self._embedders[instance.id]
        else:
            return
        log.info("unloading %s: %s", instance.id, reason)
        await self._shielded(self._close_when_released(instance))

    async def _close_when_released(self, instance: Loaded) -> None:
        started = time.perf_counter()
        self._closing[id(instance)] = instance
        try:
            while instance.holds:
                await instance.released.wait()
            # Waits for the requests queued and running on it: unloading never cuts a reply.
            await self.loader.close(instance)
        finally:
            del self._closing[id(instance)]
        heap.after_unload()
        if self.observer is not None:
            self.observer.unloaded(instance.id, seconds=time.perf_counter() - started)

    def start(self) -> None:
        """Start the idle reaper (the app's lifespan calls this)."""
        self.reaper.start()

    async def close(self) -> None:
        await self.reaper.stop()
        # Loads and unloads still in flight finish first, so none leaves an engine open.
        await asyncio.gather(*self._background, return_exceptions=True)
        for instance in self._all():
            await self._retire(instance, "shutting down")
