"""One MLX model served across several machines with ``mx.distributed`` (ring, JACCL, MPI).

Every rank loads its shard with mlx-lm's ``sharded_load`` (tensor parallel where the model
implements ``shard()``, pipeline where it implements ``pipeline()``). Rank 0 serves HTTP and
runs the usual continuous-batching engine; before each batch step it broadcasts what changed
(requests inserted with their prompt, sampling parameters, seed and grammar; requests
removed), and every other rank replays exactly those calls on its own ``BatchGenerator`` and
steps with it. Sampling is replicated, not broadcast: the sharded model gives every rank the
same logits, and every request samples from its own seeded key, so every rank draws the same
tokens (each tick also carries rank 0's previous tokens, and a rank that drew others stops).

A collective cannot time out in MLX, so rank 0 runs a watchdog: a step (or an idle ping) that
takes longer than ``timeout`` marks the group failed; a rank that dies makes the ring raise
at once. Either way rank 0 fails the running requests with the reason, refuses new ones with
it and reports it on ``/health``: the group cannot recover without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import random
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.utils import load_model, sharded_load

from backends.base import (
    EngineError,
    EngineInfo,
    GenerationRequest,
    Job,
    LoadOptions,
    SamplingParams,
    TokenStream,
)
from backends.constraint import GrammarCache, GrammarConstraint
from backends.mlx.engine import MLXEngine
from backends.mlx.prompt_cache import PromptCache

log = logging.getLogger("mlxserve.distributed")

# Rank 0 pings the other ranks after this many idle seconds, so that a lost rank shows
# without a request; the other ranks give up on rank 0 after ``timeout`` plus this.
PING_SECONDS = 1.0
# Loading a shard reads its weights from disk: it may take much longer than a step.
LOAD_TIMEOUT_SECONDS = 600.0
_RANK_SLOT = 256


class DistributedFailure(RuntimeError):
    """The distributed group lost a rank (or a rank stopped answering)."""


class _Refused(ValueError):
    """Every rank agreed not to go on (a section that raises it leaves the group in step)."""


class DistributedGroup:
    """This process's place in an ``mx.distributed`` group, and the control channel rank 0
    drives the other ranks through. Every collective rank 0 starts runs in a :meth:`section`,
    one at a time, in the same order on every rank."""

    def __init__(self, backend: str = "any", timeout: float = 30.0) -> None:
        self._group = mx.distributed.init(strict=True, backend=backend)
        self.rank = self._group.rank()
        self.size = self._group.size()
        self.backend = backend
        self.timeout = timeout
        self.failed: str | None = None
        self.holder: str | None = None
        self._lock = threading.Lock()
        self._held = threading.Condition()
        self._busy_since: float | None = None
        self._limit = timeout
        self._last = time.monotonic()
        self._listeners: list[Callable[[str], None]] = []
        self._stopped = threading.Event()
        self.ranks = self._gather_ranks()

    def _gather_ranks(self) -> list[dict[str, Any]]:
        me = json.dumps({"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid()})
        slots = mx.zeros((self.size, _RANK_SLOT), dtype=mx.uint8)
        raw = list(me.encode()[:_RANK_SLOT])
        slots[self.rank, : len(raw)] = mx.array(raw, dtype=mx.uint8)
        total = mx.distributed.all_sum(slots, group=self._group, stream=mx.cpu)
        rows = np.asarray(total)
        return [json.loads(row.tobytes().rstrip(b"\0")) for row in rows]

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "world_size": self.size,
            "ranks": self.ranks,
            "healthy": self.failed is None,
            "error": self.failed,
        }

    # --- the control channel ------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        """Rank 0: broadcast ``message`` (inside a :meth:`section`)."""
        data = json.dumps(message, separators=(",", ":")).encode()
        size = mx.distributed.all_sum(
            mx.array([len(data)], dtype=mx.int32), group=self._group, stream=mx.cpu
        )
        # One at a time: evaluated together, MLX may run them in either order.
        mx.eval(size)
        payload = mx.distributed.all_sum(
            mx.array(list(data), dtype=mx.uint8), group=self._group, stream=mx.cpu
        )
        mx.eval(payload)
        self._last = time.monotonic()

    def receive(self) -> dict[str, Any]:
        """The other ranks: the next message rank 0 sends."""
        size = mx.distributed.all_sum(
            mx.zeros((1,), dtype=mx.int32), group=self._group, stream=mx.cpu
        )
        payload = mx.distributed.all_sum(
            mx.zeros((int(np.asarray(size)[0]),), dtype=mx.uint8), group=self._group, stream=mx.cpu
        )
        message: dict[str, Any] = json.loads(np.asarray(payload).tobytes())
        return message

    def count(self, flag: bool) -> int:
        """How many ranks pass ``flag`` true (every rank calls it at the same point)."""
        total = mx.distributed.all_sum(
            mx.array([int(flag)], dtype=mx.int32), group=self._group, stream=mx.cpu
        )
        return int(np.asarray(total)[0])

    @contextlib.contextmanager
    def section(self, limit: float | None = None) -> Iterator[None]:
        """Rank 0: run collectives, watched: past ``limit`` seconds the group fails. Any
        error inside leaves the ranks out of step, so it fails the group too."""
        # A section stuck for good (a hung rank) holds the lock: waiters give up on failure.
        while not self._lock.acquire(timeout=0.2):
            if self.failed is not None:
                raise DistributedFailure(self.failed)
        with contextlib.ExitStack() as held:
            held.callback(self._lock.release)
            if self.failed is not None:
                raise DistributedFailure(self.failed)
            self._limit = limit or self.timeout
            self._busy_since = time.monotonic()
            try:
                yield
            except _Refused:
                raise
            except Exception as exc:
                self.fail(f"the distributed step failed: {type(exc).__name__}: {exc}")
                raise DistributedFailure(self.failed or str(exc)) from exc
            finally:
                self._busy_since = None
                self._last = time.monotonic()

    def on_failure(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """Call ``listener(reason)`` when the group fails; returns the unsubscribe function."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def fail(self, reason: str) -> None:
        if self.failed is not None:
            return
        self.failed = reason
        log.error("distributed group failed: %s", reason)
        for listener in list(self._listeners):
            try:
                listener(reason)
            except Exception:
                log.exception("failing requests after a distributed failure")

    def start_monitor(self) -> None:
        """Rank 0: ping idle ranks and watch every section's deadline."""
        threading.Thread(target=self._ping_forever, name="distributed-ping", daemon=True).start()
        threading.Thread(target=self._watch_forever, name="distributed-watch", daemon=True).start()

    def _ping_forever(self) -> None:
        while not self._stopped.wait(PING_SECONDS / 4):
            if self.failed is not None:
                return
            if time.monotonic() - self._last < PING_SECONDS or self._lock.locked():
                continue
            with contextlib.suppress(DistributedFailure), self.section():
                self.send({"op": "ping"})

    def _watch_forever(self) -> None:
        while self.failed is None:
            time.sleep(0.2)
            since = self._busy_since
            if since is not None and time.monotonic() - since > self._limit:
                others = ", ".join(str(r) for r in range(1, self.size))
                self.fail(
                    f"a rank of the distributed group (rank {others}) did not answer within "
                    f"{self._limit:.0f}s; restart the distributed server"
                )

    def stop(self) -> None:
        """Rank 0: tell the other ranks to exit (best effort) and stop the monitor."""
        self._stopped.set()
        if self.failed is None and self._lock.acquire(timeout=self.timeout):
            self._lock.release()
            with contextlib.suppress(DistributedFailure), self.section(limit=5.0):
                self.send({"op": "stop"})

    # --- model ownership ----------------------------------------------------------------

    def claim(self, name: str, wait: float = 60.0) -> None:
        """Take the group for one model; an evicted model may still be closing."""
        with self._held:
            if not self._held.wait_for(lambda: self.holder is None, timeout=wait):
                raise DistributedFailure(
                    f"a distributed server serves one model at a time; '{self.holder}' is loaded"
                )
            self.holder = name

    def release(self, name: str) -> None:
        with self._held:
            if self.holder == name:
                self.holder = None
                self._held.notify_all()


def check_shardable(path: Path, size: int) -> None:
    """Refuse, before any rank loads anything, a model ``sharded_load`` cannot split in
    ``size`` (a failed load on one rank would leave the others out of step)."""
    model, config = load_model(path, lazy=True, strict=False)
    if hasattr(model, "shard"):
        args = config.get("text_config", config)
        for key in ("num_attention_heads", "num_key_value_heads"):
            value = args.get(key)
            if isinstance(value, int) and value % size:
                raise ValueError(
                    f"{path.name} has {key}={value}, which {size} ranks cannot split evenly"
                )
        return
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "pipeline"):
        if not (path / "model.safetensors.index.json").is_file():
            raise ValueError(f"{path.name} needs model.safetensors.index.json to be pipelined")
        return
    raise ValueError(
        f"{path.name} ({config.get('model_type')}) implements neither shard() nor pipeline()"
    )


class _NamedGrammars(GrammarCache):
    """A grammar cache that remembers each constraint's grammar, for the other ranks."""

    def __init__(self, base: GrammarCache) -> None:
        super().__init__(base._make_tokenizer, base._vocab_size)
        self.sources: weakref.WeakKeyDictionary[GrammarConstraint, str] = (
            weakref.WeakKeyDictionary()
        )

    def constraint(self, grammar: str) -> GrammarConstraint:
        constraint = super().constraint(grammar)
        self.sources[constraint] = grammar
        return constraint


class _ShardedMLXEngine(MLXEngine):
    """What rank 0 and the other ranks share: the shard's load and the replayable insert."""

    spills = False

    group: DistributedGroup

    def _load_model(self) -> tuple[Any, Any]:
        model, tokenizer = sharded_load(str(self.path))[:2]
        return model, tokenizer

    def _load(self) -> EngineInfo:
        info = super()._load()
        if not self._batchable:
            raise ValueError(
                "this model's cache cannot be batched, which distributed serving needs"
            )
        # Rank 0 and the others would evict different prefixes: no prompt cache.
        self._prompt_cache = PromptCache(0)
        return info

    def _insert(self, op: dict[str, Any], constraint: GrammarConstraint | None) -> int:
        sampling = SamplingParams(**op["sampling"])
        request = GenerationRequest(
            prompt=tuple(op["prompt"]),
            sampling=sampling,
            max_tokens=op["max_tokens"],
            stop_token_ids=frozenset(op["stop"]),
            constraint=constraint,
        )
        (uid,) = self._batch.insert(
            [list(request.prompt)],
            max_tokens=[request.max_tokens],
            samplers=[self._sampler(sampling)],
            logits_processors=[self._processors(request)],
            stop_sequences=[StopSequences([[t] for t in op["stop"]] or None)],
        )
        return int(uid)


class _SyncedBatch(BatchGenerator):
    """Rank 0's batch: each step first broadcasts the calls made since the last one."""

    def __init__(
        self, model: Any, group: DistributedGroup, ops: list[dict[str, Any]], **kwargs: Any
    ) -> None:
        super().__init__(model, **kwargs)
        self._group = group
        self.ops = ops
        self.sampled: dict[int, int] = {}

    def remove(self, uids: Any, return_prompt_caches: bool = False) -> Any:
        self.ops.append({"op": "remove", "uids": [int(u) for u in uids]})
        return super().remove(uids, return_prompt_caches=return_prompt_caches)

    def next(self) -> Any:
        with self._group.section():
            message = {
                "op": "tick",
                "ops": list(self.ops),
                "prefill": self.prefill_step_size,
                "prefill_batch": self.prefill_batch_size,
                "sampled": self.sampled,
            }
            self._group.send(message)
            self.ops.clear()
            prompt_responses, responses = super().next()
            mx.synchronize(self.stream)
        self.sampled = {int(r.uid): int(r.token) for r in responses}
        return prompt_responses, responses


class DistributedMLXEngine(_ShardedMLXEngine):
    """Rank 0's engine: the MLX engine, each step broadcast to the other ranks first."""

    def __init__(
        self, path: Path, options: LoadOptions, *, group: DistributedGroup, max_queue: int = 64
    ) -> None:
        self.group = group
        group.claim(path.name)
        self._unsubscribe = group.on_failure(self._fail_all)
        try:
            super().__init__(path, options, max_queue=max_queue)
        except BaseException:
            self._unsubscribe()
            group.release(path.name)
            raise

    def _setup(self) -> None:
        super()._setup()
        self._ops: list[dict[str, Any]] = []

    def describe_distributed(self) -> dict[str, Any]:
        return self.group.describe()

    def _load_model(self) -> tuple[Any, Any]:
        check_shardable(self.path, self.group.size)
        # Sharded engines never spill (``spills``); the folder, a Path, would not go as JSON.
        options = asdict(replace(self.options, prompt_cache_dir=None))
        message = {"op": "load", "path": str(self.path), "options": options}
        with self.group.section(limit=max(LOAD_TIMEOUT_SECONDS, self.group.timeout)):
            self.group.send(message)
            missing = self.group.count(False)
            if missing:
                raise _Refused(
                    f"{missing} other rank(s) have no folder {self.path}: every host needs the "
                    "model at the same path"
                )
            return super()._load_model()

    def _load(self) -> EngineInfo:
        try:
            info = super()._load()
        except (DistributedFailure, _Refused):
            raise
        except BaseException:
            with contextlib.suppress(DistributedFailure), self.group.section():
                self.group.send({"op": "unload"})
            raise
        self.grammars = _NamedGrammars(self.grammars)
        return info

    def _new_batch(self) -> BatchGenerator:
        if hasattr(self, "_batch"):
            # A reset after a failed step: the other ranks drop their batch at the next tick
            # too (what was queued for the old one goes with it), so uids start over alike.
            self._ops[:] = [{"op": "reset"}]
        size = self.options.slots("mlx")
        return _SyncedBatch(
            self._model,
            self.group,
            self._ops,
            completion_batch_size=size,
            prefill_batch_size=size,
            prefill_step_size=self.options.prefill_chunk,
        )

    def submit(self, request: GenerationRequest) -> TokenStream:
        if self.group.failed is not None:
            stream = TokenStream(asyncio.get_running_loop())
            stream.put(EngineError(f"DistributedFailure: {self.group.failed}"))
            return stream
        return super().submit(request)

    def _admit(self, job: Job) -> None:
        request = job.request
        sampling = request.sampling
        if sampling.temperature != 0 and sampling.seed is None:
            # Every rank draws with the same key.
            sampling = replace(sampling, seed=random.getrandbits(62))
        grammar = None
        if request.constraint is not None:
            assert isinstance(self.grammars, _NamedGrammars)
            grammar = self.grammars.sources.get(request.constraint)
            if grammar is None:
                raise ValueError("this constraint's grammar is unknown to the other ranks")
        op = {
            "op": "insert",
            "prompt": list(request.prompt),
            "max_tokens": request.max_tokens,
            "stop": sorted(request.stop_token_ids),
            "sampling": asdict(sampling),
            "grammar": grammar,
        }
        if self.group.failed is not None:
            raise DistributedFailure(self.group.failed)
        uid = self._insert(op, request.constraint)
        self._ops.append(op)
        self._batched[uid] = (job, 0, 0)
        self._prefill.queued(uid, len(request.prompt))

    def close(self) -> None:
        # After a failure the owner thread may be stuck for good in a collective.
        self._owner.close(self._unload, timeout=1.0 if self.group.failed else None)

    def _fail_all(self, reason: str) -> None:
        # From the watchdog thread while the owner thread is stuck in a collective, or from
        # the owner thread itself; Job.fail ends each stream once.
        error = DistributedFailure(reason)
        for job, *_ in list(self._batched.values()):
            job.fail(error)

    def _unload(self) -> None:
        with contextlib.suppress(DistributedFailure), self.group.section():
            self.group.send({"op": "unload"})
        try:
            super()._unload()
        finally:
            self._unsubscribe()
            self.group.release(self.path.name)


class WorkerMLXEngine(_ShardedMLXEngine):
    """A rank other than 0: replays rank 0's batch calls on its shard."""

    def __init__(self, path: Path, options: LoadOptions, *, group: DistributedGroup) -> None:
        self.group = group
        super().__init__(path, options, max_queue=1)

    def _setup(self) -> None:
        super()._setup()
        # What this rank sampled at the last step, checked against rank 0's at the next.
        self._sampled: dict[int, int] = {}

    def apply(self, message: dict[str, Any]) -> None:
        """One tick (on the owner thread)."""
        theirs = {int(k): v for k, v in message["sampled"].items()}
        mine = self._sampled
        if any(mine.get(uid, token) != token for uid, token in theirs.items()):
            raise DistributedFailure(
                f"rank {self.group.rank} sampled other tokens than rank 0 "
                f"(rank 0: {theirs}, rank {self.group.rank}: {mine})"
            )
        for op in message["ops"]:
            if op["op"] == "insert":
                grammar = op["grammar"]
                self._insert(op, self.grammars.constraint(grammar) if grammar else None)
            elif op["op"] == "remove":
                self._batch.remove(op["uids"])
            else:
                self._batch.close()
                self._batch = self._new_batch()
        self._batch.prefill_step_size = message["prefill"]
        self._batch.prefill_batch_size = message["prefill_batch"]
        _, responses = self._batch.next()
        mx.synchronize(self._batch.stream)
        self._sampled = {int(r.uid): int(r.token) for r in responses}


def serve_worker(group: DistributedGroup) -> int:
    """The loop of every rank but 0: load what rank 0 loads and step with it, until rank 0
    says stop (0) or stops answering (1)."""
    engine: WorkerMLXEngine | None = None
    waiting_since: list[float | None] = [time.monotonic()]
    patience = group.timeout + PING_SECONDS * 5

    def watch() -> None:
        while True:
            time.sleep(0.5)
            since = waiting_since[0]
            if since is not None and time.monotonic() - since > patience:
                log.error("rank 0 has not answered for %.0fs; exiting", patience)
                os._exit(1)

    threading.Thread(target=watch, name="distributed-watch", daemon=True).start()
    log.info("rank %d of %d waiting for rank 0", group.rank, group.size)
    try:
        while True:
            waiting_since[0] = time.monotonic()
            message = group.receive()
            waiting_since[0] = None
            op = message["op"]
            if op == "ping":
                continue
            if op == "stop":
                return 0
            if op == "load":
                if engine is not None:
                    engine.close()
                    engine = None
                path = Path(message["path"])
                if not path.is_dir():
                    log.error("rank 0 loads %s, which this host does not have", path)
                if group.count(not path.is_dir()):
                    continue
                log.info("loading the shard of %s", path)
                engine = WorkerMLXEngine(path, LoadOptions(**message["options"]), group=group)
            elif op == "unload":
                if engine is not None:
                    engine.close()
                engine = None
            elif op == "tick":
                if engine is None:
                    raise DistributedFailure("rank 0 sent a step but no model is loaded")
                engine.call(functools.partial(engine.apply, message)).result()
    except Exception:
        # Out of step with rank 0 for good: exiting makes rank 0's ring raise at once.
        log.exception("rank %d failed", group.rank)
        os._exit(1)
    finally:
        if engine is not None:
            with contextlib.suppress(Exception):
                engine.close()


def make_group(backend: str, timeout: float) -> DistributedGroup:
    try:
        group = DistributedGroup(backend, timeout)
    except RuntimeError as exc:
        raise DistributedFailure(
            f"{exc} (start mlxserve with --distributed HOSTFILE, or under mlx.launch)"
        ) from exc
    if group.size < 2:
        raise DistributedFailure(
            f"mx.distributed found a group of {group.size} rank(s) for backend {backend!r}: "
            "start mlxserve with --distributed HOSTFILE, or under mlx.launch"
        )
    return group
