"""Images in requests: the one content part every dialect's image becomes, and the one place
that fetches, checks and decodes them.

A message holding an image has a list ``content`` of ``{"type": "text", "text": ...}`` and
``{"type": "image", "image": ImagePart}`` parts; messages without images keep string content.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from mlxserve.errors import InvalidRequest, McpConnectionError

if TYPE_CHECKING:
    from PIL.Image import Image

    from mlxserve.core.types import CoreRequest
    from mlxserve.settings import Settings

MEDIA_TYPES = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "WEBP": "image/webp",
    "GIF": "image/gif",
}
_DATA_URL = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?);base64,", re.I)


@dataclass(frozen=True)
class ImagePart:
    """An image as the client sent it: encoded bytes and their media type, or (until
    :func:`fetch_all` reads it) the http(s) or file URL to read them from."""

    data: bytes = b""
    media_type: str = ""
    url: str | None = None
    param: str | None = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def part(image: ImagePart) -> dict[str, Any]:
    return {"type": "image", "image": image}


def from_base64(data: str, media_type: str | None, param: str) -> ImagePart:
    try:
        raw = base64.b64decode(data.strip(), validate=False)
    except (binascii.Error, ValueError):
        raise InvalidRequest("The image is not valid base64.", param=param) from None
    if not raw:
        raise InvalidRequest("The image is empty.", param=param)
    return ImagePart(raw, (media_type or "").lower(), param=param)


def from_url(url: str, param: str) -> ImagePart:
    """A ``data:`` URL (decoded now), or an http(s) / file URL (read by :func:`fetch_all`)."""
    url = url.strip()
    match = _DATA_URL.match(url)
    if match:
        return from_base64(url[match.end() :], match.group("type"), param)
    if url.lower().startswith("data:"):
        raise InvalidRequest(
            "Only base64 data URLs are accepted for images (data:image/png;base64,...).",
            param=param,
        )
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https", "file"):
        raise InvalidRequest(
            "An image URL must be a data:, http(s):// or file:// URL.", param=param
        )
    return ImagePart(url=url, param=param)


def content_parts(content: Any) -> list[dict[str, Any]]:
    """A message's content as parts (a string is one text part)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return list(content or [])


def message_content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Text parts alone join into a string (what every chat template handles)."""
    if any(p.get("type") == "image" for p in parts):
        return parts
    return "".join(str(p.get("text", "")) for p in parts)


def images_in(messages: Iterable[dict[str, Any]]) -> list[ImagePart]:
    out: list[ImagePart] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            out += [p["image"] for p in content if isinstance(p, dict) and p.get("type") == "image"]
    return out


def text_only(messages: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with image parts dropped (for what cannot show images, e.g. logs)."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            kept = [p for p in content if not (isinstance(p, dict) and p.get("type") == "image")]
            message = {**message, "content": message_content(kept)}
        out.append(message)
    return out


def with_markers(messages: Iterable[dict[str, Any]], marker: str) -> list[dict[str, Any]]:
    """The messages with each image part replaced by a text part holding ``marker`` (for
    engines that find images by a marker in the rendered prompt)."""
    return _each_image(messages, lambda part: {"type": "text", "text": marker})


def described(messages: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as JSON can carry them: each image part as its hash and media type."""
    return _each_image(
        messages,
        lambda part: {
            "type": "image",
            "sha256": part["image"].sha256,
            "media_type": part["image"].media_type,
        },
    )


def _each_image(
    messages: Iterable[dict[str, Any]], replace_part: Callable[[dict[str, Any]], dict[str, Any]]
) -> list[dict[str, Any]]:
    """The messages with each image part replaced by ``replace_part(it)``."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = [
                replace_part(p) if isinstance(p, dict) and p.get("type") == "image" else p
                for p in content
            ]
            message = {**message, "content": content}
        out.append(message)
    return out


@dataclass(frozen=True)
class ImagePolicy:
    """What the server may read and decode (from the settings)."""

    allowed_hosts: tuple[str, ...] = ()
    file_roots: tuple[Path, ...] = ()
    max_bytes: int = 20 * 1024 * 1024
    timeout: float = 10.0
    max_pixels: int = 40_000_000
    max_images: int = 8

    @classmethod
    def from_settings(cls, settings: Settings) -> ImagePolicy:
        return cls(
            allowed_hosts=tuple(
                h.strip() for h in settings.image_allowed_hosts.split(",") if h.strip()
            ),
            file_roots=tuple(
                Path(p.strip()).expanduser().resolve()
                for p in settings.image_file_roots.split(",")
                if p.strip()
            ),
            max_bytes=settings.max_image_bytes,
            timeout=settings.image_fetch_timeout,
            max_pixels=settings.max_image_pixels,
            max_images=settings.max_images_per_request,
        )


async def fetch_all(request: CoreRequest, policy: ImagePolicy) -> CoreRequest:
    """``request`` with every image URL read (http(s) with the policy's limits, file:// from
    the allowed folders), refusing too many images."""
    if not request.messages:
        return request
    images = images_in(request.messages)
    if not images:
        return request
    if len(images) > policy.max_images:
        raise InvalidRequest(
            f"This request has {len(images)} images; at most {policy.max_images} are accepted "
            "per request (--max-images-per-request).",
            param=images[policy.max_images].param,
        )
    if all(i.url is None for i in images):
        return request
    messages = []
    for message in request.messages:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for p in content:
                if isinstance(p, dict) and p.get("type") == "image" and p["image"].url:
                    p = part(await _read(p["image"], policy))
                parts.append(p)
            message = {**message, "content": parts}
        messages.append(message)
    return replace(request, messages=tuple(messages))


async def _read(image: ImagePart, policy: ImagePolicy) -> ImagePart:
    assert image.url is not None
    if urlsplit(image.url).scheme.lower() == "file":
        data = await asyncio.to_thread(_read_file, image, policy)
        return ImagePart(data, "", param=image.param)
    return await _fetch(image, policy)


def _read_file(image: ImagePart, policy: ImagePolicy) -> bytes:
    assert image.url is not None
    parts = urlsplit(image.url)
    if parts.netloc not in ("", "localhost"):
        raise InvalidRequest("A file:// image URL must name a local file.", param=image.param)
    path = Path(unquote(parts.path)).resolve()
    if not any(path.is_relative_to(root) for root in policy.file_roots):
        raise InvalidRequest(
            "file:// image URLs are accepted only from the folders the server allows "
            "(--image-file-roots); this one is not in them.",
            param=image.param,
        )
    try:
        size = path.stat().st_size
        if size > policy.max_bytes:
            raise _too_large(image, policy)
        return path.read_bytes()
    except OSError:
        raise InvalidRequest("The image file cannot be read.", param=image.param) from None


def _too_large(image: ImagePart, policy: ImagePolicy) -> InvalidRequest:
    return InvalidRequest(
        f"The image is larger than {policy.max_bytes} bytes (--max-image-bytes).",
        param=image.param,
    )


async def _fetch(image: ImagePart, policy: ImagePolicy) -> ImagePart:
    import httpx2

    from mlxserve.core.mcp import check_url
    from mlxserve.core.pinning import PinnedTransport

    assert image.url is not None
    try:
        pinned = await asyncio.to_thread(
            check_url,
            image.url,
            list(policy.allowed_hosts),
            param=image.param or "image_url",
            allow_flag="--image-allowed-hosts (MLXSERVE_IMAGE_ALLOWED_HOSTS)",
        )
    except McpConnectionError as exc:
        raise InvalidRequest(f"The image URL cannot be fetched: {exc}", param=image.param) from None
    chunks: list[bytes] = []
    total = 0
    try:
        async with asyncio.timeout(policy.timeout):
            # Redirects are not followed: each hop would need the address check again. The
            # connection goes to the address check_url checked, never to a second lookup
            # (DNS rebinding); an allow-listed host (pinned is None) resolves as usual.
            transport = PinnedTransport(pinned, _transport()) if pinned is not None else None
            async with (
                httpx2.AsyncClient(
                    timeout=policy.timeout, follow_redirects=False, transport=transport
                ) as client,
                client.stream("GET", image.url, headers={"Accept": "image/*"}) as response,
            ):
                if response.status_code != 200:
                    raise InvalidRequest(
                        f"Fetching the image URL gave HTTP {response.status_code}.",
                        param=image.param,
                    )
                media_type = response.headers.get("content-type", "").split(";")[0].strip()
                async for chunk in response.aiter_bytes():
                    total += len(chunk)
                    if total > policy.max_bytes:
                        raise _too_large(image, policy)
                    chunks.append(chunk)
    except TimeoutError:
        raise InvalidRequest(
            f"Fetching the image URL timed out after {policy.timeout:g} s.", param=image.param
        ) from None
    except httpx2.HTTPError as exc:
        raise InvalidRequest(
            f"The image URL cannot be fetched ({type(exc).__name__}).", param=image.param
        ) from None
    return ImagePart(b"".join(chunks), media_type.lower(), param=image.param)


def _transport() -> Any:
    """The transport under the pinning one (a seam: tests replace it to see the request)."""
    import httpx2

    return httpx2.AsyncHTTPTransport()


def decode(image: ImagePart, policy: ImagePolicy, max_model_pixels: int | None) -> Image:
    """The image as RGB pixels, EXIF orientation applied, scaled down (aspect kept) to at
    most ``max_model_pixels`` before it is fully decoded where the format allows. Refuses
    what is not a png/jpeg/webp/gif image, truncated files and decompression bombs (400)."""
    import warnings

    from PIL import Image as PILImage
    from PIL import ImageOps, UnidentifiedImageError

    param = image.param
    if not image.data:
        raise InvalidRequest("The image is empty (or no longer stored).", param=param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            img: Image = PILImage.open(io.BytesIO(image.data), formats=list(MEDIA_TYPES))
    except (
        UnidentifiedImageError,
        PILImage.DecompressionBombWarning,
        PILImage.DecompressionBombError,
    ):
        raise InvalidRequest(
            "The image cannot be read: it is not a PNG, JPEG, WebP or GIF image.", param=param
        ) from None
    except (OSError, ValueError, SyntaxError):
        raise InvalidRequest(
            "The image cannot be read: the file is damaged.", param=param
        ) from None
    width, height = img.size
    if width * height > policy.max_pixels:
        raise InvalidRequest(
            f"The image is {width}x{height} pixels ({width * height / 1e6:.1f} megapixels); at "
            f"most {policy.max_pixels / 1e6:g} megapixels are accepted (--max-image-pixels).",
            param=param,
        )
    try:
        if max_model_pixels and width * height > max_model_pixels:
            scale = (max_model_pixels / (width * height)) ** 0.5
            # JPEG decodes at 1/2, 1/4 or 1/8 size directly: the full image is never in memory.
            img.draft("RGB", (max(1, int(width * scale)), max(1, int(height * scale))))
        img.load()
        img = ImageOps.exif_transpose(img) or img
        img = img.convert("RGB")
    except (OSError, ValueError, SyntaxError):
        raise InvalidRequest(
            "The image cannot be read: the file is truncated or damaged.", param=param
        ) from None
    if max_model_pixels and img.width * img.height > max_model_pixels:
        scale = (max_model_pixels / (img.width * img.height)) ** 0.5
        size = (max(1, int(img.width * scale)), max(1, int(img.height * scale)))
        img = img.resize(size, PILImage.Resampling.BICUBIC)
    return img
