"""Handing stream items from an engine thread to the event loop: one loop wake-up per batch of
items (not one per token per stream), each stream's items in order, and a closed loop stopping
the engine's requests."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from backends.base import (
    EngineError,
    Finished,
    GenerationRequest,
    Relay,
    SamplingParams,
    Token,
    TokenLogprobs,
    TokenStream,
)
from backends.stream import DeferredLogprobs
from tests.engine_harness import load


def count_wakeups(loop: asyncio.AbstractEventLoop) -> list[Any]:
    """The callbacks scheduled on ``loop`` from other threads (each one a self-pipe write)."""
    calls: list[Any] = []
    schedule = loop.call_soon_threadsafe

    def counted(callback: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(callback)
        return schedule(callback, *args, **kwargs)

    loop.call_soon_threadsafe = counted  # type: ignore[method-assign,assignment]
    return calls


async def drain(stream: TokenStream) -> list[Any]:
    items: list[Any] = []
    while not items or not isinstance(items[-1], Finished):
        items += await stream.next_batch(5)
    return items


def test_a_step_of_tokens_for_several_streams_wakes_the_loop_once():
    async def run() -> None:
        loop = asyncio.get_running_loop()
        relay = Relay(loop)
        streams = [TokenStream(loop, relay) for _ in range(4)]
        wakeups = count_wakeups(loop)

        def engine_thread() -> None:
            for step in range(3):
                with relay.hold():
                    for s in streams:
                        s.put(Token(step))
            with relay.hold():
                for s in streams:
                    s.put(Finished("length", 3))

        thread = threading.Thread(target=engine_thread)
        thread.start()
        thread.join()
        results = await asyncio.gather(*(drain(s) for s in streams))
        # The loop was busy joining the thread: 16 items, one wake-up.
        assert len(wakeups) == 1
        for items in results:
            assert items == [Token(0), Token(1), Token(2), Finished("length", 3)]

    asyncio.run(run())


def test_a_hold_wakes_the_loop_when_it_ends_not_at_each_put():
    async def run() -> None:
        loop = asyncio.get_running_loop()
        relay = Relay(loop)
        streams = [TokenStream(loop, relay) for _ in range(3)]
        wakeups = count_wakeups(loop)
        for step in range(3):
            with relay.hold():
                for s in streams:
                    s.put(Token(step))
                assert len(wakeups) == step
            assert len(wakeups) == step + 1
            assert [await s.next_batch(5) for s in streams] == [[Token(step)]] * 3

    asyncio.run(run())


def test_items_put_before_the_loop_takes_them_share_one_wakeup():
    async def run() -> None:
        loop = asyncio.get_running_loop()
        stream = TokenStream(loop)
        wakeups = count_wakeups(loop)
        # Put while the loop is busy here: it cannot take them before they are all in.
        for i in range(10):
            stream.put(Token(i))
        stream.put(Finished("length", 10))
        assert len(wakeups) == 1
        assert await drain(stream) == [*(Token(i) for i in range(10)), Finished("length", 10)]
        stream.put(Token(11))
        assert len(wakeups) == 2
        assert await stream.next_batch(5) == [Token(11)]

    asyncio.run(run())


def test_an_error_after_tokens_comes_after_them_through_a_hold():
    async def run() -> None:
        loop = asyncio.get_running_loop()
        relay = Relay(loop)
        stream = TokenStream(loop, relay)
        with relay.hold():
            stream.put(Token(1))
            stream.put(EngineError("boom"))
        await asyncio.sleep(0)
        assert await stream.next_batch(1) == [Token(1)]
        try:
            await stream.next_batch(1)
        except EngineError:
            return
        raise AssertionError("the error was not raised")

    asyncio.run(run())


def test_a_closed_loop_cancels_the_streams_it_held_items_for():
    loop = asyncio.new_event_loop()
    relay = Relay(loop)
    streams = [TokenStream(loop, relay) for _ in range(2)]
    loop.close()
    with relay.hold():
        streams[0].put(Token(1))
        streams[1].put(Token(1))
    assert all(s.cancelled for s in streams)
    # Without a hold too, and with a wake-up already scheduled when the loop closed.
    loop = asyncio.new_event_loop()
    relay = Relay(loop)
    stream = TokenStream(loop, relay)
    stream.put(Token(1))
    loop.close()
    assert not stream.cancelled
    stream.put(Token(2))
    assert stream.cancelled


def test_a_gguf_decode_step_hands_its_streams_tokens_over_in_one_wakeup(models_root):
    engine = load(models_root, "gguf", prompt_cache_bytes=0, max_batch_size=4)
    try:

        async def run() -> list[list[Any]]:
            loop = asyncio.get_running_loop()
            # How many items wait at each wake-up: with the step's tokens held, all of a
            # step's streams; item by item, one.
            waiting: list[int] = []
            schedule = loop.call_soon_threadsafe

            def counted(callback: Any, *args: Any, **kwargs: Any) -> Any:
                relay = getattr(callback, "__self__", None)
                if isinstance(relay, Relay):
                    waiting.append(len(relay._items))
                return schedule(callback, *args, **kwargs)

            loop.call_soon_threadsafe = counted  # type: ignore[method-assign,assignment]
            requests = [
                GenerationRequest(tuple(engine.tokenize(w)), SamplingParams(temperature=0), 12)
                for w in ("apple", "river", "stone")
            ]
            # The owner thread waits until all three are queued: they then start in one step
            # however late the event loop is between the submissions.
            gate = threading.Event()
            engine.call(lambda: gate.wait(60))
            streams = [engine.submit(r) for r in requests]
            gate.set()
            results = await asyncio.gather(*(drain(s) for s in streams))
            assert max(waiting) >= len(requests)
            return results

        for items in asyncio.run(run()):
            assert [type(i) for i in items] == [Token] * 12 + [Finished]
    finally:
        engine.close()


def test_gguf_log_probabilities_are_computed_on_the_event_loop_not_the_owner_thread(
    models_root, monkeypatch
):
    import backends.logprobs

    threads: list[str] = []
    compute = backends.logprobs.token_logprobs

    def recorded(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        return compute(*args)

    monkeypatch.setattr(backends.logprobs, "token_logprobs", recorded)
    engine = load(models_root, "gguf", prompt_cache_bytes=0)
    try:
        request = GenerationRequest(
            tuple(engine.tokenize("apple")), SamplingParams(temperature=0), 6, logprobs=3
        )

        async def run() -> list[Any]:
            return await drain(engine.submit(request))

        items = asyncio.run(run())
    finally:
        engine.close()
    tokens = [i for i in items if isinstance(i, Token)]
    assert len(tokens) == 6 and all(len(t.logprobs.top) == 3 for t in tokens)
    # Greedy: the sampled token is the most likely one.
    for t in tokens:
        assert t.logprobs.top[0][0] == t.id
        assert abs(t.logprobs.top[0][1] - t.logprobs.logprob) < 1e-6
    assert threads == [threading.main_thread().name] * 6


class _Failing(DeferredLogprobs):
    def _compute(self) -> TokenLogprobs:
        raise MemoryError("no room for the row")


def test_a_failing_deferred_logprob_fails_its_stream_alone():
    """Computing one token's log probabilities on the loop raised: that request ends with an
    EngineError and the other streams' items of the same wake-up still arrive."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        relay = Relay(loop)
        bad, good = TokenStream(loop, relay), TokenStream(loop, relay)

        def engine_thread() -> None:
            with relay.hold():
                bad.put(Token(1, _Failing()))
                good.put(Token(2))
                good.put(Finished("length", 1))

        thread = threading.Thread(target=engine_thread)
        thread.start()
        thread.join()
        items = await asyncio.wait_for(drain(good), 10)  # lost with the failing item before
        assert [type(i) for i in items] == [Token, Finished]
        try:
            await bad.next_batch(5)
        except EngineError as exc:
            assert "MemoryError" in str(exc)
        else:
            raise AssertionError("the failing stream did not raise")
        assert bad.cancelled

    asyncio.run(run())
