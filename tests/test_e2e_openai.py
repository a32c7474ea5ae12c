"""End to end: the official openai SDK against a real server running both real engines."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.conftest import GGUF_KEY, MLX_KEY

MODELS = [MLX_KEY, GGUF_KEY]
HELLO = [{"role": "user", "content": "Hello, who are you?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def chat(client, model, messages=HELLO, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 24)
    return client.chat.completions.create(model=model, messages=messages, **kw)


def stream_text(client, model, messages=HELLO, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 24)
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            **kw,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    return text, finish, chunks


def test_models_are_listed(client):
    ids = {m.id for m in client.models.list()}
    assert {MLX_KEY, GGUF_KEY} <= ids
    assert client.models.retrieve(MLX_KEY).owned_by == "mlxserve-test"


@pytest.mark.parametrize("model", MODELS)
def test_chat_completion(client, model):
    r = chat(client, model)
    assert r.object == "chat.completion" and r.model == model
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5
    assert 1 <= r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


@pytest.mark.parametrize("model", MODELS)
def test_streamed_chat_equals_unstreamed(client, model):
    whole = chat(client, model)
    text, finish, chunks = stream_text(client, model)
    assert text == whole.choices[0].message.content
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant"
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        whole.usage.prompt_tokens,
        whole.usage.completion_tokens,
    )
    assert all(c.usage is None for c in chunks[:-1])


def test_no_usage_chunk_unless_asked(client):
    chunks = list(
        client.chat.completions.create(
            model=MLX_KEY, messages=HELLO, stream=True, max_tokens=4, temperature=0
        )
    )
    assert all(c.choices for c in chunks)


@pytest.mark.parametrize(
    "messages",
    [
        HELLO,
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name three colours, please."},
        ],
        [{"role": "user", "content": "Café, naïve, 日本語 and emoji 🎉: say something."}],
    ],
)
def test_format_parity_chat(client, messages):
    """Same weights as MLX and as GGUF: identical text and usage at temperature 0."""
    a = chat(client, MLX_KEY, messages, max_tokens=32)
    b = chat(client, GGUF_KEY, messages, max_tokens=32)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].finish_reason == b.choices[0].finish_reason
    # cached_tokens depends on what each engine's prompt cache saw before.
    assert a.usage.model_dump(exclude={"prompt_tokens_details"}) == b.usage.model_dump(
        exclude={"prompt_tokens_details"}
    )


def test_format_parity_completions_and_stream(client):
    out = {}
    for model in MODELS:
        r = client.completions.create(
            model=model, prompt="Once upon a time", max_tokens=20, temperature=0
        )
        s = list(
            client.completions.create(
                model=model, prompt="Once upon a time", max_tokens=20, temperature=0, stream=True
            )
        )
        assert "".join(c.choices[0].text for c in s) == r.choices[0].text
        assert r.object == "text_completion"
        usage = r.usage.model_dump(exclude={"prompt_tokens_details"})
        out[model] = (r.choices[0].text, r.choices[0].finish_reason, usage)
    assert out[MLX_KEY] == out[GGUF_KEY]


@pytest.mark.parametrize("model", MODELS)
def test_max_tokens_gives_length(client, model):
    r = chat(client, model, max_tokens=3, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3


@pytest.mark.parametrize("model", MODELS)
def test_stop_string_cuts_output(client, model):
    full = chat(client, model, max_tokens=40, extra_body={"ignore_eos": True})
    text = full.choices[0].message.content
    stop = next((text[i : i + 3] for i in range(4, len(text) - 3) if text[i : i + 3].strip()), None)
    if stop is None:
        pytest.skip("the model's output has no usable substring")
    r = chat(client, model, max_tokens=40, stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < full.usage.completion_tokens
    streamed, finish, _ = stream_text(
        client, model, max_tokens=40, stop=stop, extra_body={"ignore_eos": True}
    )
    assert streamed == r.choices[0].message.content and finish == ["stop"]


@pytest.mark.parametrize("model", MODELS)
def test_seed_makes_sampling_reproducible(client, model):
    kw = dict(
        temperature=1.0,
        top_p=0.9,
        max_tokens=16,
        extra_body={"ignore_eos": True, "repeat_penalty": 1.1, "top_k": 50, "min_p": 0.01},
    )
    a = chat(client, model, seed=1234, presence_penalty=0.5, frequency_penalty=0.5, **kw)
    b = chat(client, model, seed=1234, presence_penalty=0.5, frequency_penalty=0.5, **kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    others = {chat(client, model, seed=s, **kw).choices[0].message.content for s in range(4)}
    assert len(others) > 1, "different seeds should sample differently"


def test_ten_concurrent_streams_across_two_models(server, client):
    prompts = [f"Tell me about the number {i}." for i in range(10)]
    jobs = [(MODELS[i % 2], [{"role": "user", "content": p}]) for i, p in enumerate(prompts)]
    alone = [chat(client, m, msgs, max_tokens=20).choices[0].message.content for m, msgs in jobs]

    async def run():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)

        async def one(model, msgs):
            parts = []
            stream = await aclient.chat.completions.create(
                model=model, messages=msgs, stream=True, temperature=0, max_tokens=20
            )
            async for c in stream:
                if c.choices and c.choices[0].delta.content:
                    parts.append(c.choices[0].delta.content)
            return "".join(parts)

        try:
            return await asyncio.gather(*(one(m, msgs) for m, msgs in jobs))
        finally:
            await aclient.close()

    together = asyncio.run(run())
    assert together == alone


def _instance(server, key):
    return next(i for i in server.health()["loaded"] if i["id"] == key)


@pytest.mark.parametrize("model", MODELS)
def test_disconnect_mid_stream_frees_the_engine(server, client, model):
    chat(client, model, max_tokens=2)  # loaded
    before = _instance(server, model)["generated_tokens"]
    body = {
        "model": model,
        "messages": HELLO,
        "stream": True,
        "max_tokens": 3500,
        "temperature": 0,
        "ignore_eos": True,
    }
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        seen = 0
        for line in lines:
            if line.startswith("data: "):
                seen += 1
            if seen >= 4:
                break
    deadline = time.monotonic() + 20
    while _instance(server, model)["pending"] and time.monotonic() < deadline:
        time.sleep(0.05)
    inst = _instance(server, model)
    assert inst["pending"] == 0
    # The abandoned request stopped long before its 3500 tokens.
    assert inst["generated_tokens"] - before < 1500
    r = chat(client, model, max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("model", MODELS)
def test_prompt_longer_than_context(client, model):
    long = "hello " * 5000
    for call in (
        lambda: chat(client, model, [{"role": "user", "content": long}]),
        lambda: client.completions.create(model=model, prompt=long, max_tokens=4),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert e.value.code == "context_length_exceeded"
        assert "4096" in e.value.message


@pytest.mark.parametrize("model", MODELS)
def test_bad_requests_on_a_loaded_model(server, client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=[], max_tokens=4)
    assert e.value.param == "messages"
    with pytest.raises(openai.BadRequestError):
        chat(client, model, temperature=9)
    with pytest.raises(openai.NotFoundError):
        chat(client, model + "-nope")
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"model": ', timeout=10)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    # ...and the server keeps serving
    assert chat(client, model, max_tokens=2).choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("model", MODELS)
def test_top_k_beyond_the_vocabulary_keeps_every_token(client, model):
    r = chat(client, model, max_tokens=4, extra_body={"top_k": 100_000}, temperature=0.7)
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("model", MODELS)
def test_health_reports_what_the_prompt_cache_holds_beside_the_kv_windows(server, client, model):
    # Two unrelated chats: the first is kept (MLX: an entry beside the batch); on GGUF the
    # second's admission moves it out of the context to host memory (without flash attention,
    # the default), where it is what the prompt cache adds to the model's memory.
    chat(client, model, [{"role": "user", "content": "Name three rivers of Europe."}], max_tokens=4)
    chat(client, model, [{"role": "user", "content": "Count to ten in French."}], max_tokens=4)
    assert _instance(server, model)["prompt_cache_held_bytes"] > 0
