"""``mlxserve get`` of a GGUF vision repository, from a hub on loopback: the projector
(``mmproj-*.gguf``) lands beside the model, and the listings then say vision."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
from script_loader import load_script

from tests.conftest import MODELS_CACHE, PUBLISHER, Server
from tests.hubserver import Hub, HubServer

pytest.importorskip("PIL.Image")

HUB_REPO = "hub-test/tiny-qwen2-vl-GGUF"
VISION_ROOT = MODELS_CACHE.parent / "vision-models"


@pytest.fixture
def hub(monkeypatch):
    module = load_script("make_vision_models")
    folder = module.generate(VISION_ROOT, publisher=PUBLISHER)["gguf"]
    hub = Hub()
    hub.add_repo(HUB_REPO, folder)
    server = HubServer(hub)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield hub
    server.close()


def _cli(*args: str, home) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLXSERVE_HOME": str(home), "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "mlxserve", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    return proc


def test_get_of_a_gguf_vision_repo_fetches_the_projector(hub, tmp_path):
    models, home = tmp_path / "models", tmp_path / "home"
    home.mkdir()
    srv = Server(models, home)
    try:
        got = _cli("get", HUB_REPO, "--port", str(srv.port), home=home)
        assert f"Downloaded {HUB_REPO}" in got.stdout, got.stdout
        folder = models / HUB_REPO
        names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        assert names == ["mmproj-tiny-qwen2-vl-f32.gguf", "tiny-qwen2-vl-f32.gguf"], names
        served = {path for _, path, _ in hub.requests}
        assert any(p.endswith("/mmproj-tiny-qwen2-vl-f32.gguf") for p in served), served
        v1 = httpx.get(srv.url + "/api/v1/models", timeout=10).json()["models"]
        (entry,) = [m for m in v1 if m["key"].startswith(HUB_REPO)]
        assert entry["capabilities"]["vision"] is True, entry
        listing = _cli("ls", "--models-dir", str(models), "--json", home=home)
        (row,) = [m for m in json.loads(listing.stdout) if m["key"] == entry["key"]]
        assert row["vision"] is True, row
    finally:
        srv.stop()
