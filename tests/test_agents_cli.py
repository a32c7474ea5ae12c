"""End to end: the real Claude Code and Codex command-line clients (the npm packages
``scripts/setup`` installs into .cache/node) each complete a turn against a real server, on
an MLX and a GGUF model, configured with exactly the settings README.md gives.

The model is the tiny Qwen2 with a 64k context that ends its replies by itself after a few
tokens (``make_test_models.generate(..., ends_turns=True)``): the clients send their whole
first request (about 12k tokens of system prompt and tools) and treat a reply cut off by
max_tokens as an error. Nothing may leave the machine: each client gets a temporary HOME,
its own switches against telemetry and update checks, and a proxy that leads nowhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib

from tests.conftest import MODELS_CACHE, PUBLISHER, REPO, Server

BIN = REPO / ".cache" / "node" / "node_modules" / ".bin"
README = REPO / "README.md"
AGENT = "tiny-qwen2-agent"
KEYS = {"mlx": f"{PUBLISHER}/{AGENT}-mlx", "gguf": f"{PUBLISHER}/{AGENT}-gguf"}
README_URL = "http://127.0.0.1:1234"
README_MODEL = "mlxserve/demo-random-weights-qwen2-mlx"
# Anything that is not loopback goes to a port where nothing listens.
OFFLINE = {
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
}
TIMEOUT = 400


def readme_block(marker: str) -> str:
    """The fenced block after ``<!-- marker -->`` in README.md."""
    found = re.search(rf"<!-- {marker} -->\n```\w*\n(.*?)```", README.read_text(), re.S)
    assert found, f"README.md has no block marked {marker}"
    return found.group(1)


def cli(name: str) -> Path:
    if shutil.which("node") is None:
        pytest.skip("Node.js is not installed (scripts/setup installs the agent CLIs with npm)")
    path = BIN / name
    assert path.exists(), f"{path} is missing: run scripts/setup"
    return path


@pytest.fixture(scope="module")
def agent_server(make_models, tmp_path_factory):
    make_models.generate(
        MODELS_CACHE, publisher=PUBLISHER, name=AGENT, seed=0, context=65536, ends_turns=True
    )
    home = tmp_path_factory.mktemp("agents-home")
    srv = Server(MODELS_CACHE, home, "--no-auto-evict", "--context-length", "65536")
    yield srv
    srv.stop()


def served(srv: Server, request_line: str) -> int:
    return srv.log_path.read_text(errors="replace").count(f'"{request_line} HTTP/1.1" 200')


@pytest.mark.parametrize("fmt", ["mlx", "gguf"])
def test_claude_code_completes_a_turn(agent_server, tmp_path, fmt):
    claude = cli("claude")
    env = {**os.environ, **OFFLINE, "HOME": str(tmp_path)}
    for line in readme_block("claude-code-settings").splitlines():
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").partition("=")
            value = value.replace(README_URL, agent_server.url).replace(README_MODEL, KEYS[fmt])
            env[name] = value
    before = served(agent_server, "POST /v1/messages?beta=true")
    proc = subprocess.run(
        [str(claude), "-p", "say hi", "--output-format", "json"],
        env=env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["type"] == "result" and result["subtype"] == "success", result
    assert result["is_error"] is False and result["terminal_reason"] == "completed", result
    assert result["stop_reason"] == "end_turn"
    assert result["modelUsage"].keys() == {KEYS[fmt]}
    assert served(agent_server, "POST /v1/messages?beta=true") > before


@pytest.mark.parametrize("fmt", ["mlx", "gguf"])
def test_codex_exec_completes_a_turn(agent_server, tmp_path, fmt):
    codex = cli("codex")
    settings = readme_block("codex-settings")
    config = tomllib.loads(settings)  # the README's block is valid TOML as it stands
    assert config["model_providers"]["mlxserve"]["wire_api"] == "responses"
    codex_home = tmp_path / "codex"
    codex_home.mkdir()
    text = settings.replace(README_URL, agent_server.url).replace(README_MODEL, KEYS[fmt])
    (codex_home / "config.toml").write_text(text)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, **OFFLINE, "HOME": str(tmp_path), "CODEX_HOME": str(codex_home)}
    before = served(agent_server, "POST /v1/responses")
    proc = subprocess.run(
        [str(codex), "exec", "--skip-git-repo-check", "--json", "say hi"],
        env=env,
        cwd=work,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    kinds = [e.get("type") for e in events]
    assert "turn.completed" in kinds, proc.stdout[-3000:]
    assert not [e for e in events if e.get("type") in ("error", "turn.failed")], events
    usage = next(e for e in events if e["type"] == "turn.completed")["usage"]
    assert usage["input_tokens"] > 4000  # the whole first request was read
    assert served(agent_server, "POST /v1/responses") > before
