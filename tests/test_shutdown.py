"""SIGTERM with requests in flight (robustness.md G1): each open stream ends with a terminal
event in its dialect and a proper end of body, a non-streamed generation gets 503 +
Retry-After, the process exits 0, and the chat database is intact (WAL)."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time

import httpx
import pytest

from tests.conftest import GGUF_KEY, MLX_KEY, Server

HI = [{"role": "user", "content": "hi"}]
LONG = {"max_tokens": 4000, "ignore_eos": True, "temperature": 0}
STREAMS = {
    "openai": ("/v1/chat/completions", {"model": MLX_KEY, "messages": HI, "stream": True, **LONG}),
    "anthropic": ("/v1/messages", {"model": GGUF_KEY, "messages": HI, "stream": True, **LONG}),
    "responses": (
        "/v1/responses",
        {
            "model": MLX_KEY,
            "input": "hi",
            "stream": True,
            "max_output_tokens": 4000,
            "ignore_eos": True,
            "temperature": 0,
        },
    ),
}


class StreamReader(threading.Thread):
    """Reads one SSE response to its end; records its events and how it ended."""

    def __init__(self, url: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.events: list[str] = []
        self.error: Exception | None = None
        self.first = threading.Event()

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url, json=self.body, timeout=60) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:])
                        if len(self.events) >= 3:
                            self.first.set()
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            self.error = exc
        finally:
            self.first.set()


@pytest.fixture
def fresh_server(models_root, tmp_path):
    (tmp_path / "home").mkdir()
    srv = Server(models_root, tmp_path / "home", "--no-auto-evict")
    yield srv
    if srv.proc.poll() is None:
        srv.stop()


def test_sigterm_ends_streams_cleanly_and_exits_zero(fresh_server, tmp_path):
    srv = fresh_server
    # A stored chat turn, committed before the shutdown.
    stored = httpx.post(
        srv.url + "/api/v1/chat",
        json={"model": MLX_KEY, "input": "hi", "max_output_tokens": 3},
        timeout=60,
    )
    assert stored.status_code == 200, stored.text
    response_id = stored.json()["response_id"]
    httpx.post(
        srv.url + "/v1/messages",
        json={"model": GGUF_KEY, "messages": HI, "max_tokens": 1},
        timeout=60,
    )

    readers = {name: StreamReader(srv.url + path, body) for name, (path, body) in STREAMS.items()}
    for reader in readers.values():
        reader.start()
    for reader in readers.values():
        assert reader.first.wait(60)
    whole: dict = {}

    def unstreamed() -> None:
        whole["r"] = httpx.post(
            srv.url + "/v1/chat/completions",
            json={"model": MLX_KEY, "messages": HI, **LONG},
            timeout=60,
        )

    waiter = threading.Thread(target=unstreamed, daemon=True)
    waiter.start()
    # SIGTERM only once the unstreamed request is generating too (3 requests on the MLX model)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        loaded = {i["id"]: i["pending"] for i in srv.health()["loaded"]}
        if loaded.get(MLX_KEY, 0) >= 3:
            break
        time.sleep(0.02)
    else:
        pytest.fail(f"the unstreamed request never started: {srv.health()}")
    for reader in readers.values():
        assert reader.error is None and len(reader.events) >= 3, (reader.error, reader.events)

    signalled = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=30) == 0, srv.log_path.read_text()[-3000:]
    print(f"exited {time.monotonic() - signalled:.2f}s after SIGTERM")
    for reader in readers.values():
        reader.join(10)
    waiter.join(10)

    for name, reader in readers.items():
        # a clean end of body (no truncated chunk), ending on the dialect's terminal error
        assert reader.error is None, (name, reader.error)
        last = json.loads(reader.events[-1])
        if name == "openai":
            assert last["error"]["code"] == "server_shutting_down"
            assert "[DONE]" not in reader.events
        elif name == "anthropic":
            assert last == {
                "type": "error",
                "error": {"type": "overloaded_error", "message": last["error"]["message"]},
            }
        else:
            assert last["type"] == "error" and last["code"] == "server_shutting_down"
            sequence = [json.loads(e)["sequence_number"] for e in reader.events]
            assert sequence == list(range(len(sequence)))
    r = whole["r"]
    assert r.status_code == 503 and r.headers["retry-after"], r.text
    assert r.json()["error"]["code"] == "server_shutting_down"

    log = srv.log_path.read_text()
    assert "ending the requests in flight" in log
    assert "Traceback" not in log and "Cancel" not in log, log[-3000:]
    db = sqlite3.connect(srv.log_path.parent / "chats.sqlite3")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        ids = {row[0] for row in db.execute("SELECT id FROM responses")}
    finally:
        db.close()
    assert response_id in ids
