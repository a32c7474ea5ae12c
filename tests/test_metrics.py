"""``GET /metrics``: one registry fed by the generation path and the manager, read as
Prometheus text (parsed with prometheus-client's own parser) and as JSON."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import GGUF_KEY, MLX_KEY, Server


def samples(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def http(models_root, tmp_path_factory):
    srv = Server(models_root, tmp_path_factory.mktemp("home"), "--no-auto-evict")
    with httpx.Client(base_url=srv.url, timeout=120) as client:
        yield client
    srv.stop()


@pytest.mark.parametrize("key", [MLX_KEY, GGUF_KEY])
def test_generation_and_load_metrics(http, key):
    r = http.post("/api/v1/models/load", json={"model": key, "context_length": 256})
    assert r.status_code == 200, r.text
    instance = r.json()["instance_id"]
    body = {"model": instance, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6}
    body["temperature"] = 0
    # Two dialects, one counting: each reply's usage lands in the same counters.
    a = http.post("/v1/chat/completions", json=body).json()["usage"]
    anthropic = {**body, "max_tokens": 6}
    b = http.post("/v1/messages", json=anthropic).json()["usage"]
    found = samples(http)
    # Anthropic's input_tokens leaves out the tokens read from and written to the prompt cache.
    anthropic_prompt = (
        b["input_tokens"] + b["cache_read_input_tokens"] + b["cache_creation_input_tokens"]
    )
    assert value(found, "mlxserve_prompt_tokens_total", model=instance) == (
        a["prompt_tokens"] + anthropic_prompt
    )
    assert value(found, "mlxserve_generated_tokens_total", model=instance) == (
        a["completion_tokens"] + b["output_tokens"]
    )
    chat = {"model": instance, "route": "/v1/chat/completions", "status": "200"}
    assert value(found, "mlxserve_requests_total", **chat) == 1
    messages = {"model": instance, "route": "/v1/messages", "status": "200"}
    assert value(found, "mlxserve_requests_total", **messages) == 1
    assert value(found, "mlxserve_time_to_first_token_seconds_count", model=instance) == 2
    assert value(found, "mlxserve_time_per_output_token_seconds_count", model=instance) == 2
    assert value(found, "mlxserve_model_loads_total", model=instance) == 1
    assert value(found, "mlxserve_model_load_duration_seconds_count", model=instance) == 1
    assert value(found, "mlxserve_kv_cache_bytes", model=instance) > 0
    assert value(found, "mlxserve_model_memory_bytes", model=instance) > 0
    assert value(found, "mlxserve_batch_slots", model=instance) >= 1
    assert value(found, "mlxserve_requests_running", model=instance) == 0
    assert value(found, "mlxserve_process_resident_memory_bytes") > 0
    # The same prompt again: the engine's prompt cache serves part of it.
    http.post("/v1/chat/completions", json=body)
    found = samples(http)
    assert value(found, "mlxserve_prompt_cache_hit_tokens_total", model=instance) > 0

    r = http.post("/api/v1/models/unload", json={"instance_id": instance})
    assert r.status_code == 200
    found = samples(http)
    assert value(found, "mlxserve_model_unloads_total", model=instance) == 1
    assert value(found, "mlxserve_model_unload_duration_seconds_count", model=instance) == 1
    # Gone with the instance: its memory and running gauges.
    assert ("mlxserve_kv_cache_bytes", (("model", instance),)) not in found
    assert ("mlxserve_requests_running", (("model", instance),)) not in found


def test_running_gauge_follows_a_stream_and_its_cancel(http):
    body = {
        "model": MLX_KEY,
        "messages": [{"role": "user", "content": "Count"}],
        "max_tokens": 100_000,
        "stream": True,
        "ignore_eos": True,
    }
    seen_running = []
    stop = threading.Event()

    def stream():
        with (
            httpx.Client(base_url=str(http.base_url), timeout=60) as c,
            c.stream("POST", "/v1/chat/completions", json=body) as r,
        ):
            for _ in r.iter_lines():
                if stop.is_set():
                    break

    t = threading.Thread(target=stream)
    t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        running = value(samples(http), "mlxserve_requests_running", model=MLX_KEY)
        if running:
            seen_running.append(running)
            break
        time.sleep(0.05)
    stop.set()
    t.join(30)
    assert seen_running == [1]
    deadline = time.monotonic() + 5
    while value(samples(http), "mlxserve_requests_running", model=MLX_KEY) != 0:
        assert time.monotonic() < deadline, "the running gauge stayed up after the client left"
        time.sleep(0.05)
    assert value(samples(http), "mlxserve_requests_queued", model=MLX_KEY) == 0


def test_refusals_and_unknown_paths_are_counted_without_growing_labels(http):
    http.get("/no/such/path/1")
    http.get("/no/such/path/2")
    r = http.post("/v1/chat/completions", json={"model": "nope/nothing", "messages": []})
    assert r.status_code in (400, 404)
    found = samples(http)
    assert value(found, "mlxserve_requests_total", model="", route="unmatched", status="404") == 2
    routes = {dict(k[1]).get("route") for k in found if k[0] == "mlxserve_requests_total"}
    assert not any(r and r.startswith("/no/") for r in routes)


def test_json_view_is_the_same_registry(http):
    r = http.get("/metrics", params={"format": "json"})
    assert r.status_code == 200
    families = {f["name"]: f for f in r.json()["families"]}
    assert families["mlxserve_requests"]["type"] == "counter"
    assert families["mlxserve_time_to_first_token_seconds"]["type"] == "histogram"
    assert any(
        s["name"] == "mlxserve_requests_total" for s in families["mlxserve_requests"]["samples"]
    )
    r = http.get("/metrics", params={"format": "xml"})
    assert r.status_code == 400
    assert "format" in r.json()["error"]["message"]


def test_metrics_need_a_token_when_auth_is_on(auth_server):
    srv, _ = auth_server
    assert httpx.get(srv.url + "/metrics").status_code == 401
    assert httpx.get(srv.url + "/metrics?format=json").status_code == 401
