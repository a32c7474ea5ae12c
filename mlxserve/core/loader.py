"""Turning a downloaded model into a loaded instance: load options, the memory guardrail,
opening the engine off the event loop, and closing it again."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import time
from typing import TYPE_CHECKING, Any

from backends import open_embedding_engine, open_engine
from backends.base import Engine, LoadOptions, LoadOptionUnsupported
from backends.embedding import EmbeddingEngine
from mlxserve.core import footprint, memory
from mlxserve.core.instance import EmbeddingInstance, Instance, Loaded, LoadRequest
from mlxserve.core.registry import ModelInfo
from mlxserve.core.templates import ChatTemplate, TemplateError
from mlxserve.errors import InvalidRequest, ModelLoadFailed
from mlxserve.settings import Settings

if TYPE_CHECKING:
    from backends.mlx.distributed import DistributedGroup

log = logging.getLogger("mlxserve.manager")


class ModelLoader:
    """Opens and closes engines; knows nothing of which instances are loaded."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # What the process holds with no model loaded: the guardrail's zero for what loaded
        # models hold now (see :func:`memory.budget`).
        self._resident_base = memory.process_resident()

    def options(self, info: ModelInfo, request: LoadRequest) -> LoadOptions:
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
            flash_attention=request.flash_attention
            if request.flash_attention is not None
            else self.settings.flash_attention,
            offload_kv_cache_to_gpu=request.offload_kv_cache_to_gpu,
            num_experts=request.num_experts,
            max_batch_size=self.settings.max_batch_size,
            parallel=request.parallel,
            # Each format takes its own cache options and ignores the other's, as LM Studio.
            kv_cache_bits=request.kv_cache_quantization if info.format == "mlx" else None,
            cache_type_k=request.cache_type_k if info.format == "gguf" else None,
            cache_type_v=request.cache_type_v if info.format == "gguf" else None,
            draft_model=request.draft_model,
            prefill_chunk=self.settings.prefill_chunk,
            reserved_windows=self.settings.kv_windows,
            prompt_cache_bytes=self.settings.prompt_cache_bytes,
            prompt_cache_dir=self.settings.home / "prompt-cache",
            prompt_cache_disk_bytes=self.settings.prompt_cache_disk_bytes,
            cache_reuse=self.settings.cache_reuse,
        )

    async def estimate(
        self, info: ModelInfo, options: LoadOptions, draft: ModelInfo | None = None
    ) -> memory.Estimate:
        """What loading ``info`` with ``options`` can come to hold, ``draft`` (its load-time
        draft model) included."""

        def work() -> memory.Estimate:
            slots = options.slots(info.format)
            windows = options.kv_windows(info.format)
            need = memory.estimate(
                info,
                options.context_length,
                kv_f32=options.kv_cache_f32,
                windows=windows,
                kv_bits=options.kv_element_bits(info.format),
                # MLX keeps finished requests' KV beside the batch; llama.cpp moves the ones
                # new requests do not use out of its windows to host memory: both up to it
                # (what GGUF keeps in its windows' cells is counted with them).
                prompt_cache=options.prompt_cache_bytes,
                scores=_gguf_scores(info, options, windows),
                mask=_gguf_mask(info, options, windows),
                sequences=options.sequence_ids(info.format, footprint.recurrent(info) is not None),
            )
            if draft is not None:
                flash = _gguf_flash(options)
                cost = memory.draft_bytes(
                    draft, info, options.context_length, slots, windows=windows, flash=flash
                )
                need = need.with_draft(cost)
            return need

        return await asyncio.to_thread(work)

    async def draft_cost(self, instance: Instance, draft: ModelInfo) -> int:
        """What loading ``draft`` into ``instance`` adds to its memory."""
        slots = int(instance.load_config.get("parallel") or 1)
        flash = instance.load_config.get("flash_attention") is True
        windows = min(self.settings.kv_windows, slots)
        return await asyncio.to_thread(
            functools.partial(memory.draft_bytes, windows=windows, flash=flash),
            draft,
            instance.info,
            instance.context_length,
            slots,
        )

    async def check_fits(
        self,
        info: ModelInfo,
        need: memory.Estimate,
        in_use: int,
        freed: int,
        *,
        what: str | None = None,
        param: str = "model",
        shrink: bool = False,
    ) -> memory.Estimate:
        """``need`` if it fits beside ``in_use`` bytes of loaded models (their estimates),
        ``freed`` of which are about to be unloaded; with ``shrink``, its prompt cache cut to
        what is left when only that does not fit (see :func:`memory.fit`). Raises
        :class:`memory.LoadRefused` otherwise."""
        if not self.settings.load_guardrail:
            return need
        limit = self.settings.guardrail_memory_gb
        available = await asyncio.to_thread(memory.budget, limit, in_use, freed, self.resident())
        return memory.fit(info.key, need, available, what=what, param=param, shrink=shrink)

    def resident(self) -> int | None:
        """Bytes the process holds now beyond what it held before any model was loaded."""
        now = memory.process_resident()
        if now is None or self._resident_base is None:
            return None
        return max(now - self._resident_base, 0)

    async def open(
        self,
        info: ModelInfo,
        options: LoadOptions,
        *,
        instance_id: str,
        residency: dict[str, Any],
        distributed: DistributedGroup | None,
    ) -> Loaded:
        """Open the engine for ``info`` off the event loop; the instance it serves."""
        started = time.perf_counter()
        log.info("loading %s (%s, context %d)", info.key, info.format, options.context_length)
        max_queue = self.settings.max_queue_per_model
        try:
            if info.type == "embedding":
                engine: Engine | EmbeddingEngine = await asyncio.to_thread(
                    open_embedding_engine, info.format, info.weights, options, max_queue=max_queue
                )
            else:
                engine = await asyncio.to_thread(
                    open_engine,
                    info.format,
                    info.weights,
                    options,
                    max_queue=max_queue,
                    distributed=distributed,
                )
        except LoadOptionUnsupported as exc:
            await asyncio.to_thread(gc.collect)
            raise InvalidRequest(
                f"Model '{info.key}' cannot be loaded with these options: {exc}", param=exc.param
            ) from exc
        except Exception as exc:
            log.exception("loading %s failed", info.key)
            # Whatever the failed load allocated is garbage now: give it back.
            await asyncio.to_thread(gc.collect)
            # The exception text may hold the file's absolute path: it stays in the log.
            raise ModelLoadFailed(
                f"Model '{info.key}' failed to load ({type(exc).__name__}); the server log "
                "has the details."
            ) from exc
        elapsed = time.perf_counter() - started
        config: dict[str, Any] = {"context_length": engine.info.context_length}
        if options.draft_model:
            config["draft_model"] = options.draft_model
        if isinstance(engine, EmbeddingEngine):
            return EmbeddingInstance(
                id=instance_id,
                info=info,
                engine=engine,
                loaded_at=time.time(),
                load_seconds=elapsed,
                load_config=config,
                **residency,
            )
        return Instance(
            id=instance_id,
            info=info,
            engine=engine,
            template=_template(info, engine),
            loaded_at=time.time(),
            load_seconds=elapsed,
            load_config=config | engine.info.load_config,
            **residency,
        )

    async def close(self, instance: Loaded) -> None:
        """Close its engine after the queued work, off the event loop."""
        await asyncio.to_thread(_close_engine, instance.engine)


def _gguf_flash(options: LoadOptions) -> bool:
    """Whether the GGUF engine runs flash attention: when asked to (by the load or the
    server's ``flash_attention`` setting), and always for a quantized V cache (llama.cpp
    needs it there)."""
    return bool(options.flash_attention) or options.cache_type_v not in (
        None,
        "f16",
        "f32",
        "bf16",
    )


def _gguf_scores(info: ModelInfo, options: LoadOptions, windows: int) -> tuple[int, int] | None:
    """The attention-score matrix llama.cpp materialises without flash attention (a load
    with ``flash_attention: false``): a micro-batch of queries (at most 512) against every
    cell of the reserved windows. MLX runs fused attention on Metal."""
    if info.format != "gguf" or _gguf_flash(options):
        return None
    ubatch = min(options.eval_batch_size or options.prefill_chunk, 512)
    return ubatch, options.context_length * windows


def _gguf_mask(info: ModelInfo, options: LoadOptions, windows: int) -> tuple[int, int] | None:
    """The attention mask llama.cpp builds with flash attention: a micro-batch of queries (at
    most 512) against every cell of the reserved windows."""
    if info.format != "gguf" or not _gguf_flash(options):
        return None
    ubatch = min(options.eval_batch_size or options.prefill_chunk, 512)
    return ubatch, options.context_length * windows


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


def _close_engine(engine: Engine | EmbeddingEngine) -> None:
    """Close after the queued work, then collect what pointed at the weights (the MLX engine
    clears its buffer cache on its owner thread; llama.cpp frees its context in close)."""
    engine.close()
    gc.collect()
    memory.give_back_freed_memory()
