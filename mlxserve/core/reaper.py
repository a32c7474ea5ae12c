"""The idle reaper: unloads instances idle past their TTL, and instances a later
just-in-time load marked for eviction once they are idle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from mlxserve.core.instance import Loaded, is_busy

log = logging.getLogger("mlxserve.manager")

# While a model that has a TTL is busy, how often the reaper looks at it again (seconds).
BUSY_RECHECK_SECONDS = 1.0
# How long an instance marked for eviction must stay idle before it goes: long enough that
# a client sending one request after another keeps the model it is using.
EVICT_IDLE_SECONDS = 2.0


class IdleReaper:
    """One task that sleeps until the next instance could be due and unloads what is."""

    def __init__(
        self,
        instances: Callable[[], list[Loaded]],
        retire: Callable[[Loaded, str], Awaitable[None]],
        clock: Callable[[], float],
    ) -> None:
        self._instances = instances
        self._retire = retire
        self._clock = clock
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        """Look again now (a TTL changed or an eviction was deferred)."""
        self._wake.set()

    def ttl_left(self, instance: Loaded) -> float | None:
        """Seconds until ``instance`` is unloaded for idleness (its whole TTL while busy);
        None without a TTL."""
        if instance.ttl is None:
            return None
        if is_busy(instance):
            return instance.ttl
        return max(instance.last_used + instance.ttl - self._clock(), 0.0)

    @staticmethod
    def _limit(instance: Loaded) -> tuple[float, str] | None:
        """How long it may stay idle, and why it goes then."""
        if instance.evict_when_idle and (instance.ttl is None or instance.ttl > EVICT_IDLE_SECONDS):
            return EVICT_IDLE_SECONDS, "auto-evicted for a just-in-time load, now idle"
        if instance.ttl is not None:
            return instance.ttl, f"idle for {instance.ttl:g}s (TTL)"
        return None

    async def reap(self) -> float | None:
        """Unload the instances idle past their limit; returns seconds until the next look."""
        now = self._clock()
        wait: float | None = None
        for instance in self._instances():
            limit = self._limit(instance)
            if limit is None:
                continue
            if is_busy(instance):
                instance.busy_seen = True
                wait = min(wait or BUSY_RECHECK_SECONDS, BUSY_RECHECK_SECONDS)
                continue
            if instance.busy_seen:
                # Its work ended since the last look: idle time counts from now.
                instance.busy_seen = False
                instance.last_used = max(instance.last_used, now)
            idle_for, reason = limit
            left = instance.last_used + idle_for - now
            if left <= 0:
                await self._retire(instance, reason)
            else:
                wait = left if wait is None else min(wait, left)
        return wait

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                wait = await self.reap()
            except Exception:
                log.exception("unloading idle models failed; trying again shortly")
                wait = BUSY_RECHECK_SECONDS
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="mlxserve-ttl")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
