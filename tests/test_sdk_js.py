"""End to end: the official LM Studio TypeScript SDK (``@lmstudio/sdk`` 1.5.0, installed by
scripts/setup into .cache/node) against a real server, run by tests/sdk_js/sdk_check.cjs.
Also the SDKs against a server that requires API tokens."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import lmstudio as lms
import pytest

from tests.conftest import EMBED_GGUF_KEY, GGUF_KEY, MLX_KEY, REPO

NODE_MODULES = REPO / ".cache" / "node" / "node_modules"
SCRIPT = REPO / "tests" / "sdk_js" / "sdk_check.cjs"


def run_checks(port: int, script: Path = SCRIPT, **args) -> list[dict]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed (scripts/setup installs the SDK when it is)")
    if not (NODE_MODULES / "@lmstudio" / "sdk" / "package.json").exists():
        pytest.skip("@lmstudio/sdk is not installed in .cache/node: run scripts/setup")
    env = {**os.environ, "NODE_PATH": str(NODE_MODULES)}
    proc = subprocess.run(
        [node, str(script), json.dumps({"port": port, **args})],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    failed = [r for r in results if not r["ok"]]
    assert results and not failed and proc.returncode == 0, (
        json.dumps(failed, indent=2) + "\n" + proc.stderr[-3000:]
    )
    return results


def test_js_sdk(server, embedding_models):
    results = run_checks(server.port, llms=[MLX_KEY, GGUF_KEY], embedder=EMBED_GGUF_KEY)
    checks = {r["check"] for r in results}
    for tag in ("tiny-qwen2-mlx", "tiny-qwen2-gguf"):
        for name in ("respond streamed", "cancel gives userStopped", "structured output"):
            assert f"{tag}: {name}" in checks
        assert f"{tag}: act with a forced tool call" in checks
    streamed = next(r for r in results if r["check"] == "tiny-qwen2-gguf: respond streamed")
    assert streamed["stats"]["predictedTokensCount"] == 6


def test_js_sdk_with_api_token(auth_server):
    srv, token = auth_server
    identifier, passkey = token.removeprefix("sk-lm-").split(":")
    run_checks(
        srv.port,
        quick=True,
        llms=[],
        embedder=EMBED_GGUF_KEY,
        clientIdentifier=identifier,
        clientPasskey=passkey,
    )
    run_checks(srv.port, expectAuthFailure=True, llms=[], embedder=EMBED_GGUF_KEY)


def test_python_sdk_refused_without_token(auth_server):
    # lmstudio 1.5.0 cannot send a token (1.6 adds api_token): it authenticates as a guest,
    # and the refusal's error string trips its error constructor (a ValueError, fixed in 1.6).
    srv, _ = auth_server
    with (
        lms.Client(srv.url.removeprefix("http://")) as client,
        pytest.raises((lms.LMStudioServerError, ValueError)),
    ):
        client.list_downloaded_models()
