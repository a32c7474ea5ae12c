"""What the vision tests share: the tiny Qwen2-VL models' keys, generated images and a
loopback host that serves them, the vision server, and the requests several tests send."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import io
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionContentPartParam

from tests.conftest import MODELS_CACHE, PUBLISHER, Server

PIL = pytest.importorskip("PIL.Image")

VL_KEY = f"{PUBLISHER}/tiny-qwen2-vl-mlx"
VL_GGUF_KEY = f"{PUBLISHER}/tiny-qwen2-vl-gguf"
VL_MODELS = [VL_KEY, VL_GGUF_KEY]
VISION_ROOT = MODELS_CACHE.parent / "vision-models"
QUESTION = "What is in this picture?"
N = 10


def _png(seed: int, size: tuple[int, int] = (112, 112), fmt: str = "PNG") -> bytes:
    import numpy as np

    rng = np.random.default_rng(seed)
    pixels = (rng.random((size[1], size[0], 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    PIL.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def _data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


# Sizes both engines resize alike (multiples of 28 pixels, at least 8 image tokens):
# llama.cpp pads what mlx-vlm stretches.
IMG_A, IMG_B = _png(1), _png(2)
IMG_WIDE = _png(3, (224, 112))


class _Images(http.server.ThreadingHTTPServer):
    """A loopback image host: /a.png, /slow.png (answers after 3 s)."""

    daemon_threads = True


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/slow.png":
            time.sleep(3)
        body = IMG_A
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _serve(vision_models: Path, home: Path, image_host: str) -> Server:
    import os

    os.environ["MLXSERVE_IMAGE_ALLOWED_HOSTS"] = image_host.removeprefix("http://")
    os.environ["MLXSERVE_IMAGE_FETCH_TIMEOUT"] = "1"
    os.environ["MLXSERVE_MAX_IMAGES_PER_REQUEST"] = "3"
    try:
        # A 512-token window: three 448x448 images (256 tokens each) do not fit.
        return Server(vision_models, home, "--no-auto-evict", "--context-length", "512")
    finally:
        for name in ("ALLOWED_HOSTS", "FETCH_TIMEOUT"):
            os.environ.pop(f"MLXSERVE_IMAGE_{name}", None)
        os.environ.pop("MLXSERVE_MAX_IMAGES_PER_REQUEST", None)


def _ask(oai, image_url: str | None, question: str = QUESTION, model: str = VL_KEY):
    content: list[dict] = []
    if image_url is not None:
        content.append({"type": "image_url", "image_url": {"url": image_url}})
    content.append({"type": "text", "text": question})
    return oai.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        max_tokens=N,
        temperature=0,
    )


def _together_equals_solo(oai, model: str) -> None:
    """Two image and two text requests at once each equal their own solo output."""

    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=str(oai.base_url), api_key="unused", max_retries=0)
        jobs = [
            (_data_url(IMG_A), QUESTION),
            (None, "Tell me a story"),
            (_data_url(IMG_B), QUESTION),
            (None, "Hello there"),
        ]

        async def one(url: str | None, question: str) -> str:
            content: list[ChatCompletionContentPartParam] = [{"type": "text", "text": question}]
            if url:
                content.insert(0, {"type": "image_url", "image_url": {"url": url}})
            r = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": content}],
                max_tokens=N,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            return r.choices[0].message.content or ""

        together = await asyncio.gather(*(one(*j) for j in jobs))
        solo = [await one(*j) for j in jobs]
        await client.close()
        assert together == solo
        return together

    assert len(set(asyncio.run(main()))) == 4


def _status(server, body: dict, path: str = "/v1/chat/completions") -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=30)


def _image_body(url: str, model: str = VL_KEY, n: int = 1) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}}] * n
    return {
        "model": model,
        "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "hi"}]}],
        "max_tokens": 2,
    }
