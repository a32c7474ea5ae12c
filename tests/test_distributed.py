"""End to end: one model sharded over two ranks (mx.distributed ring backend on loopback),
rank 0 serving HTTP, against the single-process server on the same tiny Qwen2 model."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import GGUF_KEY, MLX_KEY, Server

mx = pytest.importorskip("mlx.core")

pytestmark = pytest.mark.skipif(
    not mx.distributed.is_available(backend="ring"),
    reason="this MLX build has no ring backend for mx.distributed",
)

PROMPTS = [
    "Tell me about the sea.",
    "Count to ten.",
    "What is a prime number?",
    "Write a short poem about rust.",
]


@pytest.fixture(scope="module")
def distributed(models_root, tmp_path_factory):
    home = tmp_path_factory.mktemp("dist-home")
    hostfile = home / "hosts.json"
    hostfile.write_text(
        json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2), encoding="utf-8"
    )
    port = random.randrange(20000, 60000)
    srv = Server(
        models_root,
        home,
        "--distributed",
        str(hostfile),
        "--distributed-port",
        str(port),
        "--distributed-timeout",
        "5",
    )
    yield srv
    srv.stop()


def _client(srv: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


async def _answers(srv: Server, stream: bool) -> list[str]:
    client = _client(srv)

    async def one(prompt: str) -> str:
        kwargs: dict[str, Any] = {
            "model": MLX_KEY,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": 24,
        }
        if not stream:
            reply = await client.chat.completions.create(**kwargs)
            return reply.choices[0].message.content or ""
        parts = []
        async for chunk in await client.chat.completions.create(**kwargs, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        return "".join(parts)

    try:
        return list(await asyncio.gather(*(one(p) for p in PROMPTS)))
    finally:
        await client.close()


def test_a_model_that_cannot_be_split_is_refused_before_loading(models_root):
    from backends.mlx.distributed import check_shardable

    path = models_root / MLX_KEY
    check_shardable(path, 2)
    # The tiny model has 2 KV heads: 4 ranks cannot share them.
    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        check_shardable(path, 4)


def test_health_and_listing_show_the_ranks(distributed):
    health = distributed.health()
    assert health["status"] == "ok"
    group = health["distributed"]
    assert group["world_size"] == 2 and group["healthy"] is True
    assert [r["rank"] for r in group["ranks"]] == [0, 1]
    assert group["ranks"][1]["pid"] != group["ranks"][0]["pid"]
    loaded = httpx.post(
        distributed.url + "/api/v1/models/load", json={"model": MLX_KEY}, timeout=120
    )
    assert loaded.status_code == 200, loaded.text
    models = httpx.get(distributed.url + "/api/v1/models", timeout=10).json()["models"]
    (entry,) = [m for m in models if m["key"] == MLX_KEY]
    (instance,) = entry["loaded_instances"]
    assert instance["distributed"]["world_size"] == 2
    assert instance["distributed"]["backend"] == "ring"


def test_what_a_sharded_server_cannot_load_is_refused_clearly(distributed):
    reply = httpx.post(
        distributed.url + "/api/v1/models/load", json={"model": GGUF_KEY}, timeout=30
    )
    assert reply.status_code == 400
    assert "MLX text models only" in reply.text


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_same_text_as_one_process_under_concurrency(distributed, server, stream):
    expected = asyncio.run(_answers(server, stream))
    got = asyncio.run(_answers(distributed, stream))
    assert all(expected)
    assert got == expected


def test_seeded_sampling_and_structured_output(distributed, server):
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }

    def ask(srv: Server) -> tuple[str, str]:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        sampled = client.chat.completions.create(
            model=MLX_KEY,
            messages=[{"role": "user", "content": "Say something."}],
            temperature=0.9,
            seed=7,
            max_tokens=16,
        )
        structured = client.chat.completions.create(
            model=MLX_KEY,
            messages=[{"role": "user", "content": "A number, as JSON."}],
            temperature=0,
            max_tokens=40,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "n", "schema": schema, "strict": True},
            },
        )
        return sampled.choices[0].message.content or "", structured.choices[0].message.content or ""

    sampled, structured = ask(distributed)
    assert sampled
    assert isinstance(json.loads(structured)["n"], int)
    # The same seed draws the same tokens on every rank, and the same as one process.
    assert (sampled, structured) == ask(server)


def test_cancelled_streams_leave_the_ranks_in_step(distributed, server):
    async def cancel_some() -> None:
        client = _client(distributed)
        try:
            for i in range(3):
                stream = await client.chat.completions.create(
                    model=MLX_KEY,
                    messages=[{"role": "user", "content": f"Go on forever {i}."}],
                    max_tokens=400,
                    extra_body={"ignore_eos": True},
                    stream=True,
                )
                seen = 0
                async for _ in stream:
                    seen += 1
                    if seen == 3:
                        break
                await stream.close()
        finally:
            await client.close()

    asyncio.run(cancel_some())
    # The ranks replayed the removals: their batches still match rank 0's.
    assert asyncio.run(_answers(distributed, False)) == asyncio.run(_answers(server, False))
    assert distributed.health()["distributed"]["healthy"] is True


def test_a_killed_rank_fails_requests_clearly(distributed):
    # Last in this module: the group cannot recover.
    health = distributed.health()
    worker = health["distributed"]["ranks"][1]["pid"]
    client = openai.OpenAI(base_url=distributed.url + "/v1", api_key="unused", max_retries=0)
    os.kill(worker, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(openai.APIError) as caught:
        client.chat.completions.create(
            model=MLX_KEY,
            messages=[{"role": "user", "content": "Hello?"}],
            temperature=0,
            max_tokens=2000,
        )
    assert "distributed" in str(caught.value).lower()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        reply = httpx.get(distributed.url + "/health", timeout=5)
        if reply.status_code == 503:
            break
        time.sleep(0.2)
    assert reply.status_code == 503
    body = reply.json()
    assert body["status"] == "error"
    assert body["distributed"]["healthy"] is False and body["distributed"]["error"]
    assert time.monotonic() - started < 15
    # Later requests fail at once with the same reason; the server itself stays up.
    with pytest.raises(openai.APIError) as again:
        client.chat.completions.create(
            model=MLX_KEY, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
    assert "distributed" in str(again.value).lower()


def test_a_hung_rank_fails_requests_after_the_timeout(models_root, tmp_path_factory):
    # A stopped (not dead) rank never closes its socket: only the watchdog can tell.
    home = tmp_path_factory.mktemp("dist-hung")
    hostfile = home / "hosts.json"
    hostfile.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2))
    port = str(random.randrange(20000, 60000))
    srv = Server(
        models_root, home, "--distributed", str(hostfile), "--distributed-port", port,
        "--distributed-timeout", "3",
    )  # fmt: skip
    worker = srv.health()["distributed"]["ranks"][1]["pid"]
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        client.chat.completions.create(
            model=MLX_KEY, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )
        os.kill(worker, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(openai.APIError) as caught:
            client.chat.completions.create(
                model=MLX_KEY, messages=[{"role": "user", "content": "Hello?"}], max_tokens=50
            )
        assert "did not answer within 3s" in str(caught.value)
        assert time.monotonic() - started < 12
        assert httpx.get(srv.url + "/health", timeout=5).status_code == 503
    finally:
        os.kill(worker, signal.SIGKILL)
        srv.stop()
