"""Security and overload against a real server: tokens through the official SDKs and the CLI,
the host guard and body limit under uvicorn, and a full queue answering 503 + Retry-After
(robustness.md S1, S4, S11, L1, C1)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import anthropic
import httpx
import openai
import pytest

from tests.conftest import MLX_KEY, Server

LIMIT = 65536
HI = [{"role": "user", "content": "hi"}]


def token_cli(home, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mlxserve", "token", *args, "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def guarded(models_root, tmp_path_factory, monkeypatch_module):
    home = tmp_path_factory.mktemp("home-auth")
    monkeypatch_module.setenv("MLXSERVE_MAX_QUEUE_PER_MODEL", "1")
    srv = Server(models_root, home, "--require-auth", "--max-body-bytes", str(LIMIT))
    created = token_cli(home, "create", "--name", "e2e")
    assert created.returncode == 0, created.stderr
    srv.token = created.stdout.strip()
    srv.home = home
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def bearer(srv) -> dict[str, str]:
    return {"Authorization": f"Bearer {srv.token}"}


def test_cli_prints_the_token_once_and_lists_it(guarded):
    listed = token_cli(guarded.home, "ls")
    assert listed.returncode == 0 and "e2e" in listed.stdout
    assert guarded.token not in listed.stdout
    assert guarded.token.split(":")[0].removeprefix("sk-lm-") in listed.stdout


def test_openai_sdk_with_and_without_a_token(guarded):
    good = openai.OpenAI(base_url=guarded.url + "/v1", api_key=guarded.token, max_retries=0)
    assert MLX_KEY in [m.id for m in good.models.list().data]
    r = good.chat.completions.create(model=MLX_KEY, messages=HI, max_tokens=2)
    assert r.choices[0].message.content is not None
    bad = openai.OpenAI(base_url=guarded.url + "/v1", api_key="sk-lm-AAAAAAAA:x", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.models.list()
    assert err.value.code == "invalid_api_key"


def test_anthropic_sdk_with_x_api_key_and_bearer(guarded):
    for client in (
        anthropic.Anthropic(base_url=guarded.url, api_key=guarded.token, max_retries=0),
        anthropic.Anthropic(base_url=guarded.url, auth_token=guarded.token, max_retries=0),
    ):
        msg = client.messages.create(model=MLX_KEY, max_tokens=2, messages=HI)
        assert msg.type == "message"
    bad = anthropic.Anthropic(base_url=guarded.url, api_key="nope", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as err:
        bad.messages.create(model=MLX_KEY, max_tokens=2, messages=HI)
    assert err.value.body["error"]["type"] == "authentication_error"


def test_lmstudio_routes_need_the_token_and_health_does_not(guarded):
    r = httpx.get(guarded.url + "/api/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(guarded.url + "/api/v1/models", headers=bearer(guarded)).status_code == 200
    assert httpx.get(guarded.url + "/health").status_code == 200


def test_revoking_with_the_cli_takes_effect_at_once(guarded):
    made = token_cli(guarded.home, "create", "--name", "short-lived")
    token = made.stdout.strip()
    headers = {"Authorization": f"Bearer {token}"}
    assert httpx.get(guarded.url + "/v1/models", headers=headers).status_code == 200
    assert token_cli(guarded.home, "rm", "short-lived").returncode == 0
    assert httpx.get(guarded.url + "/v1/models", headers=headers).status_code == 401
    assert token_cli(guarded.home, "rm", "short-lived").returncode == 1


def test_dns_rebinding_host_is_refused(guarded):
    for path in ("/v1/models", "/api/v1/models/load", "/health"):
        r = httpx.post(
            guarded.url + path,
            json={"model": MLX_KEY},
            headers={**bearer(guarded), "Host": f"evil.example:{guarded.port}"},
        )
        assert r.status_code == 403, (path, r.text)
    r = httpx.get(guarded.url + "/v1/models", headers={**bearer(guarded), "Host": "localhost"})
    assert r.status_code == 200


def test_body_limit_under_uvicorn(guarded):
    url = guarded.url + "/v1/chat/completions"
    big = b'{"model": "' + b"x" * (LIMIT * 4) + b'"}'
    r = httpx.post(url, content=big, headers=bearer(guarded))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():
        for _ in range(64):
            yield b"x" * 8192

    r = httpx.post(url, content=chunks(), headers=bearer(guarded))
    assert r.status_code == 413
    r = httpx.post(
        guarded.url + "/v1/messages", content=chunks(), headers={"x-api-key": guarded.token}
    )
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
    # the server is not wedged by the unread rest of those bodies
    assert httpx.get(guarded.url + "/v1/models", headers=bearer(guarded)).status_code == 200


def test_tokens_never_reach_the_server_log(guarded):
    httpx.get(guarded.url + "/v1/models", headers={"Authorization": "Bearer sk-lm-WRONGWRO:x"})
    log = guarded.log_path.read_text()
    assert guarded.token not in log and guarded.token.split(":")[1] not in log
    assert "sk-lm-WRONGWRO" not in log


def _instance(srv, key):
    loaded = httpx.get(srv.url + "/health", headers=bearer(srv), timeout=5).json()["loaded"]
    return next((i for i in loaded if i["id"] == key), None)


def test_full_queue_is_503_with_retry_after(guarded):
    """max_queue_per_model=1: while one stream runs, the next request is refused at once with
    503 + Retry-After (which the official SDKs retry), in each dialect; nothing hangs."""
    client = httpx.Client(headers=bearer(guarded), timeout=60)
    client.post(
        guarded.url + "/v1/chat/completions",
        json={"model": MLX_KEY, "messages": HI, "max_tokens": 1},
    )
    started = threading.Event()
    body = {
        "model": MLX_KEY,
        "messages": HI,
        "stream": True,
        "max_tokens": 3000,
        "ignore_eos": True,
        "temperature": 0,
    }

    def long_stream() -> None:
        with client.stream("POST", guarded.url + "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    started.set()
                    if stop.is_set():
                        break

    stop = threading.Event()
    runner = threading.Thread(target=long_stream)
    runner.start()
    try:
        assert started.wait(30)
        r = client.post(
            guarded.url + "/v1/chat/completions",
            json={"model": MLX_KEY, "messages": HI, "max_tokens": 2},
        )
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "overloaded_error"
        r = client.post(
            guarded.url + "/v1/messages", json={"model": MLX_KEY, "messages": HI, "max_tokens": 2}
        )
        assert r.status_code == 503 and "retry-after" in r.headers
        assert r.json()["error"]["type"] == "overloaded_error"
        sdk = openai.OpenAI(base_url=guarded.url + "/v1", api_key=guarded.token, max_retries=0)
        with pytest.raises(openai.InternalServerError) as err:
            sdk.chat.completions.create(model=MLX_KEY, messages=HI, max_tokens=2)
        assert err.value.status_code == 503
    finally:
        stop.set()
        runner.join(30)
    deadline = time.monotonic() + 20
    while (_instance(guarded, MLX_KEY) or {}).get("pending") and time.monotonic() < deadline:
        time.sleep(0.05)
    r = client.post(
        guarded.url + "/v1/chat/completions",
        json={"model": MLX_KEY, "messages": HI, "max_tokens": 2},
    )
    assert r.status_code == 200
