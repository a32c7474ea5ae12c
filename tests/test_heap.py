"""The server keeps full garbage collections off its long-lived heap (``core/heap.py``): what
is alive after startup and after a model load is frozen, an unloaded model is still freed
(its threads end after the unload returns: the heap is thawed, not frozen again at once), and
garbage made later is still collected. Run in a child process, so that freezing the heap
does not touch this test session's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from tests.conftest import GGUF_KEY, MLX_KEY

CHILD = textwrap.dedent(
    """
    import gc, json, sys, time, weakref
    from starlette.testclient import TestClient
    from mlxserve.app import create_app
    from mlxserve.settings import Settings

    root, home, keys = sys.argv[1], sys.argv[2], sys.argv[3:]
    out = {"before": gc.get_freeze_count()}
    app = create_app(Settings(home=home, models_dir=root))
    manager = app.state.mlxserve.manager
    with TestClient(app) as client:
        out["started"] = gc.get_freeze_count()
        engines = []
        for key in keys:
            r = client.post("/api/v1/models/load", json={"model": key})
            assert r.status_code == 200, r.text
            out.setdefault("loaded", []).append(gc.get_freeze_count())
            engines.append(weakref.ref(manager.loaded()[-1].engine))
            r = client.post("/api/v1/models/unload", json={"instance_id": r.json()["instance_id"]})
            assert r.status_code == 200, r.text
        # An unloaded engine goes with the next collections (a cycle can take more than one
        # pass, its owner thread a moment to end); a frozen or leaked one never does.
        for _ in range(20):
            gc.collect()
            out["engines_alive"] = sum(e() is not None for e in engines)
            if not out["engines_alive"]:
                break
            time.sleep(0.1)

        class Cycle:
            pass

        made = Cycle()
        made.self = made
        alive = weakref.ref(made)
        del made
        gc.collect()
        out["later_garbage_alive"] = alive() is not None
    print(json.dumps(out))
    """
)


def test_long_lived_heap_is_frozen_and_unloaded_models_are_freed(models_root, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    args = [sys.executable, "-c", CHILD, str(models_root), str(tmp_path), GGUF_KEY, MLX_KEY]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["before"] == 0 and out["started"] > 10_000
    # Each load's modules and engine objects join the frozen heap (thawed by the unload
    # between them, then frozen again).
    assert out["started"] < out["loaded"][0] < out["loaded"][1]
    assert out["engines_alive"] == 0
    assert not out["later_garbage_alive"]
