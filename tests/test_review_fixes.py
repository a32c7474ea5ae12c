"""Regression tests for review findings: stream cleanup, engine failures, MCP and tool edges."""

from __future__ import annotations

import asyncio
import types
from typing import Any

import pytest

from backends.base import EngineError, Token, TokenStream
from mlxserve.core.mcp import Toolset, check_url
from mlxserve.core.mcp_session import Connection
from mlxserve.core.mcp_spec import CallOutcome, McpTool, ServerSpec
from mlxserve.core.toolloop import ToolLoop, _Call, with_tools
from mlxserve.core.types import CoreRequest, SamplingParams
from mlxserve.errors import InvalidRequest, McpConnectionError
from mlxserve.http.sse import EventStreamResponse
from tests.engine_harness import generate, load


class FakeGeneration:
    def __init__(self) -> None:
        self.cancelled = 0

    def cancel(self) -> None:
        self.cancelled += 1


def test_event_stream_runs_on_close_when_client_leaves_before_first_frame():
    gen = FakeGeneration()
    body_cleaned: list[bool] = []
    closed: list[bool] = []

    async def body():
        try:
            await asyncio.sleep(30)  # a long prompt: nothing to send yet
            yield "data: x\n\n"
        finally:
            body_cleaned.append(True)

    async def on_close() -> None:
        gen.cancel()
        closed.append(True)

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    response = EventStreamResponse(body(), on_close=on_close)
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}}
    asyncio.run(asyncio.wait_for(response(scope, receive, send), 10))
    assert closed == [True]
    assert gen.cancelled == 1


def test_event_stream_on_close_sync_callable_runs_after_a_full_stream():
    gen = FakeGeneration()

    async def body():
        yield "data: 1\n\n"

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(30)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        pass

    response = EventStreamResponse(body(), on_close=gen.cancel)
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}}
    asyncio.run(asyncio.wait_for(response(scope, receive, send), 10))
    assert gen.cancelled == 1


# --- engines: a failure while starting or stepping fails the requests, nothing hangs ------

FORMATS = ["mlx", "gguf"]


@pytest.fixture(scope="module", params=FORMATS)
def engine(request, models_root):
    e = load(models_root, request.param, prompt_cache_bytes=0, max_batch_size=4)
    yield e
    e.close()


def _prompt(engine):
    return engine.tokenize("apple tell me more")


def _expect_failure(engine, prompt):
    async def run():
        with pytest.raises(EngineError):
            await asyncio.wait_for(generate(engine, prompt, 8), 60)

    asyncio.run(run())


def test_gguf_sequence_start_failure_fails_the_request_and_frees_its_slot(models_root):
    engine = load(models_root, "gguf", prompt_cache_bytes=0, max_batch_size=2)
    try:
        free = sorted(engine._free)
        real = engine._llm._init_sampler
        calls = []

        def broken(**kw):
            if not calls:
                calls.append(kw)
                raise RuntimeError("sampler broke")
            return real(**kw)

        engine._llm._init_sampler = broken
        prompt = _prompt(engine)
        _expect_failure(engine, prompt)
        assert engine.pending == 0
        assert sorted(engine._free) == free
        result = asyncio.run(asyncio.wait_for(generate(engine, prompt, 8), 60))
        assert result.reason == "length" and len(result.tokens) == 8
        assert engine.pending == 0
    finally:
        engine.close()


def test_a_step_that_raises_fails_requests_in_flight_and_the_engine_keeps_serving(engine):
    prompt = _prompt(engine)
    expected = asyncio.run(generate(engine, prompt, 8))
    inner = type(engine).step
    raised = []

    def step(self):
        if not raised:
            raised.append(True)
            raise RuntimeError("step broke")
        inner(self)

    engine.step = types.MethodType(step, engine)
    try:
        _expect_failure(engine, prompt)
    finally:
        del engine.step
    assert engine.pending == 0
    assert engine._owner._thread.is_alive()
    again = asyncio.run(asyncio.wait_for(generate(engine, prompt, 8), 60))
    assert again.tokens == expected.tokens


def test_a_step_that_raises_fails_solo_requests_too(engine):
    # A seeded request runs on the single path on MLX.
    prompt = _prompt(engine)
    raised = []
    inner = type(engine).step

    def step(self):
        if not raised:
            raised.append(True)
            raise RuntimeError("step broke")
        inner(self)

    engine.step = types.MethodType(step, engine)
    try:

        async def run():
            with pytest.raises(EngineError):
                await asyncio.wait_for(generate(engine, prompt, 8, seed=3), 60)

        asyncio.run(run())
    finally:
        del engine.step
    assert engine.pending == 0
    assert engine.busy() is False


# --- MCP edges ----------------------------------------------------------------------------


def test_check_url_bad_port_is_400_and_allowed_hosts_ignore_case():
    with pytest.raises(InvalidRequest, match="port"):
        check_url("http://example.com:99999/mcp", [])
    check_url("http://LocalHost:8000/mcp", ["LOCALHOST"])
    check_url("http://127.0.0.1:8000/mcp", ["127.0.0.1:8000"])


def test_calls_on_a_closed_connection_raise_the_mcp_connection_error():
    spec = ServerSpec("s", (("type", "plugin"), ("plugin_id", "mcp/s")), url="http://x/")
    conn = Connection(spec, 1, 1)
    with pytest.raises(McpConnectionError):
        asyncio.run(conn.call("t", {}))
    with pytest.raises(McpConnectionError):
        asyncio.run(conn._list())


def test_connect_timeout_does_not_wait_a_second_timeout():
    spec = ServerSpec("s", (("type", "plugin"), ("plugin_id", "mcp/s")), url="http://x/")
    conn = Connection(spec, 0.2, 1)
    hung = []

    async def silent(transport: str) -> None:
        try:
            await asyncio.sleep(30)
        finally:
            hung.append(True)

    conn._run = silent

    async def graceful_close() -> None:
        # close() waits up to another connect timeout for a graceful end: a silent server
        # must be cancelled at once instead.
        raise AssertionError("close() called after a connect timeout")

    conn.close = graceful_close

    async def run() -> None:
        with pytest.raises(McpConnectionError, match="no answer"):
            await conn._open("http")

    asyncio.run(run())
    assert hung == [True]


def test_close_does_not_swallow_the_callers_cancellation():
    spec = ServerSpec("s", (("type", "plugin"), ("plugin_id", "mcp/s")), url="http://x/")
    conn = Connection(spec, 5, 1)

    async def run() -> bool:
        conn._task = asyncio.create_task(asyncio.sleep(30))
        await asyncio.sleep(0)
        closer = asyncio.create_task(conn.close())
        await asyncio.sleep(0.05)
        closer.cancel()
        try:
            await closer
        except asyncio.CancelledError:
            return True
        return False

    assert asyncio.run(run()) is True


def _loop_with(schema, conn):
    spec = ServerSpec("s", (("type", "plugin"), ("plugin_id", "mcp/s")))
    toolset = Toolset()
    toolset.add(spec, conn, [McpTool(spec, "pick", None, schema)])
    request = CoreRequest(model="m", sampling=SamplingParams(temperature=0.0), messages=())
    return ToolLoop(None, with_tools(request, toolset), None, toolset, 4)


class _Conn:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[Any] = []

    async def call(self, name, arguments):
        self.calls.append(arguments)
        if self.fail:
            raise ValueError("the SDK broke")
        return CallOutcome("ok", False)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"q": {"type": "string", "pattern": "(unclosed"}}},
        {"type": "object", "properties": {"q": {"$ref": "#/definitions/missing"}}},
    ],
)
def test_unusable_tool_schemas_skip_validation(schema):
    conn = _Conn()
    result = asyncio.run(
        _loop_with(schema, conn)._run(_Call("c", "pick", '{"q": "x"}', {"q": "x"}))
    )
    assert result.status == "success"
    assert conn.calls == [{"q": "x"}]


def test_unexpected_tool_exceptions_become_tool_errors():
    loop = _loop_with({"type": "object"}, _Conn(fail=True))
    result = asyncio.run(loop._run(_Call("c", "pick", "{}", {})))
    assert result.status == "tool_error" and "the SDK broke" in result.reason


def test_next_batch_delivers_tokens_before_an_error_that_follows_them():
    async def run():
        stream = TokenStream(asyncio.get_running_loop())
        stream.put(Token(1))
        stream.put(Token(2))
        stream.put(EngineError("boom"))
        await asyncio.sleep(0)
        assert await stream.next_batch(1) == [Token(1), Token(2)]
        with pytest.raises(EngineError):
            await stream.next_batch(1)

    asyncio.run(run())


def test_sdk_prompt_progress_reports_the_cached_tokens():
    from mlxserve.core.types import Progress
    from mlxserve.sdk.predict import _Run

    (message,) = _Run(started=0.0).messages(Progress(6, 10, 4))
    assert message["details"]["cachedTokenCount"] == 4


def test_prompt_cache_checks_its_budget_before_compacting(monkeypatch):
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    from backends.mlx import prompt_cache

    def step_allocated(n: int) -> list[KVCache]:
        # A 256-position buffer holding n positions, as a running cache has.
        c = KVCache()
        c.keys = mx.zeros((1, 1, 256, 4), dtype=mx.float32)
        c.values = mx.zeros((1, 1, 256, 4), dtype=mx.float32)
        c.offset = n
        return [c]

    compacted = []
    real = prompt_cache._compact
    monkeypatch.setattr(prompt_cache, "_compact", lambda c: compacted.append(1) or real(c))
    held = 2 * 8 * 4 * 4  # keys and values, 8 positions of 4 floats
    prompt_cache.PromptCache(0).store(list(range(8)), step_allocated(8))
    prompt_cache.PromptCache(held - 1).store(list(range(8)), step_allocated(8))
    assert compacted == []
    cache = prompt_cache.PromptCache(held)
    cache.store(list(range(8)), step_allocated(8))
    assert compacted == [1] and len(cache) == 1 and cache.nbytes == held


def test_openai_stream_cancels_its_generation_when_the_client_leaves_at_once(tmp_path, monkeypatch):
    import json as jsonlib

    from mlxserve.app import create_app
    from mlxserve.routes import openai as openai_routes
    from mlxserve.settings import Settings

    gen = FakeGeneration()
    gen.instance = types.SimpleNamespace(id="m")

    async def events(ping):
        await asyncio.sleep(30)  # a long prompt: nothing to send yet
        yield None

    gen.events = events

    async def start(manager, core):
        return gen

    monkeypatch.setattr(openai_routes.generate, "start", start)
    app = create_app(Settings(home=tmp_path, models_dir=tmp_path))
    body = jsonlib.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    ).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        # A client that never takes the headers: the body iterator never starts, so only
        # the response's on_close can cancel the generation.
        if message["type"] == "http.response.start":
            await asyncio.sleep(30)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"127.0.0.1")],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 1234),
        "state": {},
    }
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 20))
    assert gen.cancelled >= 1
