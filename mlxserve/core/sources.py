"""Models people already have, served read-only where they lie: LM Studio's models folder and
the Hugging Face cache. Each is switched by a setting; the defaults follow the tools' own
rules for where they keep models."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mlxserve.settings import Settings

log = logging.getLogger("mlxserve.registry")

Layout = Literal["lmstudio", "hf-cache"]


@dataclass(frozen=True)
class ExternalSource:
    """A folder of models another tool keeps. ``lmstudio``: ``<publisher>/<model>/``;
    ``hf-cache``: ``models--<org>--<name>/snapshots/<revision>/``."""

    name: Layout
    root: Path


def lmstudio_models_dir(home: Path) -> Path:
    """LM Studio's models folder: the ``downloadsFolder`` its settings name, else
    ``~/.lmstudio/models``."""
    settings = home / ".lmstudio" / "settings.json"
    try:
        data = json.loads(settings.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    folder = data.get("downloadsFolder") if isinstance(data, dict) else None
    if isinstance(folder, str) and folder.strip():
        return Path(folder).expanduser()
    return home / ".lmstudio" / "models"


def hf_cache_dir(home: Path) -> Path:
    """The Hugging Face hub cache, as ``huggingface_hub`` finds it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else None
    return (cache or home / ".cache") / "huggingface" / "hub"


def external_sources(settings: Settings) -> list[ExternalSource]:
    """The sources switched on, in the order they yield a key both hold (after the models
    directory, which always comes first)."""
    home = Path.home()
    sources: list[ExternalSource] = []
    if settings.lmstudio_models:
        sources.append(
            ExternalSource(
                "lmstudio",
                (settings.lmstudio_models_dir or lmstudio_models_dir(home)).expanduser(),
            )
        )
    if settings.hf_cache_models:
        root = (settings.hf_cache_dir or hf_cache_dir(home)).expanduser()
        sources.append(ExternalSource("hf-cache", root))
    own = settings.models_root.resolve()
    return [s for s in sources if s.root.resolve() != own]


def hf_snapshot(repo_dir: Path) -> Path | None:
    """The snapshot ``refs/main`` names in one cached repository, else its newest one."""
    snapshots = repo_dir / "snapshots"
    try:
        ref = (repo_dir / "refs" / "main").read_text(encoding="utf-8").strip()
    except OSError:
        ref = ""
    if ref and "/" not in ref and ref not in (".", "..") and (snapshots / ref).is_dir():
        return snapshots / ref
    try:
        candidates = [p for p in snapshots.iterdir() if p.is_dir()]
    except OSError:
        return None
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)
