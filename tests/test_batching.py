"""Continuous batching (MLX) and parallel sequences (GGUF): at temperature 0 every request
in a batch produces exactly what it produces alone, whatever joins or leaves around it."""

from __future__ import annotations

import asyncio

import openai
import pytest

from backends.base import Finished, GenerationRequest, SamplingParams, Token
from mlxserve.core.grammar import json_schema_grammar
from tests.conftest import GGUF_KEY, MLX_KEY
from tests.engine_harness import generate, load

# llguidance builds its GGUF tokenizer with a llama-cpp-python call deprecated per token.
pytestmark = pytest.mark.filterwarnings("ignore:llama_token_get_attr:DeprecationWarning")

FORMATS = ["mlx", "gguf"]
WORDS = ["apple", "river", "stone", "cloud", "music", "green", "paper", "light"]


def prompts(engine, n):
    # Different lengths (1 to ~150 tokens) and different first tokens, so that neither the
    # prompt cache nor equal padding hides a batching error.
    return [engine.tokenize(f"{WORDS[i]} " + "tell me more " * (i * i * 2)) for i in range(n)]


@pytest.fixture(scope="module", params=FORMATS)
def engine(request, models_root):
    # No prompt cache: every request here is processed cold, alone or in a batch. GGUF
    # without flash attention, where batched = solo is exact (tests/test_gguf_attention.py).
    options = {"flash_attention": False} if request.param == "gguf" else {}
    e = load(models_root, request.param, prompt_cache_bytes=0, max_batch_size=8, **options)
    yield e
    e.close()


def test_concurrent_requests_equal_their_solo_outputs(engine):
    ps = prompts(engine, 8)
    lengths = [8, 24, 12, 30, 5, 18, 27, 9]

    async def run():
        solo = [await generate(engine, p, n) for p, n in zip(ps, lengths, strict=True)]
        together = await asyncio.gather(
            *(generate(engine, p, n) for p, n in zip(ps, lengths, strict=True))
        )
        return solo, together

    solo, together = asyncio.run(run())
    assert [r.tokens for r in together] == [r.tokens for r in solo]
    assert [r.reason for r in together] == [r.reason for r in solo]
    assert all(r.reason == "length" for r in solo)


def test_requests_joining_a_running_batch_equal_their_solo_outputs(engine):
    ps = prompts(engine, 5)

    async def run():
        solo = [await generate(engine, p, 20) for p in ps]

        async def later(i):
            await asyncio.sleep(0.02 * i)
            return await generate(engine, ps[i], 20)

        return solo, await asyncio.gather(*(later(i) for i in range(len(ps))))

    solo, staggered = asyncio.run(run())
    assert [r.tokens for r in staggered] == [r.tokens for r in solo]


def test_cancelling_one_request_leaves_the_others_intact(engine):
    ps = prompts(engine, 4)

    async def run():
        solo = [await generate(engine, p, 20) for p in ps]
        mixed = await asyncio.gather(
            generate(engine, ps[0], 400, cancel_after=3),
            *(generate(engine, p, 20) for p in ps[1:]),
        )
        return solo, mixed

    solo, mixed = asyncio.run(run())
    assert mixed[0].reason == "cancelled"
    assert mixed[0].tokens == solo[0].tokens[: len(mixed[0].tokens)]
    assert [r.tokens for r in mixed[1:]] == [r.tokens for r in solo[1:]]
    assert engine.pending == 0


def test_grammar_sampling_and_seed_inside_a_batch(engine):
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    grammar = json_schema_grammar(schema, "response_format")
    prompt = engine.tokenize("Give me JSON")

    async def constrained():
        request = GenerationRequest(
            tuple(prompt),
            SamplingParams(temperature=0),
            40,
            engine.info.eos_token_ids,
            engine.grammars.constraint(grammar),
        )
        pieces = []
        async for item in engine.submit(request):
            if isinstance(item, Token):
                pieces.append(engine.token_bytes(item.id))
            elif isinstance(item, Finished):
                return b"".join(pieces)
        raise AssertionError("the stream ended without Finished")

    async def run():
        alone = await constrained()
        seeded_alone = await generate(engine, prompt, 12, temperature=0.9, seed=7)
        others = [
            generate(engine, prompt, 12, temperature=0.9, top_k=5, top_p=0.9, min_p=0.05),
            generate(engine, prompt, 12, temperature=0.7, repeat_penalty=1.3),
            generate(engine, prompt, 12, presence_penalty=0.5, frequency_penalty=0.5),
        ]
        together = await asyncio.gather(
            constrained(), generate(engine, prompt, 12, temperature=0.9, seed=7), *others
        )
        return alone, seeded_alone, together

    alone, seeded_alone, together = asyncio.run(run())
    assert alone == together[0]
    assert b'"n"' in alone
    assert together[1].tokens == seeded_alone.tokens
    assert all(len(r.tokens) == 12 for r in together[2:])


@pytest.mark.parametrize("model", [MLX_KEY, GGUF_KEY])
def test_concurrent_openai_streams_equal_their_solo_outputs(server, model):
    msgs = [
        [{"role": "user", "content": f"{WORDS[i]}: " + "say more " * (i * 6)}] for i in range(6)
    ]
    lengths = [10, 25, 16, 30, 8, 20]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    alone = [
        client.chat.completions.create(model=model, messages=m, temperature=0, max_tokens=n)
        .choices[0]
        .message.content
        for m, n in zip(msgs, lengths, strict=True)
    ]

    async def run():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)

        async def one(m, n):
            parts = []
            stream = await aclient.chat.completions.create(
                model=model, messages=m, stream=True, temperature=0, max_tokens=n
            )
            async for c in stream:
                if c.choices and c.choices[0].delta.content:
                    parts.append(c.choices[0].delta.content)
            return "".join(parts)

        try:
            return await asyncio.gather(*(one(m, n) for m, n in zip(msgs, lengths, strict=True)))
        finally:
            await aclient.close()

    assert asyncio.run(run()) == alone
