"""The SDKs' ``files`` namespace: images uploaded for predictions
(``client.files.prepareImage`` / ``prepare_image``), kept under ``MLXSERVE_HOME/files`` by
the SHA-256 of their bytes, which is the handle's identifier."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import os
import re
from pathlib import Path
from typing import Any

from mlxserve.core import images
from mlxserve.sdk.transport import Context, SdkError

_IDENTIFIER = re.compile(r"^[0-9a-f]{64}$")
_UNKNOWN = "Unknown file identifier; upload the image with prepareImage first."
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a")


def files_dir(home: Path) -> Path:
    return home / "files"


def _file_type(data: bytes) -> str:
    if data.startswith(_IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return "image"
    return "unknown"


def _store(folder: Path, digest: str, data: bytes) -> None:
    target = folder / digest
    if target.is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / f".{digest}.{os.getpid()}"
    part.write_bytes(data)
    os.replace(part, target)


async def upload_base64(ctx: Context, parameter: Any) -> dict[str, Any]:
    """``uploadFileBase64`` ``{name, contentBase64}`` -> ``{identifier, fileType, sizeBytes}``."""
    content = parameter.get("contentBase64") if isinstance(parameter, dict) else None
    if not isinstance(content, str):
        raise SdkError("uploadFileBase64 needs contentBase64.")
    limit = ctx.state.settings.max_image_bytes
    if len(content) > limit * 4 // 3 + 4:
        raise SdkError(f"The file is larger than {limit} bytes (--max-image-bytes).")
    try:
        data = base64.b64decode(content)
    except (binascii.Error, ValueError):
        raise SdkError("contentBase64 is not valid base64.") from None
    digest = hashlib.sha256(data).hexdigest()
    await asyncio.to_thread(_store, files_dir(ctx.state.settings.home), digest, data)
    return {"identifier": digest, "fileType": _file_type(data), "sizeBytes": len(data)}


def image_part(home: Path, part: dict[str, Any]) -> dict[str, Any]:
    """A history ``file`` part (an uploaded image's handle) as a core image part."""
    identifier = part.get("identifier")
    if part.get("fileType") != "image" or not isinstance(identifier, str):
        raise SdkError("Only image files (client.files.prepareImage) can be sent to a model.")
    if not _IDENTIFIER.match(identifier):
        raise SdkError("Unknown file identifier; upload the image with prepareImage first.")
    try:
        data = (files_dir(home) / identifier).read_bytes()
    except OSError:
        raise SdkError(
            "Unknown file identifier; upload the image with prepareImage first."
        ) from None
    return images.part(images.ImagePart(data, "", param="history"))
