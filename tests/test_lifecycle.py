"""End to end: the model lifecycle (JIT, TTL, auto-evict, unloading under load, memory
freeing, the loading guardrail, JIT off, stored chats across a restart) on servers of their
own, with LM Studio's defaults unless a test says otherwise."""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import EMBED_GGUF_KEY, GGUF_KEY, MLX_KEY, THINK_GGUF_KEY, Server


@pytest.fixture(scope="module")
def life(models_root, tmp_path_factory):
    srv = Server(models_root, tmp_path_factory.mktemp("life"))
    yield srv
    srv.stop()


@pytest.fixture
def http(life):
    with httpx.Client(base_url=life.url, timeout=120) as client:
        for instance_id in loaded(client):
            client.post("/api/v1/models/unload", json={"instance_id": instance_id})
        yield client


def loaded(http) -> dict[str, str]:
    """instance id -> model key, for every loaded instance."""
    models = http.get("/api/v1/models").json()["models"]
    return {i["id"]: m["key"] for m in models for i in m["loaded_instances"]}


def chat(http, model, **body):
    body = {"model": model, "input": "Hi", "max_output_tokens": 4, "store": False, **body}
    r = http.post("/api/v1/chat", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def wait_until(condition, timeout=8.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def long_stream(url, model, tokens, done: dict, **extra):
    """An OpenAI stream that generates exactly ``tokens`` tokens; records when it ended."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Go on"}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    chunks = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line.removeprefix("data: ")))
                done.setdefault("first", time.monotonic())
    done["ended"] = time.monotonic()
    done["chunks"] = chunks


def test_auto_evict_unloads_earlier_jit_loads_only(http):
    chat(http, GGUF_KEY)
    assert set(loaded(http).values()) == {GGUF_KEY}
    chat(http, THINK_GGUF_KEY)
    assert set(loaded(http).values()) == {THINK_GGUF_KEY}
    # An explicitly loaded model is never auto-evicted.
    r = http.post("/api/v1/models/load", json={"model": GGUF_KEY, "identifier": "pinned"})
    assert r.status_code == 200, r.text
    http.post("/api/v1/models/unload", json={"instance_id": THINK_GGUF_KEY})
    chat(http, THINK_GGUF_KEY)
    assert loaded(http) == {"pinned": GGUF_KEY, THINK_GGUF_KEY: THINK_GGUF_KEY}
    # A request naming a model with an explicit instance uses it; nothing is loaded.
    assert chat(http, GGUF_KEY)["model_instance_id"] == "pinned"


def test_a_busy_model_is_evicted_only_once_idle(http, life):
    chat(http, GGUF_KEY)
    done: dict = {}
    stream = threading.Thread(target=long_stream, args=(life.url, GGUF_KEY, 150, done))
    stream.start()
    assert wait_until(lambda: "first" in done)
    # Loading another model just in time does not evict GGUF_KEY while its stream runs: both
    # fit, so its eviction waits until it is idle, and the new model answers meanwhile.
    reply = chat(http, THINK_GGUF_KEY)
    assert "model_load_time_seconds" in reply["stats"]
    if "ended" not in done:
        assert set(loaded(http).values()) == {GGUF_KEY, THINK_GGUF_KEY}
    stream.join()
    usage = done["chunks"][-1]["usage"]
    assert usage["completion_tokens"] == 150
    assert [c["choices"][0]["finish_reason"] for c in done["chunks"] if c["choices"]][
        -1
    ] == "length"
    assert wait_until(lambda: set(loaded(http).values()) == {THINK_GGUF_KEY})
    log = life.log_path.read_text()
    assert f"deferring the eviction of {GGUF_KEY} until it is idle" in log
    assert f"unloading {GGUF_KEY}: auto-evicted for a just-in-time load, now idle" in log


def test_alternating_traffic_to_two_models_loads_each_once(http, life):
    log_start = len(life.log_path.read_bytes())
    models = [GGUF_KEY, THINK_GGUF_KEY] * 8

    def one(model: str) -> None:
        with httpx.Client(base_url=life.url, timeout=120) as client:
            chat(client, model, max_output_tokens=12)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, models))
    log = life.log_path.read_bytes()[log_start:].decode()
    loads = [line for line in log.splitlines() if "mlxserve.manager: loading " in line]
    assert len(loads) <= 2, loads
    assert set(loaded(http).values()) >= {THINK_GGUF_KEY}


def test_a_busy_model_is_evicted_at_once_when_both_do_not_fit(models_root, tmp_path):
    # 250 MB: one tiny Qwen2 GGUF (~155 MB with its KV windows, attention mask, tokenizer and
    # runtime) fits, two do not.
    tight = Server(models_root, tmp_path, "--guardrail-memory-gb", "0.25")
    try:
        with httpx.Client(base_url=tight.url, timeout=120) as http:
            chat(http, GGUF_KEY)
            done: dict = {}
            args = (tight.url, GGUF_KEY, 150, done)
            stream = threading.Thread(target=long_stream, args=args)
            stream.start()
            assert wait_until(lambda: "first" in done)
            # The load evicts GGUF_KEY before it starts, after GGUF_KEY's queued work.
            reply = chat(http, THINK_GGUF_KEY)
            answered = time.monotonic()
            stream.join()
            assert "model_load_time_seconds" in reply["stats"]
            assert answered > done["ended"] - 0.05
            assert done["chunks"][-1]["usage"]["completion_tokens"] == 150
            assert set(loaded(http).values()) == {THINK_GGUF_KEY}
        assert "does not fit beside the busy JIT models" in tight.log_path.read_text()
    finally:
        tight.stop()


def test_ttl_unloads_an_idle_jit_model_but_never_mid_request(http, life):
    assert "model_load_time_seconds" in chat(http, GGUF_KEY, ttl=0.5)["stats"]
    assert wait_until(lambda: GGUF_KEY not in loaded(http).values(), timeout=6)
    # A generation that outlives its TTL keeps the model; it goes once it is idle.
    done: dict = {}
    stream = threading.Thread(
        target=long_stream, args=(life.url, GGUF_KEY, 200, done), kwargs={"ttl": 0.5}
    )
    stream.start()
    assert wait_until(lambda: "first" in done)
    polls = []
    while stream.is_alive():
        polls.append((time.monotonic(), GGUF_KEY in loaded(http).values()))
        time.sleep(0.05)
    assert done["chunks"][-1]["usage"]["completion_tokens"] == 200
    assert all(present for at, present in polls if at < done["ended"] - 0.2), polls
    assert wait_until(lambda: GGUF_KEY not in loaded(http).values(), timeout=6)
    log = life.log_path.read_text()
    assert log.count(f"unloading {GGUF_KEY}: idle for 0.5s (TTL)") == 2


def test_ttl_on_explicit_load_and_listing_is_not_use(http):
    r = http.post("/api/v1/models/load", json={"model": GGUF_KEY, "ttl": 1})
    assert r.status_code == 200, r.text
    # Polling the listing (and /health) must not keep the model loaded.
    assert wait_until(lambda: http.get("/health").status_code == 200 and not loaded(http), 6)


def test_concurrent_first_requests_load_once(http, life):
    def first_request(_: int) -> dict:
        with httpx.Client(base_url=life.url, timeout=120) as client:
            return chat(client, GGUF_KEY)

    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(first_request, range(4)))
    assert {r["model_instance_id"] for r in replies} == {GGUF_KEY}
    assert sum("model_load_time_seconds" in r["stats"] for r in replies) == 1
    assert list(loaded(http)) == [GGUF_KEY]


@pytest.mark.parametrize("model", [GGUF_KEY, MLX_KEY])
def test_unloading_frees_memory(http, life, model):
    cycles = 9
    samples = []
    for _ in range(cycles):
        r = http.post("/api/v1/models/load", json={"model": model})
        assert r.status_code == 200, r.text
        chat(http, r.json()["instance_id"])
        http.post("/api/v1/models/unload", json={"instance_id": r.json()["instance_id"]})
        samples.append(rss_mb(life.proc.pid))
    # A leak would keep each cycle's weights (45-50 MB) in the process. RSS after an unload
    # swings by tens of MB and its floor creeps a few MB a cycle (allocator arenas, MLX and
    # tokenizer caches; more when the CPU is contended), so compare the floors of the early
    # and late cycles and allow well under a model's size per cycle in between.
    first, last = min(samples[1:4]), min(samples[-3:])
    assert last - first < 30 * (cycles - 4), samples


@pytest.fixture(scope="module")
def strict_home(tmp_path_factory):
    return tmp_path_factory.mktemp("strict")


@pytest.fixture(scope="module")
def strict(models_root, strict_home, embedding_models):
    """JIT off, and a memory budget of 250 MB: one tiny Qwen2 GGUF (~239 MB) fits; a second
    one, or the embedding model (~91 MB) beside it, does not."""
    srv = Server(models_root, strict_home, "--no-jit", "--guardrail-memory-gb", "0.25")
    yield srv
    srv.stop()


def test_jit_off_lists_and_serves_only_loaded_models(strict):
    with httpx.Client(base_url=strict.url, timeout=120) as http:
        assert http.get("/v1/models").json()["data"] == []
        r = http.post(
            "/v1/chat/completions",
            json={"model": GGUF_KEY, "messages": [{"role": "user", "content": "Hi"}]},
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_loaded"
        assert r.json()["error"]["param"] == "model"
        r = http.post("/api/v1/chat", json={"model": GGUF_KEY, "input": "Hi"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_loaded"
        assert http.post("/api/v1/models/load", json={"model": GGUF_KEY}).status_code == 200
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == [GGUF_KEY]
        # /api/v1/models still lists every downloaded model.
        assert len(http.get("/api/v1/models").json()["models"]) >= 4


def test_guardrail_refuses_a_load_that_does_not_fit(strict):
    with httpx.Client(base_url=strict.url, timeout=120) as http:
        if GGUF_KEY not in loaded(http).values():
            assert http.post("/api/v1/models/load", json={"model": GGUF_KEY}).status_code == 200
        for model in (GGUF_KEY, EMBED_GGUF_KEY):
            r = http.post("/api/v1/models/load", json={"model": model})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["code"] == "insufficient_system_resources" and error["param"] == "model"
            assert "insufficient system resources" in error["message"]
            assert "MB of weights" in error["message"]
            # What is left beside the first model (its prompt cache included) is named, and is
            # less than the load needs.
            m = re.search(r"approximately ([\d.]+) GB .*only about ([\d.]+) GB", error["message"])
            assert m is not None and float(m[2]) < float(m[1]), error["message"]
            assert "guardrail" in error["message"]
        assert set(loaded(http).values()) == {GGUF_KEY}


def test_stored_chats_survive_a_restart(strict, models_root, strict_home):
    with httpx.Client(base_url=strict.url, timeout=120) as http:
        if GGUF_KEY not in loaded(http).values():
            assert http.post("/api/v1/models/load", json={"model": GGUF_KEY}).status_code == 200
        first = chat(http, GGUF_KEY, input="My name is Ada.", store=True, temperature=0)
        second = chat(
            http,
            GGUF_KEY,
            input="Say it.",
            store=True,
            temperature=0,
            previous_response_id=first["response_id"],
        )
    strict.stop()
    again = Server(models_root, strict_home)
    try:
        with httpx.Client(base_url=again.url, timeout=120) as http:
            body = {"temperature": 0, "previous_response_id": first["response_id"]}
            replayed = chat(http, GGUF_KEY, input="Say it.", **body)
            assert replayed["output"] == second["output"]
            assert replayed["stats"]["input_tokens"] == second["stats"]["input_tokens"]
    finally:
        again.stop()
