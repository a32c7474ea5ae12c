"""Searching a Hugging Face hub for MLX and GGUF models, as ``lms get`` and LM Studio's model
search do: ``huggingface_hub``'s model search filtered by library and sorted by downloads,
then each result's files, for the quantizations it offers, their sizes, and whether each fits
this machine's memory."""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Literal

from mlxserve.core.downloads import DownloadManager, HubUnreachable
from mlxserve.core.hubfiles import DownloadError, DownloadSpec, RemoteFile, quant_label
from mlxserve.core.memory import GB
from mlxserve.errors import InvalidRequest, MlxServeError

Format = Literal["mlx", "gguf"]
FORMATS: tuple[Format, ...] = ("mlx", "gguf")
MAX_RESULTS = 50
# Repositories whose files are looked up at once.
_WORKERS = 8
# Share of the machine's memory a model may take: macOS lets the GPU wire about 75% of it,
# and the OS, the server and the KV cache need the rest.
FIT_SHARE = 0.75
# What loading needs beyond the weights (runtime buffers and a small KV cache).
FIT_OVERHEAD = 1.1
_MLX_QUANT = re.compile(r"(?:^|[-_])(\d+bit|mxfp4|nvfp4|bf16|fp16|f16|fp32|dwq)(?:$|[-_])", re.I)


@dataclass(frozen=True)
class Quantization:
    name: str  # "Q4_K_M", "4bit", or "" where the repository does not say
    size_bytes: int
    fits: bool | None  # None: the machine's memory is not known
    downloaded: bool = False


@dataclass(frozen=True)
class HubModel:
    id: str
    format: Format
    downloads: int
    likes: int
    last_modified: str | None
    quantizations: list[Quantization]

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "format": self.format,
            "downloads": self.downloads,
            "likes": self.likes,
            "last_modified": self.last_modified,
            "quantizations": [
                {
                    "name": q.name,
                    "size_bytes": q.size_bytes,
                    "fits": q.fits,
                    "downloaded": q.downloaded,
                }
                for q in self.quantizations
            ],
        }


def machine_memory() -> int | None:
    """This machine's physical memory in bytes, where the platform says."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def fits(size_bytes: int, memory: int | None, limit_gb: float | None = None) -> bool | None:
    budget = memory * FIT_SHARE if memory is not None else None
    if limit_gb is not None:
        budget = limit_gb * GB
    return None if budget is None else size_bytes * FIT_OVERHEAD <= budget


def quantizations(
    repo: str, files: list[RemoteFile], memory: int | None, limit_gb: float | None = None
) -> tuple[Format, list[Quantization]] | None:
    """What a repository offers, or None if it is neither MLX nor GGUF."""
    ggufs = [
        f
        for f in files
        if f.name.lower().endswith(".gguf") and not f.local_name.lower().startswith("mmproj")
    ]
    if ggufs:
        sizes: dict[str, int] = {}
        for f in ggufs:
            label = quant_label(f.name) or ""
            sizes[label] = sizes.get(label, 0) + f.size
        quants = [Quantization(q, n, fits(n, memory, limit_gb)) for q, n in sizes.items()]
        return "gguf", sorted(quants, key=lambda q: q.size_bytes)
    weights = [f for f in files if "/" not in f.name and f.name.endswith(".safetensors")]
    if not weights or not any(f.name == "config.json" for f in files):
        return None
    size = sum(f.size for f in weights)
    match = _MLX_QUANT.search(repo.rsplit("/", 1)[-1])
    name = match.group(1) if match else ""
    return "mlx", [Quantization(name, size, fits(size, memory, limit_gb))]


class HubSearch:
    """Model search against the hub the downloads use (``HF_ENDPOINT``)."""

    def __init__(self, downloads: DownloadManager, limit_gb: float | None = None) -> None:
        self.downloads = downloads
        self.limit_gb = limit_gb

    def search(
        self, query: str, formats: tuple[Format, ...] = FORMATS, limit: int = 20
    ) -> list[HubModel]:
        """The most downloaded MLX and GGUF repositories matching ``query``. Blocking."""
        if not query.strip() or len(query) > 200:
            raise InvalidRequest("The search needs 1-200 characters of text.", param="q")
        if not 1 <= limit <= MAX_RESULTS:
            raise InvalidRequest(f"limit must be 1-{MAX_RESULTS}.", param="limit")
        ranked: list[tuple[int, int, str, str | None]] = []
        for fmt in formats:
            for info in self._list(query.strip(), fmt, limit):
                modified = info.last_modified.isoformat() if info.last_modified else None
                ranked.append((info.downloads or 0, info.likes or 0, info.id, modified))
        seen: set[str] = set()
        unique = []
        for entry in sorted(ranked, key=lambda r: (-r[0], r[2])):
            if entry[2] not in seen:
                seen.add(entry[2])
                unique.append(entry)
        unique = unique[:limit]
        memory = machine_memory()
        with ThreadPoolExecutor(_WORKERS) as pool:
            described = list(pool.map(lambda e: self._describe(e, memory), unique))
        return [m for m in described if m is not None]

    def _list(self, query: str, fmt: Format, limit: int) -> list[Any]:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=self.downloads.endpoint)
        try:
            return list(
                api.list_models(
                    search=query,
                    filter=fmt,
                    sort="downloads",
                    limit=limit,
                    expand=["downloads", "likes", "lastModified", "library_name", "tags"],
                )
            )
        except MlxServeError:
            raise
        except Exception as exc:  # noqa: BLE001 - requests, httpx, OSError: hub clients differ
            raise HubUnreachable(f"Cannot search the model hub: {exc}") from None

    def _describe(
        self, entry: tuple[int, int, str, str | None], memory: int | None
    ) -> HubModel | None:
        downloads, likes, repo, modified = entry
        try:
            _, files = self.downloads.model_files(DownloadSpec(repo))
        except DownloadError:
            return None  # gone, gated, or unreadable since the listing: not offered
        offered = quantizations(repo, files, memory, self.limit_gb)
        if offered is None:
            return None
        fmt, quants = offered
        quants = [
            replace(q, downloaded=self.downloads.already_downloaded(
                DownloadSpec(repo, q.name if fmt == "gguf" and q.name else None)
            ))
            for q in quants
        ]  # fmt: skip
        return HubModel(
            id=repo,
            format=fmt,
            downloads=downloads,
            likes=likes,
            last_modified=modified,
            quantizations=quants,
        )
