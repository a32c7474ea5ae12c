"""MLX image prompts processed a chunk per engine step (backends/mlx/vision_prefill.py), with
a prefill chunk smaller than the image: the image request joins the batch beside a decoding
text stream (and a seeded one runs alone) and both still give mlx-vlm's own greedy reply;
grammars and seeds apply to image requests."""

from __future__ import annotations

import asyncio
import io

import pytest

from backends import open_engine
from backends.base import (
    Finished,
    GenerationRequest,
    LoadOptions,
    PromptProgress,
    SamplingParams,
    Token,
)
from mlxserve.core.grammar import json_schema_grammar
from tests.engine_harness import generate
from tests.test_vision import vision_models  # noqa: F401 - fixture
from tests.vision_support import IMG_A, QUESTION, VL_KEY, N

pytest.importorskip("mlx_vlm")
PIL = pytest.importorskip("PIL.Image")

CHUNK = 16


@pytest.fixture(scope="module")
def setup(vision_models):  # noqa: F811 - test_vision's fixture
    from mlx_vlm import generate as vlm_generate
    from mlx_vlm import load as vlm_load

    folder = vision_models / VL_KEY
    model, processor = vlm_load(str(folder))
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
    ]
    prompt = processor.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    picture = PIL.open(io.BytesIO(IMG_A)).convert("RGB")
    want = vlm_generate(model, processor, prompt, image=[picture], max_tokens=N, temperature=0.0)
    options = LoadOptions(context_length=1024, prefill_chunk=CHUNK, prompt_cache_bytes=0)
    engine = open_engine("mlx", folder, options)
    yield engine, engine.prepare_vision(prompt, [picture]), want.text
    engine.close()


async def _image(engine, vision, constraint=None, **sampling) -> tuple[list[int], list[int]]:
    """The image request's tokens and the prompt positions each progress report gave."""
    request = GenerationRequest(
        vision.tokens,
        SamplingParams(**{"temperature": 0.0, **sampling}),
        N,
        frozenset(),
        constraint,
        vision=vision.payload,
    )
    tokens, progress = [], []
    async for item in engine.submit(request):
        if isinstance(item, Token):
            tokens.append(item.id)
        elif isinstance(item, PromptProgress):
            progress.append(item.processed)
        elif isinstance(item, Finished):
            return tokens, progress
    raise AssertionError("the stream ended without Finished")


def _text(engine, tokens: list[int]) -> str:
    return b"".join(engine.token_bytes(t) for t in tokens).decode()


@pytest.mark.parametrize("seed", [None, 7], ids=["batched", "seeded"])
def test_an_image_prompt_is_processed_a_chunk_per_step_beside_a_decoding_stream(setup, seed):
    engine, vision, want = setup
    sampling = {} if seed is None else {"seed": seed}

    async def run():
        started = engine.generated_tokens
        text = asyncio.create_task(generate(engine, engine.tokenize("Tell me a story"), 60))
        while engine.generated_tokens == started:  # until the text stream decodes
            await asyncio.sleep(0.01)
        image = await _image(engine, vision, **sampling)
        return image, await text

    before = engine.batched_tokens
    (tokens, progress), story = asyncio.run(run())
    assert _text(engine, tokens) == want
    # The vision tower's step, then positions a chunk at a time (no report at the end).
    steps = [b - a for a, b in zip([0, *progress], progress, strict=False)]
    assert len(progress) >= len(vision.tokens) // CHUNK - 1 and max(steps) <= CHUNK
    batched = engine.batched_tokens - before
    # Every token the batch sampled, a stop token included; the seeded request's came from
    # mlx-vlm alone.
    story_sampled = len(story.tokens) + (story.reason == "stop")
    assert batched == story_sampled + (len(tokens) if seed is None else 0)


def test_image_requests_take_grammars_and_seeds(setup):
    """A grammar applies to an image request in the batch; a seeded image request (alone, its
    draws independent of its neighbours) repeats itself."""
    engine, vision, _ = setup
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    constraint = engine.grammars.constraint(json_schema_grammar(schema, "response_format"))
    tokens, _ = asyncio.run(_image(engine, vision, constraint))
    assert _text(engine, tokens).startswith('{"n":')
    seeded = [asyncio.run(_image(engine, vision, temperature=1.0, seed=7))[0] for _ in range(2)]
    assert seeded[0] == seeded[1]
