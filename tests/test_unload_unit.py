"""Unloading, at the level of the owner thread and the manager's books: work sent to a
stopped engine fails instead of hanging, closing waits for the thread, and a model's memory
counts as used until its engine is really closed."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from backends.owner import OwnerThread
from mlxserve.core.manager import ModelManager
from mlxserve.settings import Settings


def test_work_sent_after_close_fails_at_once():
    owner = OwnerThread("t", max_queue=4)
    ran = []
    first = owner.call(lambda: ran.append("before"))
    owner.close()
    assert first.result(timeout=5) is None and ran == ["before"]
    late = owner.call(lambda: ran.append("after"))
    with pytest.raises(RuntimeError, match="unloaded"):
        late.result(timeout=5)
    assert ran == ["before"]


def test_close_waits_for_the_running_work_however_long():
    owner = OwnerThread("t", max_queue=4)
    release = threading.Event()
    done = []
    owner.call(lambda: (release.wait(), done.append(1)))
    closer = threading.Thread(target=owner.close)
    closer.start()
    time.sleep(0.3)
    assert closer.is_alive() and not done
    release.set()
    closer.join(timeout=5)
    assert done == [1] and not closer.is_alive()


def test_memory_counts_as_used_until_the_engine_is_closed(tmp_path):
    async def run() -> None:
        settings = Settings(home=tmp_path, models_dir=tmp_path)
        manager = ModelManager(settings, SimpleNamespace())  # type: ignore[arg-type]
        closing = asyncio.Event()
        closed = asyncio.Event()

        async def slow_close(instance: object) -> None:
            closing.set()
            await closed.wait()

        manager.loader.close = slow_close  # type: ignore[method-assign]
        instance = SimpleNamespace(id="m", holds=0, memory_bytes=1000, released=asyncio.Event())
        manager._instances["m"] = instance  # type: ignore[assignment]
        unload = asyncio.ensure_future(manager.unload("m"))
        await closing.wait()
        assert manager.loaded() == [] and manager._in_use() == 1000
        closed.set()
        await unload
        assert manager._in_use() == 0

    asyncio.run(run())
