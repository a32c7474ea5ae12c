"""The routes the web app needs beyond LM Studio's, against real servers: stored chats (list,
get, rename, delete, after a restart too), OpenAI's GET/DELETE /v1/responses/{id}, hub search
(``mlxserve search`` too), cancelling and resuming a download, and deleting a model."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest
from openai import NotFoundError, OpenAI

from tests.conftest import GGUF_KEY, MLX_KEY, Server
from tests.hubserver import Hub, HubServer

MLX_REPO = "hub-test/tiny-qwen2-mlx"
GGUF_REPO = "hub-test/tiny-qwen2-GGUF"


@pytest.fixture(scope="module")
def hub(models_root, tmp_path_factory):
    hub = Hub()
    hub.add_repo(MLX_REPO, models_root / "mlxserve-test" / "tiny-qwen2-mlx", downloads=10)
    # A GGUF repository with two quantizations (the same file under two names).
    folder = tmp_path_factory.mktemp("gguf-repo")
    source = models_root / "mlxserve-test" / "tiny-qwen2-gguf" / "tiny-qwen2-f32.gguf"
    os.link(source, folder / "tiny-qwen2-F32.gguf")
    (folder / "tiny-qwen2-Q8_0.gguf").write_bytes(source.read_bytes()[: 1 << 20])
    hub.add_repo(GGUF_REPO, folder, downloads=50)
    hub.add_repo("hub-test/unrelated-mlx", models_root / "mlxserve-test" / "tiny-qwen2-mlx")
    server = HubServer(hub)
    yield hub, server.url
    server.close()


@pytest.fixture(scope="module")
def hub_server(hub, tmp_path_factory):
    _, url = hub
    old = os.environ.get("HF_ENDPOINT")
    os.environ["HF_ENDPOINT"] = url
    try:
        srv = Server(tmp_path_factory.mktemp("models"), tmp_path_factory.mktemp("home"))
    finally:
        if old is None:
            os.environ.pop("HF_ENDPOINT")
        else:
            os.environ["HF_ENDPOINT"] = old
    yield srv
    srv.stop()


def chat(url: str, text: str, previous: str | None = None) -> dict:
    # GGUF: it loads in about a second, and this test loads it twice (a restart).
    body = {"model": GGUF_KEY, "input": text, "temperature": 0, "max_output_tokens": 4}
    if previous:
        body["previous_response_id"] = previous
    r = httpx.post(url + "/api/v1/chat", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_chats_list_get_rename_delete_and_survive_a_restart(models_root, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    srv = Server(models_root, home)
    try:
        one = chat(srv.url, "First question about cats")["response_id"]
        two = chat(srv.url, "And dogs?", one)["response_id"]
        branch = chat(srv.url, "And birds?", one)["response_id"]
        other = chat(srv.url, "Another chat")["response_id"]
        listed = httpx.get(srv.url + "/api/v1/chats").json()
        assert listed["object"] == "list"
        assert [c["id"] for c in listed["data"]] == [other, one]
        first = listed["data"][1]
        assert first["title"] == "First question about cats"
        assert first["turns"] == 3 and first["head_response_id"] == branch
        assert first["model"] == GGUF_KEY
        detail = httpx.get(f"{srv.url}/api/v1/chats/{one}").json()
        assert [t["id"] for t in detail["responses"]] == [one, two, branch]
        assert [t["parent_id"] for t in detail["responses"]] == [None, one, one]
        assert detail["responses"][1]["input"] == [{"role": "user", "content": "And dogs?"}]
        assert detail["responses"][1]["output"][-1]["role"] == "assistant"
        r = httpx.patch(f"{srv.url}/api/v1/chats/{one}", json={"title": "  Pets  "})
        assert r.status_code == 200 and r.json()["title"] == "Pets"
        r = httpx.patch(f"{srv.url}/api/v1/chats/{one}", json={"title": ""})
        assert r.status_code == 400 and r.json()["error"]["param"] == "title"
        r = httpx.patch(f"{srv.url}/api/v1/chats/{one}", json={"name": "x"})
        assert r.status_code == 400
    finally:
        srv.stop()
    srv = Server(models_root, home)
    try:
        listed = httpx.get(srv.url + "/api/v1/chats").json()["data"]
        assert [c["title"] for c in listed] == ["Another chat", "Pets"]
        # Continues after the restart.
        three = chat(srv.url, "More?", two)["response_id"]
        listed = httpx.get(srv.url + "/api/v1/chats").json()["data"]
        assert listed[0]["id"] == one and listed[0]["head_response_id"] == three
        r = httpx.delete(f"{srv.url}/api/v1/chats/{one}")
        assert r.json() == {"id": one, "object": "chat.deleted", "deleted": True}
        assert [c["id"] for c in httpx.get(srv.url + "/api/v1/chats").json()["data"]] == [other]
        r = httpx.get(f"{srv.url}/api/v1/chats/{one}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "chat_not_found"
        assert httpx.delete(f"{srv.url}/api/v1/chats/{one}").status_code == 404
        # Its turns went with it.
        r = chat_status = httpx.post(
            srv.url + "/api/v1/chat",
            json={"model": GGUF_KEY, "input": "x", "previous_response_id": three},
        )
        assert chat_status.status_code == 404, r.text
        assert httpx.get(srv.url + "/api/v1/chats?limit=0").status_code == 400
    finally:
        srv.stop()


def test_get_and_delete_stored_responses(server):
    client = OpenAI(base_url=server.url + "/v1", api_key="x")
    first = client.responses.create(model=MLX_KEY, input="Hi", max_output_tokens=4, temperature=0)
    got = client.responses.retrieve(first.id)
    assert got.model_dump() == first.model_dump()
    second = client.responses.create(
        model=MLX_KEY, input="Again", previous_response_id=first.id, max_output_tokens=4,
        temperature=0,
    )  # fmt: skip
    client.responses.delete(first.id)
    with pytest.raises(NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(NotFoundError):
        client.responses.delete(first.id)
    # The response continuing from the deleted one keeps its whole history.
    third = client.responses.create(
        model=MLX_KEY, input="Once more", previous_response_id=second.id, max_output_tokens=4,
        temperature=0,
    )  # fmt: skip
    assert third.usage.input_tokens > second.usage.input_tokens
    # Streamed responses are stored as their final object.
    events = list(
        client.responses.create(model=MLX_KEY, input="Hi", max_output_tokens=4, stream=True)
    )
    final = events[-1].response
    assert events[-1].type == "response.incomplete"
    assert client.responses.retrieve(final.id).model_dump() == final.model_dump()


def test_search_ranks_by_downloads_with_quantizations(hub_server):
    r = httpx.get(hub_server.url + "/api/v1/models/search", params={"q": "tiny"}, timeout=60)
    assert r.status_code == 200, r.text
    found = r.json()
    assert found["object"] == "list" and found["memory_bytes"] > 0
    assert [m["id"] for m in found["data"]] == [GGUF_REPO, MLX_REPO]
    gguf, mlx = found["data"]
    assert gguf["format"] == "gguf" and gguf["downloads"] == 50
    assert [q["name"] for q in gguf["quantizations"]] == ["Q8_0", "F32"]
    assert gguf["quantizations"][0]["size_bytes"] == 1 << 20
    assert all(q["fits"] is True and q["downloaded"] is False for q in gguf["quantizations"])
    assert mlx["format"] == "mlx" and len(mlx["quantizations"]) == 1
    assert mlx["quantizations"][0]["size_bytes"] > 1 << 20
    only = httpx.get(
        hub_server.url + "/api/v1/models/search", params={"q": "tiny", "format": "mlx"}
    ).json()
    assert [m["id"] for m in only["data"]] == [MLX_REPO]
    for params, field in (
        ({"q": ""}, "q"),
        ({"q": "x" * 201}, "q"),
        ({"q": "tiny", "format": "onnx"}, "format"),
        ({"q": "tiny", "limit": "0"}, "limit"),
        ({"q": "tiny", "limit": "many"}, "limit"),
    ):
        r = httpx.get(hub_server.url + "/api/v1/models/search", params=params)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, params


def test_search_command(hub_server):
    env = {**os.environ, "MLXSERVE_PORT": str(hub_server.port)}
    proc = subprocess.run(
        [sys.executable, "-m", "mlxserve", "search", "tiny"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["MODEL", "FORMAT", "DOWNLOADS", "QUANT", "SIZE", "FITS", "GET"]
    assert GGUF_REPO in lines[1] and f"mlxserve get {GGUF_REPO}@Q8_0" in lines[1]
    assert any(MLX_REPO in line for line in lines[3:])
    proc = subprocess.run(
        [sys.executable, "-m", "mlxserve", "search", "nothing-like-this"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1 and "No MLX or GGUF model" in proc.stdout


def _wait(url: str, job_id: str) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = httpx.get(f"{url}/api/v1/models/download/status/{job_id}").json()
        if status["status"] != "downloading":
            return status
        time.sleep(0.05)
    raise AssertionError("download did not finish")


def test_cancel_resume_then_delete(hub, hub_server):
    hub_obj, _ = hub
    hub_obj.throttle = 0.005
    url = hub_server.url
    try:
        started = httpx.post(url + "/api/v1/models/download", json={"model": MLX_REPO}).json()
        job = started["job_id"]
        while httpx.get(f"{url}/api/v1/models/download/status/{job}").json()["downloaded_bytes"] < (
            1 << 20
        ):
            time.sleep(0.05)
        listed = httpx.get(url + "/api/v1/models/download").json()["data"]
        assert listed[0]["job_id"] == job and listed[0]["status"] == "downloading"
        cancelled = httpx.delete(f"{url}/api/v1/models/download/{job}").json()
        assert cancelled["status"] == "failed"
        assert cancelled["error"] == "cancelled; ask again to resume"
        assert httpx.delete(f"{url}/api/v1/models/download/job_nope").status_code == 404
        hub_obj.throttle = 0
        hub_obj.requests.clear()
        again = httpx.post(url + "/api/v1/models/download", json={"model": MLX_REPO}).json()
        assert _wait(url, again["job_id"])["status"] == "completed"
        # Resumed with a Range request, not from the start.
        assert any(rng for _, path, rng in hub_obj.requests if path.endswith(".safetensors"))
    finally:
        hub_obj.throttle = 0
    keys = [m["key"] for m in httpx.get(url + "/api/v1/models").json()["models"]]
    assert MLX_REPO in keys
    found = httpx.get(url + "/api/v1/models/search", params={"q": "tiny-qwen2-mlx"}).json()
    assert found["data"][0]["quantizations"][0]["downloaded"] is True

    loaded = httpx.post(url + "/api/v1/models/load", json={"model": MLX_REPO}, timeout=120)
    r = httpx.post(url + "/api/v1/models/delete", json={"model": MLX_REPO})
    assert r.status_code == 400 and "unload it first" in r.json()["error"]["message"]
    httpx.post(url + "/api/v1/models/unload", json={"instance_id": loaded.json()["instance_id"]})
    r = httpx.post(url + "/api/v1/models/delete", json={"model": MLX_REPO})
    assert r.json() == {"id": MLX_REPO, "object": "model", "deleted": True}
    keys = [m["key"] for m in httpx.get(url + "/api/v1/models").json()["models"]]
    assert MLX_REPO not in keys
    r = httpx.post(url + "/api/v1/models/delete", json={"model": MLX_REPO})
    assert r.status_code == 404


def test_token_routes_need_a_token_and_web_files_stay_in_their_folder(hub_server):
    url = hub_server.url
    # Authentication is off here, yet tokens are managed by token holders only.
    assert httpx.get(url + "/api/v1/tokens").status_code == 403
    assert httpx.post(url + "/api/v1/tokens", json={"name": "x"}).status_code == 403
    page = httpx.get(url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert httpx.get(url + "/app/main.js").headers["content-type"].startswith("text/javascript")
    for path in ("/app/../routes/web.py", "/app/%2e%2e/routes/web.py", "/app/nope.js"):
        assert httpx.get(url + path).status_code == 404, path
