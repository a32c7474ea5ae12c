"""The core image module: parsing, file:// roots, decoding limits, EXIF, scaling."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

import pytest

from backends.base import SamplingParams
from mlxserve.core import images
from mlxserve.core.types import CoreRequest
from mlxserve.errors import InvalidRequest

Image = pytest.importorskip("PIL.Image")


def _encode(img, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _request(*parts: images.ImagePart) -> CoreRequest:
    content = [images.part(p) for p in parts] + [{"type": "text", "text": "hi"}]
    return CoreRequest(
        model="m", sampling=SamplingParams(), messages=({"role": "user", "content": content},)
    )


def test_data_urls_and_refusals():
    png = _encode(Image.new("RGB", (4, 4)))
    part = images.from_url("data:image/png;base64," + base64.b64encode(png).decode(), "p")
    assert part.data == png and part.media_type == "image/png" and part.url is None
    assert images.from_url("https://example.com/a.png", "p").url == "https://example.com/a.png"
    for bad in ("data:,hello", "ftp://x/y.png", "javascript:alert(1)"):
        with pytest.raises(InvalidRequest):
            images.from_url(bad, "p")
    # Text-only parts stay a string; images keep the list.
    assert (
        images.message_content([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])
        == "ab"
    )
    assert images.message_content([images.part(part)])[0]["image"] is part


def test_file_urls_only_from_allowed_roots(tmp_path: Path):
    allowed, other = tmp_path / "allowed", tmp_path / "other"
    allowed.mkdir()
    other.mkdir()
    png = _encode(Image.new("RGB", (4, 4)))
    (allowed / "a.png").write_bytes(png)
    (other / "b.png").write_bytes(png)
    policy = images.ImagePolicy(file_roots=(allowed.resolve(),))
    ok = asyncio.run(
        images.fetch_all(_request(images.from_url(f"file://{allowed}/a.png", "p")), policy)
    )
    assert images.images_in(ok.messages or ())[0].data == png
    for url in (f"file://{other}/b.png", f"file://{allowed}/../other/b.png"):
        with pytest.raises(InvalidRequest, match="image-file-roots"):
            asyncio.run(images.fetch_all(_request(images.from_url(url, "p")), policy))
    with pytest.raises(InvalidRequest, match="at most 1"):
        asyncio.run(
            images.fetch_all(
                _request(images.ImagePart(png), images.ImagePart(png)),
                images.ImagePolicy(max_images=1),
            )
        )


def test_exif_orientation_and_scaling():
    img = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    part = images.ImagePart(_encode(img, "JPEG", exif=exif.tobytes()))
    assert images.decode(part, images.ImagePolicy(), None).size == (20, 40)
    # Scaled down to the model's largest resolution, aspect kept; JPEG decodes at a fraction.
    big = images.ImagePart(_encode(Image.new("RGB", (4000, 2000)), "JPEG"))
    out = images.decode(big, images.ImagePolicy(), 200_000)
    assert out.width * out.height <= 200_000 and abs(out.width / out.height - 2) < 0.05
    gif = images.ImagePart(_encode(Image.new("P", (8, 8)), "GIF"))
    assert images.decode(gif, images.ImagePolicy(), None).mode == "RGB"


def test_bombs_and_broken_files_are_400():
    policy = images.ImagePolicy(max_pixels=1_000_000)
    bomb = images.ImagePart(_encode(Image.new("1", (2000, 1000))))
    with pytest.raises(InvalidRequest, match="megapixels"):
        images.decode(bomb, policy, None)
    png = _encode(Image.new("RGB", (64, 64), "blue"))
    with pytest.raises(InvalidRequest, match="truncated|damaged"):
        images.decode(images.ImagePart(png[: len(png) // 2]), policy, None)
    with pytest.raises(InvalidRequest, match="not a PNG"):
        images.decode(images.ImagePart(b"%PDF-1.4 hello"), policy, None)
    with pytest.raises(InvalidRequest, match="empty"):
        images.decode(images.ImagePart(b""), policy, None)
