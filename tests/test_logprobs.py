"""Log probabilities: OpenAI's shapes on chat and text completions, streamed and not, the same
on both formats, computed inside batching from the masked and penalised distribution."""

from __future__ import annotations

import asyncio
import math

import httpx
import openai
import pytest

from backends.base import Finished, GenerationRequest, SamplingParams, Token
from mlxserve.core.grammar import json_schema_grammar
from mlxserve.core.types import Candidate, TokenLogprob
from mlxserve.routes.openai import CompletionLogprobs
from tests.conftest import GGUF_KEY, MLX_KEY
from tests.engine_harness import load

pytestmark = pytest.mark.filterwarnings("ignore:llama_token_get_attr:DeprecationWarning")

MODELS = [MLX_KEY, GGUF_KEY]
HELLO = [{"role": "user", "content": "Hello, who are you?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def chat(client, model, **kw):
    kw = {"temperature": 0, "max_tokens": 12, "logprobs": True, "top_logprobs": 5, **kw}
    return client.chat.completions.create(model=model, messages=HELLO, **kw)


def check_entry(entry, k):
    """One chat logprobs entry: OpenAI's fields, alternatives sorted, bytes matching text."""
    assert entry.logprob <= 0
    assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token or (
        entry.token.startswith("bytes:")
    )
    top = entry.top_logprobs
    assert len(top) == k
    values = [t.logprob for t in top]
    assert values == sorted(values, reverse=True)
    assert math.fsum(math.exp(v) for v in values) <= 1 + 1e-6


@pytest.mark.parametrize("model", MODELS)
def test_chat_logprobs_whole_and_streamed_agree(client, model):
    r = chat(client, model)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:
        check_entry(e, 5)
        # Greedy: the sampled token is the most likely one.
        assert e.top_logprobs[0].token == e.token
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-6)

    chunks = list(chat(client, model, stream=True))
    streamed = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in content]
    for a, b in zip(streamed, content, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)


def test_chat_logprobs_equal_across_formats(client, server):
    mlx, gguf = (chat(client, m, top_logprobs=20).choices[0].logprobs.content for m in MODELS)
    # Without flash attention (the default) llama.cpp attends in f32 as MLX does: the same
    # values within 1e-3.
    assert [e.token for e in mlx] == [e.token for e in gguf]
    for a, b in zip(mlx, gguf, strict=True):
        assert abs(a.logprob - b.logprob) < 1e-3
        assert [t.token for t in a.top_logprobs[:5]] == [t.token for t in b.top_logprobs[:5]]
        for x, y in zip(a.top_logprobs, b.top_logprobs, strict=True):
            assert abs(x.logprob - y.logprob) < 1e-3
    # llama.cpp's flash attention reads an f16 copy of the f32 K/V cache: on this model it
    # moves log probabilities by up to 1.8e-3, so near-equal alternatives may swap places.
    # The sampled tokens and every shared alternative stay within 5e-3.
    with httpx.Client(base_url=server.url, timeout=120) as http:
        body = {"model": GGUF_KEY, "identifier": "logprobs-flash", "flash_attention": True}
        r = http.post("/api/v1/models/load", json=body)
        assert r.status_code == 200, r.text
        try:
            flash = chat(client, "logprobs-flash", top_logprobs=20).choices[0]
        finally:
            http.post("/api/v1/models/unload", json={"instance_id": "logprobs-flash"})
    assert [e.token for e in mlx] == [e.token for e in flash.logprobs.content]
    for a, b in zip(mlx, flash.logprobs.content, strict=True):
        assert abs(a.logprob - b.logprob) < 5e-3
        theirs = {t.token: t.logprob for t in b.top_logprobs}
        shared = [(t.logprob, theirs[t.token]) for t in a.top_logprobs if t.token in theirs]
        assert len(shared) >= 15
        assert all(abs(x - y) < 5e-3 for x, y in shared)


@pytest.mark.parametrize("model", MODELS)
def test_sampled_token_is_the_entry_whatever_its_rank(client, model):
    # Hot sampling from a near-uniform model: the sampled token is rarely the most likely.
    r = chat(client, model, temperature=2.0, seed=7, max_tokens=16, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert "".join(e.token for e in content) == r.choices[0].message.content
    assert any(e.top_logprobs[0].token != e.token for e in content)
    for e in content:
        check_entry(e, 2)
        assert e.logprob <= e.top_logprobs[0].logprob + 1e-6


@pytest.mark.parametrize("model", MODELS)
def test_logprobs_without_top_and_off(client, model):
    r = chat(client, model, top_logprobs=None, max_tokens=4)
    assert all(e.top_logprobs == [] for e in r.choices[0].logprobs.content)
    r = chat(client, model, logprobs=None, top_logprobs=None, max_tokens=4)
    assert r.choices[0].logprobs is None


@pytest.mark.parametrize("model", MODELS)
def test_grammar_mask_shapes_the_distribution(client, model):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    r = chat(
        client,
        model,
        max_tokens=8,
        top_logprobs=20,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    )
    first = r.choices[0].logprobs.content[0]
    # Only tokens that open the object are possible, and they share all the probability.
    assert all(t.token.startswith("{") for t in first.top_logprobs)
    assert first.logprob > math.log(1 / 1000)


@pytest.mark.parametrize("model", MODELS)
def test_completions_logprobs(client, model):
    prompt = "Once upon a time"
    kw = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 3}
    r = client.completions.create(**kw)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == 8
    assert lp.text_offset[0] == len(prompt)
    assert all(len(t) == 3 for t in lp.top_logprobs)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert max(top.values()) == pytest.approx(value, abs=1e-6) and token in top

    chunks = list(client.completions.create(stream=True, **kw))
    tokens = [
        t
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.tokens
    ]
    offsets = [
        o
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for o in c.choices[0].logprobs.text_offset
    ]
    assert tokens == lp.tokens and offsets == lp.text_offset


INCLUDE = ["message.output_text.logprobs"]


@pytest.mark.parametrize("model", MODELS)
def test_responses_logprobs_equal_chat_streamed_and_not(client, model):
    chat_entries = chat(client, model, top_logprobs=3).choices[0].logprobs.content
    kw = {"model": model, "input": HELLO[0]["content"], "temperature": 0, "max_output_tokens": 12}
    r = client.responses.create(include=INCLUDE, top_logprobs=3, store=False, **kw)
    part = r.output[0].content[0]
    assert part.text == r.output_text
    assert [e.token for e in part.logprobs] == [e.token for e in chat_entries]
    for a, b in zip(part.logprobs, chat_entries, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert [t.token for t in a.top_logprobs] == [t.token for t in b.top_logprobs]
        assert bytes(a.bytes) == bytes(b.bytes)

    events = list(client.responses.create(include=INCLUDE, top_logprobs=3, stream=True, **kw))
    deltas = [e for ev in events if ev.type == "response.output_text.delta" for e in ev.logprobs]
    done = next(ev for ev in events if ev.type == "response.output_text.done")
    assert (
        [e.token for e in deltas]
        == [e.token for e in done.logprobs]
        == [e.token for e in part.logprobs]
    )
    # Not asked for: empty lists, as before.
    plain = client.responses.create(store=False, **kw)
    assert plain.output[0].content[0].logprobs == []


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("chat/completions", {"messages": HELLO, "top_logprobs": 3}, "top_logprobs"),
        (
            "chat/completions",
            {"messages": HELLO, "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
        ),
        ("chat/completions", {"messages": HELLO, "logprobs": 3}, "logprobs"),
        ("completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
        ("completions", {"prompt": "x", "logprobs": True}, "logprobs"),
        ("responses", {"input": "x", "top_logprobs": 2}, "top_logprobs"),
        ("responses", {"input": "x", "include": INCLUDE, "top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_bad_logprobs_requests_are_400_naming_the_field(server, path, body, param):
    r = httpx.post(f"{server.url}/v1/{path}", json={"model": MLX_KEY, **body}, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param


@pytest.fixture(scope="module", params=["mlx", "gguf"])
def engine(request, models_root):
    e = load(models_root, request.param, prompt_cache_bytes=0, max_batch_size=8)
    yield e
    e.close()


async def _run(engine, prompt, k, n, **sp):
    sampling = SamplingParams(**{"temperature": 0.0, **sp})
    request = GenerationRequest(tuple(prompt), sampling, n, engine.info.eos_token_ids, logprobs=k)
    out = []
    async for item in engine.submit(request):
        if isinstance(item, Token):
            out.append(item)
        elif isinstance(item, Finished):
            return out
    raise AssertionError("no Finished")


def test_batched_logprobs_equal_solo_and_mixed_requests_batch(engine):
    words = ["apple", "river", "stone", "cloud"]
    prompts = [engine.tokenize(w + " tell me more" * (i + 1)) for i, w in enumerate(words)]
    ks = [5, None, 0, 20]

    async def run():
        solo = [await _run(engine, p, k, 10) for p, k in zip(prompts, ks, strict=True)]
        together = await asyncio.gather(
            *(_run(engine, p, k, 10) for p, k in zip(prompts, ks, strict=True))
        )
        return solo, together

    solo, together = asyncio.run(run())
    for a, b, k in zip(solo, together, ks, strict=True):
        assert [t.id for t in a] == [t.id for t in b]
        if k is None:
            assert all(t.logprobs is None for t in b)
            continue
        for x, y in zip(a, b, strict=True):
            assert len(y.logprobs.top) == k
            assert abs(x.logprobs.logprob - y.logprobs.logprob) < 1e-4
            assert [i for i, _ in x.logprobs.top] == [i for i, _ in y.logprobs.top]


def test_penalties_are_in_the_reported_distribution(engine):
    # Unpenalised, greedy decoding of this prompt repeats a token at step 20 on the test
    # model. With a strong penalty greedy picks the argmax of the penalised logits, so the
    # sampled token heads the reported list only if the penalties are in it.
    prompt = engine.tokenize("a b a b a b a b")
    tokens = asyncio.run(_run(engine, prompt, 3, 24, repeat_penalty=5.0))
    assert len({t.id for t in tokens}) == len(tokens)
    for t in tokens:
        assert t.logprobs.top[0][0] == t.id


def test_grammar_mask_is_in_the_reported_distribution(engine):
    constraint = engine.grammars.constraint(json_schema_grammar({"type": "object"}, "x"))
    request = GenerationRequest(
        tuple(engine.tokenize("hi")),
        SamplingParams(temperature=0.0),
        4,
        engine.info.eos_token_ids,
        constraint=constraint,
        logprobs=20,
    )

    async def first():
        async for item in engine.submit(request):
            if isinstance(item, Token):
                return item
        raise AssertionError("no token")

    token = asyncio.run(first())
    assert token.logprobs.top and token.logprobs.top[0][0] == token.id
    assert all(engine.token_bytes(i).startswith(b"{") for i, _ in token.logprobs.top)


def test_v0_completions_text_offset_counts_from_the_prompt(server, client):
    """OpenAI's rule: each token's offset in prompt + completion (v0 counted from 0)."""
    prompt = "Once upon a time"
    body = {"model": GGUF_KEY, "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 2}
    r = httpx.post(f"{server.url}/api/v0/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert lp["text_offset"][0] == len(prompt)
    whole = prompt + choice["text"]
    for token, offset in zip(lp["tokens"], lp["text_offset"], strict=True):
        assert token.startswith("bytes:") or whole[offset : offset + len(token)] == token
    assert lp["text_offset"] == client.completions.create(**body).choices[0].logprobs.text_offset


def test_text_offset_of_a_character_split_over_tokens():
    def entry(raw: bytes) -> TokenLogprob:
        candidate = Candidate(raw.decode("utf-8", errors="replace"), raw, -0.5)
        return TokenLogprob(candidate, (candidate,))

    rendered = CompletionLogprobs("Say: ")
    first = rendered.render([entry(b"\xc3"), entry(b"\xa9t")])  # "é" split, then "t"
    second = rendered.render([entry(b"\xe2\x82"), entry(b"\xac"), entry(b"!")])  # "€", "!"
    # "Say: ét€!": each token starts where its first whole character does.
    assert first["text_offset"] == [5, 5]
    assert second["text_offset"] == [7, 7, 8]


def test_v0_chat_carries_logprobs(server):
    body = {"model": GGUF_KEY, "messages": HELLO, "max_tokens": 4, "temperature": 0}
    r = httpx.post(
        f"{server.url}/api/v0/chat/completions",
        json={**body, "logprobs": True, "top_logprobs": 2},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 4 and all(len(e["top_logprobs"]) == 2 for e in content)
    assert "stats" in r.json()
