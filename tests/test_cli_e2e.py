"""A newcomer's session through the command line, each step a real ``mlxserve`` process:
``server start``, ``get`` from a hub on loopback, ``ls``, ``load``, ``ps``, ``chat`` (two
turns), ``log stream``, ``unload``, ``server stop``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.hubserver import Hub, HubServer

REPO = "hub-test/tiny-qwen2-mlx"


@pytest.fixture
def hub(models_root):
    hub = Hub()
    hub.add_repo(REPO, models_root / "mlxserve-test" / "tiny-qwen2-mlx")
    server = HubServer(hub)
    yield server
    server.close()


class Cli:
    def __init__(self, tmp: Path, hub_url: str) -> None:
        self.home = tmp / "home"
        self.models = tmp / "models"
        self.env = {
            **os.environ,
            "MLXSERVE_HOME": str(self.home),
            "MLXSERVE_PORT": str(free_port()),
            "HF_ENDPOINT": hub_url,
            "COLUMNS": "200",
        }
        for name in ("MLXSERVE_HOST", "MLXSERVE_API_TOKEN", "MLXSERVE_MODELS_DIR"):
            self.env.pop(name, None)

    def run(
        self, *args: str, stdin: str | None = None, ok: bool = True
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "-m", "mlxserve", *args],
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert "Traceback" not in proc.stderr, proc.stderr
        if ok:
            assert proc.returncode == 0, f"{args}: {proc.stdout}\n{proc.stderr}"
        return proc

    def stop(self) -> None:
        self.run("server", "stop", ok=False)


@pytest.fixture
def cli(tmp_path, hub):
    c = Cli(tmp_path, hub.url)
    yield c
    c.stop()


def test_newcomer_session(cli):
    out = cli.run("server", "start", "--models-dir", str(cli.models)).stdout
    assert "Server started at http://127.0.0.1:" in out
    record = json.loads((cli.home / "server.json").read_text())
    assert (cli.home / "logs" / "server.log").is_file() and record["pid"] > 0

    status = cli.run("server", "status").stdout
    assert "The server is running" in status and "No models are loaded." in status

    logs = subprocess.Popen(
        [sys.executable, "-m", "mlxserve", "log", "stream", "--json"],
        env=cli.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    events: list[dict] = []
    reader = threading.Thread(
        target=lambda: events.extend(json.loads(line) for line in logs.stdout), daemon=True
    )
    reader.start()
    try:
        got = cli.run("get", REPO)
        assert f"Downloaded {REPO}" in got.stdout
        assert "Downloading" in got.stderr  # the progress bar
        assert "is already downloaded" in cli.run("get", REPO).stdout

        listing = cli.run("ls", "--models-dir", str(cli.models)).stdout
        assert REPO in listing and "mlx" in listing

        loaded = cli.run("load", REPO, "--context-length", "1024", "--ttl", "600").stdout
        assert f"Loaded {REPO} as '{REPO}'" in loaded and "context 1024" in loaded

        ps = cli.run("ps").stdout
        assert REPO in ps and "1024" in ps and "TTL LEFT" in ps
        (instance,) = json.loads(cli.run("ps", "--json").stdout)
        assert instance["context_length"] == 1024 and 0 < instance["ttl_left_seconds"] <= 600

        chat = cli.run(
            "chat",
            "--max-tokens",
            "8",
            "--temperature",
            "0",
            stdin="Hello there\n/clear\nWhat next?\n/exit\nnever sent\n",
        )
        assert chat.stdout.count(">>> ") == 2 and "never sent" not in chat.stdout
        assert chat.stderr.count("tok/s") == 2 and "Conversation cleared." in chat.stderr
    finally:
        logs.terminate()
        logs.wait(timeout=10)
        reader.join(timeout=10)
    requests = [e for e in events if e["type"] == "request"]
    paths = [e["path"] for e in requests]
    assert "/api/v1/models/download" in paths and "/v1/chat/completions" in paths
    chats = [e for e in requests if e["path"] == "/v1/chat/completions"]
    assert chats[0]["body"]["messages"][-1]["content"] == "Hello there"
    # /clear forgot the first turn.
    assert [m["content"] for m in chats[1]["body"]["messages"]] == ["What next?"]
    responses = [e for e in events if e["type"] == "response"]
    assert any(e["path"] == "/v1/chat/completions" and e["status"] == 200 for e in responses)

    assert f"Unloaded '{REPO}'." in cli.run("unload", "--all").stdout
    assert "No models are loaded" in cli.run("ps").stdout
    assert "Server stopped" in cli.run("server", "stop").stdout
    assert not (cli.home / "server.json").exists()
    gone = cli.run("ps", ok=False)
    assert gone.returncode == 1 and "No mlxserve server is running" in gone.stderr


def test_token_and_serve_options_pass_through(cli):
    cli.run("server", "start", "--models-dir", str(cli.models), "--require-auth", "--no-jit")
    refused = cli.run("ps", ok=False)
    assert refused.returncode == 1
    assert "MLXSERVE_API_TOKEN" in refused.stderr and "Traceback" not in refused.stderr
    token = cli.run("token", "create", "--name", "cli-test").stdout.split()[0]
    assert "No models are loaded" in cli.run("ps", "--api-token", token).stdout
    cli.env["MLXSERVE_API_TOKEN"] = token
    assert cli.run("ps", "--json").stdout.strip() == "[]"
    missing = cli.run("get", "hub-test/not-on-the-hub", ok=False)
    assert missing.returncode == 1 and "not found on the model hub" in missing.stderr
