"""Loaded model instances: resolve a request's model, load it on first use, unload."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from backends import open_engine
from backends.base import Engine, LoadOptions
from mlxserve.core.registry import ModelInfo, Registry
from mlxserve.core.templates import ChatTemplate, TemplateError
from mlxserve.errors import InvalidRequest, ModelLoadFailed, ModelNotFound, ModelNotLoaded
from mlxserve.settings import Settings

log = logging.getLogger("mlxserve.manager")


@dataclass
class Instance:
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


class ModelManager:
    """Owns every loaded engine. Loads of one model are serialized, so concurrent first
    requests share one load instead of loading the model twice."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self._instances: dict[str, Instance] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def loaded(self) -> list[Instance]:
        return list(self._instances.values())

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

    async def get(self, model: str) -> Instance:
        """The instance serving ``model`` (an instance id or a model key), loading it if allowed."""
        instance = self._instances.get(model)
        if instance is not None:
            return instance
        info = self.find_model(model)
        for instance in self._instances.values():
            if instance.info.key == info.key:
                return instance
        if not self.settings.jit_loading:
            raise ModelNotLoaded(
                f"Model '{info.key}' is not loaded and just-in-time loading is off; load it first.",
                param="model",
            )
        return await self.load(info, reuse=True)

    async def load(self, info: ModelInfo, *, reuse: bool = False) -> Instance:
        """Load ``info``. With ``reuse``, an instance already loaded (or loading) is returned."""
        if info.type != "llm":
            raise InvalidRequest(
                f"Model '{info.key}' is an embedding model and cannot generate text.",
                param="model",
            )
        lock = self._locks.setdefault(info.key, asyncio.Lock())
        async with lock:
            if reuse:
                for instance in self._instances.values():
                    if instance.info.key == info.key:
                        return instance
            context_length = min(self.settings.default_context_length, info.max_context_length)
            started = time.perf_counter()
            log.info("loading %s (%s, context %d)", info.key, info.format, context_length)
            try:
                engine = await asyncio.to_thread(
                    open_engine,
                    info.format,
                    info.weights,
                    LoadOptions(
                        context_length=context_length,
                        kv_cache_f32=info.quantization == "F32",
                    ),
                    max_queue=self.settings.max_queue_per_model,
                )
            except Exception as exc:
                log.exception("loading %s failed", info.key)
                raise ModelLoadFailed(
                    f"Model '{info.key}' failed to load: {type(exc).__name__}: {exc}"
                ) from exc
            elapsed = time.perf_counter() - started
            try:
                template = ChatTemplate(
                    engine.info.chat_template,
                    bos_token=engine.info.bos_token,
                    eos_token=engine.info.eos_token,
                )
            except TemplateError as exc:
                log.warning("%s: %s; using a plain ChatML template", info.key, exc)
                template = ChatTemplate(None)
            instance_id = info.key
            n = 1
            while instance_id in self._instances:
                n += 1
                instance_id = f"{info.key}:{n}"
            instance = Instance(
                id=instance_id,
                info=info,
                engine=engine,
                template=template,
                loaded_at=time.time(),
                load_seconds=elapsed,
            )
            self._instances[instance_id] = instance
            log.info("loaded %s in %.2fs", instance_id, elapsed)
            return instance

    async def unload(self, instance_id: str) -> None:
        instance = self._instances.pop(instance_id, None)
        if instance is None:
            raise ModelNotFound(instance_id)
        await asyncio.to_thread(instance.engine.close)

    async def close(self) -> None:
        for instance_id in list(self._instances):
            await self.unload(instance_id)
