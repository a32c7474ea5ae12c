"""``mlxserve chat`` and ``mlxserve log stream`` against streams that misbehave: hostile
control characters, a failed reply, a server that dies mid-stream (``mlxserve.cli.chat``)."""

from __future__ import annotations

import io
import socket
import struct
import threading

import pytest

from mlxserve import cli
from mlxserve.cli.http import Client
from tests.conftest import free_port


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXSERVE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLXSERVE_PORT", str(free_port()))
    monkeypatch.delenv("MLXSERVE_HOST", raising=False)
    monkeypatch.delenv("MLXSERVE_API_TOKEN", raising=False)


def test_log_stream_neutralises_terminal_escapes(monkeypatch, capsys):
    events = [
        {"type": "request", "id": 1, "method": "GET", "path": "/v1/\x1b]0;pwned\x07\n\x9b2J"},
        {"type": "response", "id": 1, "status": 404, "duration_ms": 1, "body": "\x1b[2Jx\x7f"},
    ]
    monkeypatch.setattr(Client, "stream_events", lambda self, *a, **k: iter(events))
    assert cli.main(["log", "stream"]) == 1  # the stream ended: the server closed it
    out = capsys.readouterr().out
    for raw in ("\x1b", "\x07", "\x9b", "\x7f"):
        assert raw not in out
    assert "/v1/\\x1b]0;pwned\\x07\\x0a\\x9b2J" in out and "\\x1b[2Jx\\x7f" in out


def test_chat_survives_a_failed_reply(monkeypatch, capsys):
    sent: list[list[dict]] = []

    def stream_events(self, method, path, body=None):
        sent.append(list(body["messages"]))
        if len(sent) == 1:
            yield {"error": {"message": "The prompt is longer than the context."}}
            return
        yield {"choices": [{"delta": {"content": "fine"}}]}

    monkeypatch.setattr(Client, "is_up", lambda self: {"status": "ok"})
    monkeypatch.setattr(Client, "stream_events", stream_events)
    monkeypatch.setattr("sys.stdin", io.StringIO("too long\nshort\n"))
    assert cli.main(["chat", "some/model"]) == 0
    captured = capsys.readouterr()
    assert "The prompt is longer than the context." in captured.err
    assert "fine" in captured.out
    # The failed turn is not resent with the next one.
    assert [m["content"] for m in sent[1]] == ["short"]


def _server_that_dies(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    conn.recv(65536)
    conn.sendall(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    # RST instead of FIN: the client's next read fails with ECONNRESET (httpx.ReadError).
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
    listener.close()


def test_server_dying_mid_stream_is_one_clear_line(monkeypatch, capsys):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    monkeypatch.setenv("MLXSERVE_PORT", str(listener.getsockname()[1]))
    thread = threading.Thread(target=_server_that_dies, args=(listener,))
    thread.start()
    try:
        assert cli.main(["log", "stream"]) == 1
    finally:
        thread.join(10)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "closed the connection" in err or "failed" in err
