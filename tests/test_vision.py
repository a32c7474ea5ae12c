"""Vision end to end: a tiny random-weight Qwen2-VL (scripts/make_vision_models.py) served
through mlx-vlm, with images in every dialect, against the engine library's own output."""

from __future__ import annotations

import base64
import io
import threading
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from script_loader import load_script

from tests.conftest import GGUF_KEY, MLX_KEY, PUBLISHER
from tests.vision_support import (
    IMG_A,
    IMG_B,
    IMG_WIDE,
    QUESTION,
    VISION_ROOT,
    VL_GGUF_KEY,
    VL_KEY,
    VL_MODELS,
    N,
    _ask,
    _data_url,
    _Handler,
    _image_body,
    _Images,
    _png,
    _serve,
    _status,
    _together_equals_solo,
)

pytest.importorskip("mlx_vlm")
PIL = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def image_host():
    host = _Images(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=host.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{host.server_address[1]}"
    host.shutdown()


@pytest.fixture(scope="module")
def vision_models(models_root) -> Path:
    """A models directory with the vision model and the tiny text model beside it."""
    module = load_script("make_vision_models")
    module.generate(VISION_ROOT, publisher=PUBLISHER)
    for key in (MLX_KEY, GGUF_KEY):  # text models: a GGUF without a projector is one
        text = VISION_ROOT / key
        if not text.exists():
            text.symlink_to(models_root / key, target_is_directory=True)
    return VISION_ROOT


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vision-home")


@pytest.fixture(scope="module")
def server(vision_models, home, image_host):
    srv = _serve(vision_models, home, image_host)
    # GGUF replies are compared with llama-cpp-python's own, which leaves flash attention
    # off: only so are they exact once cells are reused (tests/test_gguf_attention.py).
    r = httpx.post(
        srv.url + "/api/v1/models/load",
        json={"model": VL_GGUF_KEY, "flash_attention": False},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def gguf_reference(vision_models):
    """llama-cpp-python's own mtmd chat handler, in process: greedy text for an image."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler

    folder = vision_models / VL_GGUF_KEY
    handler = MTMDChatHandler(
        clip_model_path=str(folder / "mmproj-tiny-qwen2-vl-f32.gguf"), verbose=False
    )
    llm = Llama(
        model_path=str(folder / "tiny-qwen2-vl-f32.gguf"),
        chat_handler=handler,
        n_ctx=1024,
        verbose=False,
        # An f32 KV cache, as the server keeps for f32 weights.
        type_k=0,
        type_v=0,
    )

    def run(image: bytes, question: str = QUESTION, later: tuple[dict, ...] = ()) -> str:
        content = [
            {"type": "image_url", "image_url": {"url": _data_url(image)}},
            {"type": "text", "text": question},
        ]
        messages = [{"role": "user", "content": content}, *later]
        # Its default repeat_penalty is 1.1; the server's is 1.0.
        r = llm.create_chat_completion(
            messages=messages, max_tokens=N, temperature=0, repeat_penalty=1.0
        )
        return r["choices"][0]["message"]["content"]

    yield run
    llm.close()


@pytest.fixture(scope="module")
def reference(vision_models):
    """mlx-vlm itself, in process: greedy text for (image bytes, question)."""
    from mlx_vlm import generate, load

    model, processor = load(str(vision_models / VL_KEY))

    def run(image: bytes, question: str = QUESTION, later: tuple[dict, ...] = ()) -> str:
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            *later,
        ]
        prompt = processor.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        picture = PIL.open(io.BytesIO(image)).convert("RGB")
        result = generate(model, processor, prompt, image=[picture], max_tokens=N, temperature=0.0)
        return result.text

    return run


def test_listed_with_vision(server):
    v1 = httpx.get(server.url + "/api/v1/models", timeout=10).json()["models"]
    caps = {m["key"]: m["capabilities"]["vision"] for m in v1 if "capabilities" in m}
    assert caps == {VL_KEY: True, VL_GGUF_KEY: True, MLX_KEY: False, GGUF_KEY: False}
    v0 = {m["id"]: m["type"] for m in httpx.get(server.url + "/api/v0/models").json()["data"]}
    assert v0[VL_KEY] == v0[VL_GGUF_KEY] == "vlm" and v0[MLX_KEY] == v0[GGUF_KEY] == "llm"


@pytest.mark.parametrize("model", VL_MODELS)
def test_reply_equals_the_engine_library_and_images_matter(oai, reference, gguf_reference, model):
    own = reference if model == VL_KEY else gguf_reference
    a = _ask(oai, _data_url(IMG_A), model=model)
    assert a.choices[0].message.content == own(IMG_A)
    again = _ask(oai, _data_url(IMG_A), model=model)
    assert again.choices[0].message.content == a.choices[0].message.content
    b = _ask(oai, _data_url(IMG_B), model=model)
    assert b.choices[0].message.content == own(IMG_B)
    assert b.choices[0].message.content != a.choices[0].message.content
    # The same weights as MLX and as GGUF+projector: the same reply.
    assert a.choices[0].message.content == reference(IMG_A)
    # 112x112 pixels are 8x8 patches, 4x4 merged image tokens; twice as wide, twice as many
    # (plus the vision start and end markers).
    text = _ask(oai, None, model=model)
    wide = _ask(oai, _data_url(IMG_WIDE), model=model)
    assert a.usage.prompt_tokens == text.usage.prompt_tokens + 2 + 16
    assert wide.usage.prompt_tokens == a.usage.prompt_tokens + 16
    # Log probabilities come with image requests too: the sampled token's is the top one.
    lp = oai.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": _data_url(IMG_A)}},
                    {"type": "text", "text": QUESTION},
                ],
            }
        ],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    entries = lp.choices[0].logprobs.content
    assert len(entries) == 3
    for e in entries:  # greedy: the sampled token is the most likely one
        assert (
            e.top_logprobs[0].token == e.token and abs(e.logprob - e.top_logprobs[0].logprob) < 1e-4
        )
        assert e.logprob <= 0 and e.top_logprobs[1].logprob <= e.logprob + 1e-4
    # A JPEG, a WebP and a GIF of the same picture decode too.
    for fmt, media in (("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("GIF", "image/gif")):
        r = _ask(oai, _data_url(_png(1, fmt=fmt), media), model=model)
        assert r.choices[0].message.content and r.usage.prompt_tokens == a.usage.prompt_tokens


def test_every_dialect(server, oai, image_host):
    expected = _ask(oai, _data_url(IMG_A)).choices[0].message.content
    assert _ask(oai, image_host + "/a.png").choices[0].message.content == expected

    v1 = httpx.post(
        server.url + "/api/v1/chat",
        json={
            "model": VL_KEY,
            "input": [
                {"type": "image", "data_url": _data_url(IMG_A)},
                {"type": "text", "content": QUESTION},
            ],
            "temperature": 0,
            "max_output_tokens": N,
        },
        timeout=60,
    )
    assert v1.status_code == 200, v1.text
    assert v1.json()["output"][-1]["content"] == expected

    r = oai.responses.create(
        model=VL_KEY,
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_image", "image_url": _data_url(IMG_A)},
                    {"type": "input_text", "text": QUESTION},
                ],
            }
        ],
        temperature=0,
        max_output_tokens=N,
    )
    assert r.output_text == expected

    claude = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    sources = [
        {"type": "base64", "media_type": "image/png", "data": base64.b64encode(IMG_A).decode()},
        {"type": "url", "url": image_host + "/a.png"},
    ]
    for source in sources:
        m = claude.messages.create(
            model=VL_KEY,
            max_tokens=N,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "source": source},
                        {"type": "text", "text": QUESTION},
                    ],
                }
            ],
            extra_body={"temperature": 0},
        )
        assert m.content[0].text == expected
    count = claude.messages.count_tokens(
        model=VL_KEY,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image", "source": sources[0]},
                    {"type": "text", "text": QUESTION},
                ],
            }
        ],
    )
    # input_tokens leaves out what the prompt cache served (Anthropic's cache reads) and what
    # it wrote for a later request (cache creation): the three add up to the prompt.
    u = m.usage
    cached = (u.cache_read_input_tokens or 0) + (u.cache_creation_input_tokens or 0)
    assert count.input_tokens == u.input_tokens + cached


def _batched_tokens(server, model: str) -> int:
    loaded = httpx.get(server.url + "/health", timeout=10).json()["loaded"]
    return next((m["batched_tokens"] for m in loaded if m["id"] == model), 0)


@pytest.mark.parametrize("model", VL_MODELS)
def test_concurrent_image_and_text_requests_equal_solo(server, oai, model):
    before = _batched_tokens(server, model)
    _together_equals_solo(oai, model)
    if model == VL_KEY:
        # Every token of the four run together and then one by one, images included, came
        # out of the batch's forward pass (image requests decoded beside it do not count).
        assert _batched_tokens(server, model) - before == 8 * N


def test_bad_images_are_clear_4xx(server, image_host):
    big = io.BytesIO()
    PIL.new("RGB", (10_000, 5_000)).save(big, "PNG")
    cases = [
        (_data_url(b"this is not an image"), 400, "not a PNG"),
        (_data_url(IMG_A[: len(IMG_A) // 2]), 400, "truncated"),
        (_data_url(big.getvalue()), 400, "megapixels"),
        (image_host + "/slow.png", 400, "timed out"),
        ("http://169.254.169.254/latest/meta-data", 403, "non-public"),
        ("http://127.0.0.1:9/x.png", 403, "non-public"),
        ("ftp://example.com/x.png", 400, "data:"),
    ]
    for url, status, words in cases:
        r = _status(server, _image_body(url))
        assert r.status_code == status, (url[:40], r.text)
        assert words in r.json()["error"]["message"], r.text
    for text_model in (MLX_KEY, GGUF_KEY):
        r = _status(server, _image_body(_data_url(IMG_A), model=text_model))
        assert r.status_code == 400
        assert r.json()["error"]["message"] == f"Model '{text_model}' does not support image input."
    r = _status(server, _image_body(_data_url(IMG_A), n=4))
    assert r.status_code == 400 and "at most 3" in r.json()["error"]["message"]
    claude = httpx.post(
        server.url + "/v1/messages",
        json={
            "model": MLX_KEY,
            "max_tokens": 2,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {
                                "type": "base64",
                                "media_type": "image/png",
                                "data": base64.b64encode(IMG_A).decode(),
                            },
                        }
                    ],
                }
            ],
        },
    )
    assert claude.status_code == 400 and claude.json()["type"] == "error"
    assert "does not support image input" in claude.json()["error"]["message"]
    # Still serving.
    assert _status(server, _image_body(_data_url(IMG_A))).status_code == 200


@pytest.mark.parametrize("model", VL_MODELS)
def test_image_tokens_count_against_the_context(server, model):
    parts = [
        {"type": "image_url", "image_url": {"url": _data_url(_png(s, (448, 448)))}}
        for s in (7, 8, 9)
    ]
    body = {
        "model": model,
        "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "hi"}]}],
        "max_tokens": 2,
    }
    r = _status(server, body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert "maximum context length is 512 tokens" in r.json()["error"]["message"]
    assert (
        _status(
            server,
            {
                **body,
                "messages": [
                    {"role": "user", "content": [parts[0], {"type": "text", "text": "hi"}]}
                ],
            },
        ).status_code
        == 200
    )


def test_sdk_prepare_image(server, oai):
    import lmstudio as lms

    with lms.Client(server.url.removeprefix("http://")) as client:
        handle = client.files.prepare_image(IMG_A, name="a.png")
        assert handle.file_type == "image" and handle.size_bytes == len(IMG_A)
        listed = {m.model_key: m.info.vision for m in client.llm.list_downloaded()}
        assert listed[VL_KEY] is True and listed[MLX_KEY] is False
        chat = lms.Chat()
        chat.add_user_message(QUESTION, images=[handle])
        result = client.llm.model(VL_KEY).respond(chat, config={"temperature": 0, "maxTokens": N})
    content = [
        {"type": "text", "text": QUESTION},
        {"type": "image_url", "image_url": {"url": _data_url(IMG_A)}},
    ]
    expected = oai.chat.completions.create(
        model=VL_KEY, messages=[{"role": "user", "content": content}], max_tokens=N, temperature=0
    )
    assert result.content == expected.choices[0].message.content
    assert result.stats.prompt_tokens_count == expected.usage.prompt_tokens


def test_js_sdk_prepare_image(server, oai, tmp_path):
    """The TypeScript SDK's client.files.prepareImage, sent in a chat to both vision models:
    the reply and prompt size equal the same request over HTTP."""
    from tests.test_sdk_js import REPO, run_checks

    picture = tmp_path / "b.png"
    picture.write_bytes(IMG_B)
    results = run_checks(
        server.port,
        REPO / "tests" / "sdk_js" / "sdk_image.cjs",
        llms=VL_MODELS,
        image=str(picture),
        question=QUESTION,
        maxTokens=N,
    )
    assert [r["model"] for r in results] == VL_MODELS
    for r in results:
        content = [
            {"type": "text", "text": QUESTION},
            {"type": "image_url", "image_url": {"url": _data_url(IMG_B)}},
        ]
        expected = oai.chat.completions.create(
            model=r["model"],
            messages=[{"role": "user", "content": content}],
            max_tokens=N,
            temperature=0,
        )
        assert r["vision"] is True
        assert r["content"] == expected.choices[0].message.content, r
        assert r["promptTokens"] == expected.usage.prompt_tokens, r


@pytest.mark.parametrize("model", VL_MODELS)
def test_second_turn_reuses_the_cached_image_prefix(oai, reference, gguf_reference, model):
    """The second turn of a chat about an image takes the first turn's KV from the prompt
    cache (keyed by the image's pixels) instead of encoding the image again."""
    question = "Describe it."
    image = {"type": "image_url", "image_url": {"url": _data_url(IMG_B)}}
    own = reference if model == VL_KEY else gguf_reference
    first = _ask(oai, _data_url(IMG_B), question, model=model)
    reply = first.choices[0].message.content
    later = (
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "And its colours?"},
    )
    second = oai.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": [image, {"type": "text", "text": question}]}, *later],
        max_tokens=N,
        temperature=0,
    )
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert second.choices[0].message.content == own(IMG_B, question, later)


def test_responses_previous_response_id_keeps_the_image(oai):
    first = oai.responses.create(
        model=VL_KEY,
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_image", "image_url": _data_url(IMG_WIDE)},
                    {"type": "input_text", "text": QUESTION},
                ],
            }
        ],
        temperature=0,
        max_output_tokens=4,
    )
    follow = oai.responses.create(
        model=VL_KEY,
        input="And its colours?",
        previous_response_id=first.id,
        temperature=0,
        max_output_tokens=4,
    )
    # The follow-up's prompt holds the first turn's 32 image tokens again.
    assert follow.usage.input_tokens > first.usage.input_tokens > 32


# Last: it stops the module's server.
def test_stateful_chat_keeps_its_image_across_a_restart(
    server, oai, reference, vision_models, home, image_host
):
    # The MLX prompt cache, keyed by the image, goes to disk at the restart (below).
    question = "Where was it taken?"
    first_turn = _ask(oai, _data_url(IMG_WIDE), question)
    first = httpx.post(
        server.url + "/api/v1/chat",
        json={
            "model": VL_KEY,
            "input": [
                {"type": "image", "data_url": _data_url(IMG_A)},
                {"type": "text", "content": QUESTION},
            ],
            "temperature": 0,
            "max_output_tokens": 4,
        },
        timeout=60,
    ).json()
    follow = {
        "model": VL_KEY,
        "input": "And its colours?",
        "previous_response_id": first["response_id"],
        "temperature": 0,
        "max_output_tokens": 4,
    }
    before = httpx.post(server.url + "/api/v1/chat", json=follow, timeout=60).json()
    # The stored chat shows its image by hash.
    chats = httpx.get(server.url + "/api/v1/chats").json()["data"]
    chat_id = next(c["id"] for c in chats if c["head_response_id"] == before["response_id"])
    detail = httpx.get(f"{server.url}/api/v1/chats/{chat_id}")
    assert detail.status_code == 200, detail.text
    (image,) = [
        p
        for t in detail.json()["responses"]
        for m in t["input"]
        if isinstance(m["content"], list)
        for p in m["content"]
        if p["type"] == "image"
    ]
    assert image["media_type"] == "image/png" and len(image["sha256"]) == 64
    server.stop()
    again = _serve(vision_models, home, image_host)
    later = (
        {"role": "assistant", "content": first_turn.choices[0].message.content},
        {"role": "user", "content": "And its colours?"},
    )
    image = {"type": "image_url", "image_url": {"url": _data_url(IMG_WIDE)}}
    try:
        after = httpx.post(again.url + "/api/v1/chat", json=follow, timeout=60).json()
        second_turn = openai.OpenAI(
            base_url=again.url + "/v1", api_key="unused", max_retries=0
        ).chat.completions.create(
            model=VL_KEY,
            messages=[
                {"role": "user", "content": [image, {"type": "text", "text": question}]},
                *later,
            ],
            max_tokens=N,
            temperature=0,
        )
    finally:
        again.stop()
    details = second_turn.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens >= first_turn.usage.prompt_tokens
    assert second_turn.choices[0].message.content == reference(IMG_WIDE, question, later)
    assert after["output"] == before["output"]
    assert after["stats"]["input_tokens"] == before["stats"]["input_tokens"]
    assert list((home / "images").iterdir())
