"""The server's one metrics registry (Prometheus), fed by the generation path and the manager.

No dialect counts anything: :class:`~mlxserve.core.generate.Generation` reports tokens and
latencies through the :class:`ModelMeter` of the instance it runs on, the manager reports
loads and unloads through :class:`LifecycleObserver`, and the HTTP layer reports each
request's route and status (:meth:`Metrics.observe_request`). The model a request used is
learned from the generation path through :func:`request_labels`, so a request is counted
once, with its model, whatever dialect it spoke.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

# Time to first token: prompt processing dominates, from milliseconds to minutes.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Time per output token: a few milliseconds on a GPU, a second on a slow CPU.
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5)
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
REQUEST_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


@dataclass
class RequestLabels:
    """What the generation path tells the HTTP layer about the request it serves."""

    model: str = ""


# A context variable, not state: each HTTP request sets its own labels for the code it runs.
_request: ContextVar[RequestLabels | None] = ContextVar("mlxserve_request_labels", default=None)


@contextlib.contextmanager
def request_labels() -> Iterator[RequestLabels]:
    """Labels for the request run inside the block; the generation path fills in the model."""
    labels = RequestLabels()
    token = _request.set(labels)
    try:
        yield labels
    finally:
        _request.reset(token)


def note_model(model: str) -> None:
    """Record the model (instance id) the current request runs on, if a request is counted."""
    labels = _request.get()
    if labels is not None:
        labels.model = model


def resident_memory_bytes() -> int:
    """This process's resident memory: exact on Linux, the peak elsewhere (macOS has no
    cheap current figure without a native call)."""
    statm = Path("/proc/self/statm")
    if statm.exists():
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(statm.read_text().split()[1]) * resource.getpagesize()
    return peak_memory_bytes()


def peak_memory_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Kilobytes on Linux, bytes on macOS.
    return int(peak if sys.platform == "darwin" else peak * 1024)


class ModelMeter:
    """One loaded instance's share of the metrics, labelled once."""

    def __init__(self, metrics: Metrics, model: str, batch_slots: int) -> None:
        self.model = model
        self._metrics = metrics
        self._slots = max(batch_slots, 1)
        self._running = 0
        self._queued = 0
        self._prompt = metrics.prompt_tokens.labels(model)
        self._generated = metrics.generated_tokens.labels(model)
        self._cached = metrics.prompt_cache_hit_tokens.labels(model)
        self._ttft = metrics.time_to_first_token.labels(model)
        self._tpot = metrics.time_per_output_token.labels(model)
        self._running_gauge = metrics.running.labels(model)
        self._queued_gauge = metrics.queued.labels(model)
        self._occupancy = metrics.batch_occupancy.labels(model)
        metrics.batch_slots.labels(model).set(self._slots)

    def queued(self) -> None:
        self._queued += 1
        self._queued_gauge.set(self._queued)

    def started(self) -> None:
        """A queued request's prompt began processing: it now occupies a batch slot."""
        self._queued -= 1
        self._running += 1
        self._set()

    def ended(self, *, was_running: bool) -> None:
        if was_running:
            self._running -= 1
        else:
            self._queued -= 1
        self._set()

    def _set(self) -> None:
        self._queued_gauge.set(self._queued)
        self._running_gauge.set(self._running)
        self._occupancy.set(min(self._running / self._slots, 1.0))

    def memory(self, memory_bytes: int) -> None:
        """The instance's estimate changed (a draft model was loaded into it)."""
        self._metrics.model_memory_bytes.labels(self.model).set(memory_bytes)

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def finished(
        self, *, prompt_tokens: int, generated: int, cached: int, decode_seconds: float | None
    ) -> None:
        self._prompt.inc(prompt_tokens)
        self._generated.inc(generated)
        self._cached.inc(cached)
        if decode_seconds is not None and generated > 1:
            self._tpot.observe(decode_seconds / (generated - 1))


class LifecycleObserver(Protocol):
    """What the manager tells about instances it loads and unloads."""

    def loaded(
        self, instance_id: str, *, seconds: float, memory_bytes: int, kv_cache_bytes: int,
        batch_slots: int,
    ) -> ModelMeter: ...  # fmt: skip

    def load_failed(self, model_key: str) -> None: ...

    def unloaded(self, instance_id: str, *, seconds: float) -> None: ...


class Metrics:
    """The registry and its metric families; one per app (no global registry)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mlxserve_requests", "HTTP requests by model, route and status",
            ["model", "route", "status"], registry=r,
        )  # fmt: skip
        self.request_duration = Histogram(
            "mlxserve_request_duration_seconds", "HTTP request duration, to the last byte",
            ["route"], buckets=REQUEST_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "mlxserve_prompt_tokens", "Prompt tokens of finished generations", ["model"],
            registry=r,
        )  # fmt: skip
        self.generated_tokens = Counter(
            "mlxserve_generated_tokens", "Tokens generated", ["model"], registry=r
        )
        self.prompt_cache_hit_tokens = Counter(
            "mlxserve_prompt_cache_hit_tokens",
            "Prompt tokens taken from the prompt cache instead of being processed",
            ["model"], registry=r,
        )  # fmt: skip
        self.time_to_first_token = Histogram(
            "mlxserve_time_to_first_token_seconds",
            "From queueing a request to its first generated token",
            ["model"], buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.time_per_output_token = Histogram(
            "mlxserve_time_per_output_token_seconds",
            "Mean time between a request's generated tokens, one observation per request",
            ["model"], buckets=TPOT_BUCKETS, registry=r,
        )  # fmt: skip
        self.running = Gauge(
            "mlxserve_requests_running", "Requests generating (their prompt being processed "
            "or tokens being sampled)", ["model"], registry=r,
        )  # fmt: skip
        self.queued = Gauge(
            "mlxserve_requests_queued", "Requests waiting for a batch slot", ["model"],
            registry=r,
        )  # fmt: skip
        self.batch_slots = Gauge(
            "mlxserve_batch_slots", "Requests an instance generates at once", ["model"],
            registry=r,
        )  # fmt: skip
        self.batch_occupancy = Gauge(
            "mlxserve_batch_occupancy_ratio", "Running requests over batch slots", ["model"],
            registry=r,
        )  # fmt: skip
        self.kv_cache_bytes = Gauge(
            "mlxserve_kv_cache_bytes", "KV cache an instance reserves at its context length "
            "(the guardrail's estimate)", ["model"], registry=r,
        )  # fmt: skip
        self.model_memory_bytes = Gauge(
            "mlxserve_model_memory_bytes", "Estimated memory of a loaded instance (weights, "
            "KV windows, prompt cache, drafts, vision encoder)", ["model"], registry=r,
        )  # fmt: skip
        self.loads = Counter("mlxserve_model_loads", "Model loads", ["model"], registry=r)
        self.load_failures = Counter(
            "mlxserve_model_load_failures", "Model loads that failed", ["model"], registry=r
        )
        self.unloads = Counter("mlxserve_model_unloads", "Model unloads", ["model"], registry=r)
        self.load_duration = Histogram(
            "mlxserve_model_load_duration_seconds", "How long loading a model took",
            ["model"], buckets=LOAD_BUCKETS, registry=r,
        )  # fmt: skip
        self.unload_duration = Histogram(
            "mlxserve_model_unload_duration_seconds",
            "How long unloading took, from the decision to the memory given back "
            "(waiting for running requests included)",
            ["model"], buckets=LOAD_BUCKETS, registry=r,
        )  # fmt: skip
        Gauge(
            "mlxserve_process_resident_memory_bytes",
            "Resident memory of the server process (the peak where the current figure "
            "cannot be read)", registry=r,
        ).set_function(resident_memory_bytes)  # fmt: skip
        Gauge(
            "mlxserve_process_peak_resident_memory_bytes",
            "Peak resident memory of the server process", registry=r,
        ).set_function(peak_memory_bytes)  # fmt: skip
        self.started_at = time.time()
        Gauge("mlxserve_process_start_time_seconds", "When the server started (Unix time)",
              registry=r).set(self.started_at)  # fmt: skip

    # --- the HTTP layer -----------------------------------------------------------------

    def observe_request(self, model: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(model, route, str(status)).inc()
        self.request_duration.labels(route).observe(seconds)

    # --- the manager (LifecycleObserver) ------------------------------------------------

    def loaded(
        self, instance_id: str, *, seconds: float, memory_bytes: int, kv_cache_bytes: int,
        batch_slots: int,
    ) -> ModelMeter:  # fmt: skip
        self.loads.labels(instance_id).inc()
        self.load_duration.labels(instance_id).observe(seconds)
        self.kv_cache_bytes.labels(instance_id).set(kv_cache_bytes)
        self.model_memory_bytes.labels(instance_id).set(memory_bytes)
        return ModelMeter(self, instance_id, batch_slots)

    def load_failed(self, model_key: str) -> None:
        self.load_failures.labels(model_key).inc()

    def unloaded(self, instance_id: str, *, seconds: float) -> None:
        self.unloads.labels(instance_id).inc()
        self.unload_duration.labels(instance_id).observe(seconds)
        # An unloaded instance has no memory, cache or requests: its gauges go away.
        for gauge in (
            self.kv_cache_bytes, self.model_memory_bytes, self.running, self.queued,
            self.batch_slots, self.batch_occupancy,
        ):  # fmt: skip
            with contextlib.suppress(KeyError):
                gauge.remove(instance_id)

    # --- reading ------------------------------------------------------------------------

    def text(self) -> bytes:
        """The registry in Prometheus' text exposition format."""
        return generate_latest(self.registry)

    def snapshot(self) -> dict[str, Any]:
        """The same registry as JSON: each family with its samples (name, labels, value)."""
        families: list[dict[str, Any]] = []
        for family in self.registry.collect():
            families.append(
                {
                    "name": family.name,
                    "type": family.type,
                    "help": family.documentation,
                    "samples": [
                        {"name": s.name, "labels": dict(s.labels), "value": s.value}
                        for s in family.samples
                        if not s.name.endswith("_created")
                    ],
                }
            )
        return {"time": time.time(), "families": families}
