"""Deleting a downloaded model from the models directory (never from the folders of other
tools, which mlxserve only reads)."""

from __future__ import annotations

import asyncio
import re
import shutil

from mlxserve.core.manager import ModelManager
from mlxserve.core.registry import ModelInfo
from mlxserve.errors import InvalidRequest

_SPLIT = re.compile(r"-\d{5}-of-(\d{5})\.gguf$")


async def delete_model(manager: ModelManager, model: str) -> ModelInfo:
    """Delete ``model`` (a key) from disk; refused while any of its files is loaded."""
    info = await manager.find_model(model)
    if info.source != "models":
        raise InvalidRequest(
            f"{info.key} lies in the {info.source} folder, which mlxserve only reads; delete it "
            "with the tool that downloaded it.",
            param="model",
        )
    # One quantization's files may be loaded under the folder's key, and the reverse.
    folder_key = info.key.partition("@")[0]
    loaded = [i.info.key for i in manager.loaded()]
    loaded += [e.info.key for e in manager.loaded_embedders()]
    if any(key.partition("@")[0] == folder_key for key in loaded):
        raise InvalidRequest(f"{info.key} is loaded; unload it first.", param="model")
    try:
        await asyncio.to_thread(remove_files, info)
    finally:
        manager.registry.invalidate()
    return info


def remove_files(info: ModelInfo) -> None:
    """Remove ``info``'s files from disk, unchecked (the REST delete and `mlxserve rm`)."""
    if "@" in info.key:
        # One quantization of several: its file (or its split set), never the folder.
        split = _SPLIT.search(info.weights.name)
        if split:
            stem = info.weights.name[: split.start()]
            for shard in info.path.glob(f"{stem}-*-of-{split.group(1)}.gguf"):
                shard.unlink()
        else:
            info.weights.unlink()
    else:
        shutil.rmtree(info.path)
    publisher = info.path.parent
    if publisher.is_dir() and not any(publisher.iterdir()):
        publisher.rmdir()
