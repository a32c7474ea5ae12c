"""GGUF image prompts evaluated a bounded piece per engine step, beside running streams, on
the tiny Qwen2-VL + projector (scripts/make_vision_models.py), driven at the engine level."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from script_loader import load_script

from backends import open_engine
from backends.base import (
    Engine,
    Finished,
    GenerationRequest,
    LoadOptions,
    PromptProgress,
    SamplingParams,
    Token,
)
from tests.conftest import MODELS_CACHE, PUBLISHER

PIL = pytest.importorskip("PIL.Image")

VISION_ROOT = MODELS_CACHE.parent / "vision-models"
# Image embeddings decoded per step while other streams decode.
BATCH = 32


@pytest.fixture(scope="module")
def model_file() -> Path:
    module = load_script("make_vision_models")
    module.generate(VISION_ROOT, publisher=PUBLISHER)
    return next((VISION_ROOT / PUBLISHER / "tiny-qwen2-vl-gguf").glob("tiny-*.gguf"))


def _open(model_file: Path, **options: Any) -> Engine:
    # Flash attention off: only so are replies from reused cells exact (see
    # tests/test_gguf_attention.py), and these tests compare them with cold runs.
    kw = {
        "context_length": 1024,
        "kv_cache_f32": True,
        "eval_batch_size": BATCH,
        "flash_attention": False,
        **options,
    }
    return open_engine("gguf", model_file, LoadOptions(**kw))


def _picture(seed: int, size: int = 224) -> Any:
    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype("uint8")
    return PIL.fromarray(pixels)


def _vision_request(
    engine: Engine, text: str, pictures: list[Any], max_tokens: int = 6
) -> GenerationRequest:
    prepared = engine.prepare_vision(text, pictures)
    return GenerationRequest(
        prepared.tokens,
        SamplingParams(temperature=0.0),
        max_tokens,
        engine.info.eos_token_ids,
        vision=prepared.payload,
    )


def _image_request(
    engine: Engine, seed: int, question: str, max_tokens: int = 6, size: int = 224
) -> Any:
    marker = engine.info.image_marker
    text = (
        f"<|im_start|>user\n<|vision_start|>{marker}<|vision_end|>{question}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    return _vision_request(engine, text, [_picture(seed, size)], max_tokens)


def _text_request(engine: Engine, text: str, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(
        tuple(engine.tokenize(text)),
        SamplingParams(temperature=0.0),
        max_tokens,
        frozenset(),  # no end of stream: it decodes all of max_tokens
    )


async def _collect(stream: Any, events: list[tuple[str, Any]], name: str) -> list[int]:
    tokens: list[int] = []
    async for item in stream:
        if isinstance(item, Token):
            tokens.append(item.id)
            events.append((name, item.id))
        elif isinstance(item, PromptProgress):
            events.append((f"{name}-progress", item.processed))
        elif isinstance(item, Finished):
            return tokens
    raise AssertionError("no Finished")


def test_an_image_prompt_takes_one_bounded_piece_per_step(model_file):
    """A 224x224 image is 64 embeddings: with 32 decoded per step beside a running stream,
    that stream keeps producing tokens while the image prompt is evaluated (its text, the
    encoding, then two slices), and both replies equal their solo runs. No prompt cache:
    the solo run's would serve the image."""
    engine = _open(model_file, prompt_cache_bytes=0)
    try:

        async def main() -> None:
            events: list[tuple[str, Any]] = []
            text = _text_request(engine, "Once upon a time", 40)
            solo_text = await _collect(engine.submit(text), [], "solo")
            solo_image = await _collect(
                engine.submit(_image_request(engine, 1, "What is this?")), [], "solo"
            )
            running = asyncio.ensure_future(_collect(engine.submit(text), events, "text"))
            while sum(1 for e in events if e[0] == "text") < 3:
                await asyncio.sleep(0.005)
            image = await _collect(
                engine.submit(_image_request(engine, 1, "What is this?")), events, "image"
            )
            together = await running
            assert image == solo_image and together == solo_text
            start = next(i for i, e in enumerate(events) if e[0] == "image-progress")
            first = next(i for i, e in enumerate(events) if e[0] == "image")
            between = [e for e in events[start:first] if e[0] == "text"]
            # The text before the image, its encoding, two 32-embedding slices, the text
            # after it: a step each, and the running stream got a token in every one of them.
            assert len(between) >= 4, events[start : first + 1]
            # Progress is reported per piece: at the image's start, and after each slice.
            processed = [e[1] for e in events[start:first] if e[0] == "image-progress"]
            assert len(set(processed)) >= 3, processed

        asyncio.run(main())
    finally:
        engine.close()


def _two_images(engine: Engine, seed: int) -> GenerationRequest:
    marker = engine.info.image_marker
    image = f"<|vision_start|>{marker}<|vision_end|>"
    text = (
        f"<|im_start|>user\n{image}and{image}What are these two?<|im_end|>\n<|im_start|>assistant\n"
    )
    return _vision_request(engine, text, [_picture(seed), _picture(seed + 10)])


def test_image_prompts_that_do_not_fit_the_pool_together_wait_for_room(model_file):
    """Two prompts of two images each (152 positions), each fitting the 200-cell pool alone,
    sent at once: a sequence reading an image is not preempted, so the second waits until
    the first's prompt has room (admitted beside it, both stopped mid-image with no free cell
    and nothing to preempt, the engine spinning for ever). Both replies equal their solo
    runs."""
    engine = _open(model_file, context_length=200, parallel=2, prompt_cache_bytes=0)
    try:

        async def main() -> None:
            solo = [
                await _collect(engine.submit(_two_images(engine, i)), [], "solo") for i in (1, 2)
            ]
            requests = [_two_images(engine, i) for i in (1, 2)]
            assert all(len(r.prompt) + r.max_tokens <= 200 for r in requests)
            assert sum(len(r.prompt) for r in requests) > 200
            # Both are taken in by the same step: the owner thread runs its queued calls
            # (this one, then both admissions) before it steps.
            gate = threading.Event()
            engine.call(gate.wait)
            streams = [engine.submit(r) for r in requests]
            gate.set()
            together = asyncio.gather(*(_collect(s, [], "together") for s in streams))
            try:
                assert await asyncio.wait_for(together, 60) == solo
            finally:
                for stream in streams:
                    stream.cancel()

        asyncio.run(main())
    finally:
        engine.close()


def test_an_image_decoded_whole_waits_for_its_cells_instead_of_failing_every_stream(
    model_file, monkeypatch
):
    """A model that attends to an image non-causally (Gemma 3) has llama.cpp decode it whole,
    whatever the step's room: here the tiny Qwen2-VL is told so. Three stories fill the
    256-cell pool while the image prompt is read; its 64 embeddings must wait until that
    many cells are free (a story preempted for them), where a decode without room failed
    every stream ("decoding an image failed (1)"). All four equal their solo runs."""
    from llama_cpp import mtmd_cpp

    monkeypatch.setattr(mtmd_cpp, "mtmd_decode_use_non_causal", lambda ctx, chunk: True)
    # Non-causal attention takes a whole image in one micro-batch: 64 embeddings.
    engine = _open(
        model_file, context_length=256, parallel=4, eval_batch_size=64, prompt_cache_bytes=0
    )
    try:

        def requests() -> list[GenerationRequest]:
            story = "Story {0}: once upon a time there was a " * 5
            stories = [_text_request(engine, story.format(i), 150) for i in (1, 2, 3)]
            # The image after a long text: the stories hold their cells by the time it comes.
            marker = engine.info.image_marker
            text = (
                f"<|im_start|>user\n{'Look at this one. ' * 8}<|vision_start|>{marker}"
                "<|vision_end|>What?<|im_end|>\n<|im_start|>assistant\n"
            )
            return [*stories, _vision_request(engine, text, [_picture(1)])]

        async def main() -> None:
            solo = [await _collect(engine.submit(r), [], "solo") for r in requests()]
            together = requests()
            assert sum(len(r.prompt) for r in together) + 3 * 6 > 256
            gate = threading.Event()
            engine.call(gate.wait)
            streams = [engine.submit(r) for r in together]
            gate.set()
            try:
                got = await asyncio.wait_for(
                    asyncio.gather(*(_collect(s, [], "together") for s in streams)), 120
                )
            finally:
                for stream in streams:
                    stream.cancel()
            assert got == solo
            assert engine.preempted >= 1

        asyncio.run(main())
    finally:
        engine.close()


async def _run(engine: Engine, request: GenerationRequest) -> tuple[list[int], int]:
    """The reply's tokens and how many prompt tokens came from the prompt cache."""
    tokens: list[int] = []
    cached = 0
    async for item in engine.submit(request):
        if isinstance(item, Token):
            tokens.append(item.id)
        elif isinstance(item, PromptProgress):
            cached = max(cached, item.cached)
        elif isinstance(item, Finished):
            return tokens, cached
    raise AssertionError("no Finished")


def _two_turns(engine: Engine, second_image: bool) -> GenerationRequest:
    marker = engine.info.image_marker
    text = (
        f"<|im_start|>user\n<|vision_start|>{marker}<|vision_end|>What is this?<|im_end|>\n"
        "<|im_start|>assistant\nA picture.<|im_end|>\n<|im_start|>user\n"
    )
    pictures = [_picture(1)]
    if second_image:
        text += f"<|vision_start|>{marker}<|vision_end|>"
        pictures.append(_picture(2, 112))
    text += "And this one?<|im_end|>\n<|im_start|>assistant\n"
    return _vision_request(engine, text, pictures)


def test_a_later_image_reuses_the_cached_first_one(model_file):
    """A second turn that adds an image takes the first image's cells from the prompt cache
    and evaluates only the rest (the new image at positions after the first one's M-RoPE
    span); its reply equals an engine's without a prompt cache."""
    warm = _open(model_file)
    cold = _open(model_file, prompt_cache_bytes=0)
    try:

        async def main() -> None:
            first = _image_request(warm, 1, "What is this?")
            await _run(warm, first)
            for second_image in (True, False):
                request = _two_turns(warm, second_image)
                got, cached = await _run(warm, request)
                want, none = await _run(cold, _two_turns(cold, second_image))
                assert none == 0 and got == want
                # The first turn's prompt (its image included) is served from the cache.
                assert cached >= len(first.prompt) - 1, (cached, len(first.prompt))

        asyncio.run(main())
    finally:
        warm.close()
        cold.close()


def test_image_prefixes_spill_to_disk_and_serve_after_an_unload(model_file, tmp_path):
    """At unload the kept image sequences are written to the prompt-cache folder, keyed by
    their cells (an image's hold its pixels' hash); a new load of the model reads the entry
    back for the second turn, whose reply equals an engine's without any cache. Another
    image at the same place does not hit it."""
    spill = {"prompt_cache_dir": tmp_path, "prompt_cache_disk_bytes": 1 << 30}

    async def first_turn() -> int:
        engine = _open(model_file, **spill)
        try:
            request = _image_request(engine, 1, "What is this?")
            await _run(engine, request)
            return len(request.prompt)
        finally:
            engine.close()

    async def second_turn(**options: Any) -> tuple[list[int], int]:
        engine = _open(model_file, **options)
        try:
            return await _run(engine, _two_turns(engine, second_image=False))
        finally:
            engine.close()

    async def main() -> None:
        n = await first_turn()
        assert list(tmp_path.glob("*/*.kv")), "nothing spilled"
        got, cached = await second_turn(**spill)
        want, none = await second_turn(prompt_cache_bytes=0)
        assert none == 0 and got == want
        assert cached >= n - 1, (cached, n)

        # A different image: the entry's marks differ from the first image cell on.
        engine = _open(model_file, **spill)
        try:
            _, cached = await _run(engine, _image_request(engine, 2, "What is this?"))
        finally:
            engine.close()
        assert cached == 0

    asyncio.run(main())


def test_a_request_cancelled_inside_its_image_leaves_a_cache_that_serves_correctly(model_file):
    """Cancelled between two slices of its image (a stream decoding beside it keeps the
    slices at 32 embeddings), a request leaves a kept sequence that ends inside the image;
    the same prompt again reuses it only up to the image's start and replies as an engine
    without a prompt cache."""
    warm = _open(model_file)
    cold = _open(model_file, prompt_cache_bytes=0)
    try:

        async def main() -> None:
            events: list[tuple[str, Any]] = []
            text = _text_request(warm, "Once upon a time", 400)
            running = warm.submit(text)
            beside = asyncio.ensure_future(_collect(running, events, "text"))
            while not events:
                await asyncio.sleep(0.005)
            request = _image_request(warm, 3, "What is this?", size=448)
            image = request.vision.images[0]
            projector = cast(Any, warm)._projector
            decode = projector.decode

            def first_slice_then_cancel(*args: Any) -> int:
                # On the owner thread: the next step sees the cancel before another slice.
                projector.decode = decode
                n = decode(*args)
                stream.cancel()
                return n

            projector.decode = first_slice_then_cancel
            stream = warm.submit(request)
            async for item in stream:
                if isinstance(item, Finished):
                    assert item.reason == "cancelled"
                    break
            assert 0 < image.done < image.n
            running.cancel()
            await beside
            got, cached = await _run(warm, _image_request(warm, 3, "What is this?", size=448))
            want, _ = await _run(cold, _image_request(cold, 3, "What is this?", size=448))
            assert got == want
            assert 0 < cached <= image.start

        asyncio.run(main())
    finally:
        warm.close()
        cold.close()
