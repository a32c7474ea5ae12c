"""The download API of a real server (``/api/v1/models/download``) against a hub on loopback:
LM Studio's shapes, a download that is then loaded and chatted with, a server killed halfway
that resumes with ``Range``, and bad requests refused before any file is touched."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server
from tests.hubserver import Hub, HubServer

REPO = "hub-test/tiny-qwen2-mlx"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _wait(url: str, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = httpx.get(f"{url}/api/v1/models/download/status/{job_id}", timeout=10).json()
        if status["status"] != "downloading":
            return status
        time.sleep(0.1)
    raise AssertionError("download did not finish")


@pytest.fixture
def hub(models_root, monkeypatch):
    hub = Hub()
    hub.add_repo(REPO, models_root / "mlxserve-test" / "tiny-qwen2-mlx")
    server = HubServer(hub)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield hub
    server.close()


def test_download_then_load_and_chat(hub, tmp_path):
    models = tmp_path / "models"
    hub.throttle = 0.002
    srv = Server(models, tmp_path)
    try:
        started = httpx.post(f"{srv.url}/api/v1/models/download", json={"model": REPO}).json()
        assert set(started) == {"job_id", "status", "total_size_bytes", "started_at"}
        assert started["status"] == "downloading" and started["started_at"].endswith("Z")
        listed = httpx.get(f"{srv.url}/api/v1/models").json()["models"]
        status = httpx.get(f"{srv.url}/api/v1/models/download/status/{started['job_id']}").json()
        if status["status"] == "downloading":
            # A model appears only once complete.
            assert REPO not in [m["key"] for m in listed]
        done = _wait(srv.url, started["job_id"])
        assert done["status"] == "completed"
        assert done["downloaded_bytes"] == done["total_size_bytes"] == started["total_size_bytes"]
        assert "completed_at" in done and "bytes_per_second" not in done
        again = httpx.post(f"{srv.url}/api/v1/models/download", json={"model": REPO}).json()
        assert again == {"status": "already_downloaded"}
        assert REPO in [m["key"] for m in httpx.get(f"{srv.url}/api/v1/models").json()["models"]]
        reply = httpx.post(
            f"{srv.url}/v1/chat/completions",
            json={"model": REPO, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            timeout=120,
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] > 0
    finally:
        srv.stop()


def test_killed_server_resumes_the_download(hub, models_root, tmp_path):
    models = tmp_path / "models"
    hub.throttle = 0.01  # about 6 MB/s: slow enough to kill it halfway
    srv = Server(models, tmp_path)
    partial = models / ".downloads" / "hub-test__tiny-qwen2-mlx" / "model.safetensors.incomplete"
    try:
        job = httpx.post(f"{srv.url}/api/v1/models/download", json={"model": REPO}).json()
        deadline = time.monotonic() + 60
        while not (partial.is_file() and partial.stat().st_size > 0):
            assert time.monotonic() < deadline, "no partial file appeared"
            time.sleep(0.05)
        status = httpx.get(f"{srv.url}/api/v1/models/download/status/{job['job_id']}").json()
        assert status["status"] == "downloading" and status["downloaded_bytes"] > 0
        assert "bytes_per_second" in status
    finally:
        srv.proc.kill()
        srv.stop()
    kept = partial.stat().st_size
    assert kept > 0
    # Nothing that loads was left behind.
    assert not (models / "hub-test").exists()
    hub.throttle = 0.0
    srv = Server(models, tmp_path)
    try:
        assert REPO not in [
            m["key"] for m in httpx.get(f"{srv.url}/api/v1/models").json()["models"]
        ]
        job = httpx.post(f"{srv.url}/api/v1/models/download", json={"model": REPO}).json()
        assert _wait(srv.url, job["job_id"])["status"] == "completed"
    finally:
        srv.stop()
    ranges = [r for m, p, r in hub.requests if m == "GET" and p.endswith("/model.safetensors")]
    assert ranges[-1] == f"bytes={kept}-"
    source = models_root / "mlxserve-test" / "tiny-qwen2-mlx" / "model.safetensors"
    assert _sha(models / REPO / "model.safetensors") == _sha(source)
    assert not (models / ".downloads").exists()


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"model": ""},
        {"model": "../../x"},
        {"model": "a/../../b"},
        {"model": "..%2F..%2Fx"},
        {"model": "/etc/passwd"},
        {"model": "https://evil.example/a/b"},
        {"model": "a/b", "unknown": 1},
        {"model": "a/b@../x"},
        {"model": 5},
    ],
)
def test_bad_download_requests(server, body):
    r = httpx.post(f"{server.url}/api/v1/models/download", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]


def test_unknown_job(server):
    r = httpx.get(f"{server.url}/api/v1/models/download/status/job_nothing")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "download_not_found"
