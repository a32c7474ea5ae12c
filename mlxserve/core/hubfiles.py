"""What a download takes from a Hugging Face hub: the requested repository (and quantization),
the repository's files, which of them make the model, and their verification against the hub's
checksums."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from mlxserve.core.registry import valid_key_part
from mlxserve.errors import InvalidRequest, MlxServeError

_QUANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
_QUANT_LABEL = re.compile(r"(?:^|[-_.])((?:I?Q\d[A-Z0-9_]*?|BF16|F16|F32))(?=[-.])", re.IGNORECASE)
# What an MLX model folder needs; remote code, PyTorch weights and the like are left out.
_MLX_SUFFIXES = (".json", ".safetensors", ".jinja", ".txt", ".model", ".tiktoken", ".md")
_HUB_HOSTS = frozenset({"huggingface.co", "www.huggingface.co", "hf.co"})
_CHUNK = 1 << 20


class DownloadError(MlxServeError):
    """A download that cannot start or did not finish; the message says why."""

    status = 400
    kind = "invalid_request_error"
    code = "download_failed"


@dataclass(frozen=True)
class DownloadSpec:
    """What to download: a hub repository and, for GGUF repositories, a quantization."""

    repo: str
    quantization: str | None = None

    @property
    def publisher(self) -> str:
        return self.repo.split("/")[0]

    @property
    def name(self) -> str:
        return self.repo.split("/")[1]


def parse_spec(
    model: str, quantization: str | None = None, hosts: frozenset[str] = _HUB_HOSTS
) -> DownloadSpec:
    """``publisher/model``, ``publisher/model@Q4_K_M`` or a hub URL of the repository."""
    text = model.strip()
    if text.startswith(("http://", "https://")):
        url = urlparse(text)
        if url.hostname not in hosts:
            raise InvalidRequest(
                "Only Hugging Face URLs (https://huggingface.co/<publisher>/<model>) can be "
                "downloaded.",
                param="model",
            )
        parts = [p for p in url.path.split("/") if p]
        text = "/".join(parts[:2])
    elif text.startswith(("hf.co/", "huggingface.co/")):
        text = "/".join(text.split("/")[1:3])
    repo, at, quant = text.partition("@")
    if at and not quant:
        raise InvalidRequest("Name a quantization after '@' (e.g. @Q4_K_M).", param="model")
    quant = quant or (quantization or "")
    parts = repo.split("/")
    if len(parts) != 2 or not all(valid_key_part(p) for p in parts):
        raise InvalidRequest(
            "'model' must be a Hugging Face repository as <publisher>/<model>, its URL, or "
            "<publisher>/<model>@<quantization>.",
            param="model",
        )
    if quant and not _QUANT.fullmatch(quant):
        raise InvalidRequest("'quantization' is not a valid quantization name.", param="model")
    return DownloadSpec(repo, quant or None)


@dataclass(frozen=True)
class RemoteFile:
    name: str  # path in the repository
    size: int
    sha256: str | None  # LFS files
    blob_id: str | None  # git blob sha1 of the other files

    @property
    def local_name(self) -> str:
        return self.name.rsplit("/", 1)[-1]


def _git_blob_id(path: Path) -> str:
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, remote: RemoteFile) -> str | None:
    """Why ``path`` is not the hub's file, or None when it is."""
    size = path.stat().st_size
    if size != remote.size:
        return f"{remote.name}: size {size} but the hub lists {remote.size}"
    if remote.sha256 is not None:
        got = _sha256(path)
        if got != remote.sha256.lower():
            return f"{remote.name}: sha256 {got} but the hub lists {remote.sha256}"
    elif remote.blob_id is not None and _git_blob_id(path) != remote.blob_id.lower():
        return f"{remote.name}: content differs from the hub's (git blob id)"
    return None


def quant_label(name: str) -> str | None:
    """The quantization a GGUF file name carries (``Q4_K_M``, ``BF16``), if any."""
    match = _QUANT_LABEL.search(name.rsplit("/", 1)[-1])
    return match.group(1).upper() if match else None


def _quant_labels(names: list[str]) -> list[str]:
    labels = {m.group(1).upper() for n in names for m in [_QUANT_LABEL.search(n)] if m}
    return sorted(labels)


def _matches_quant(name: str, quant: str) -> bool:
    pattern = rf"(?:^|[-_./]){re.escape(quant)}(?=[-_.])"
    return re.search(pattern, name, re.IGNORECASE) is not None


def _projector(files: list[RemoteFile]) -> list[RemoteFile]:
    """A vision GGUF repository's projector (``mmproj*.gguf``) to fetch beside the weights:
    F16 (what llama.cpp's converter writes by default), else BF16, F32, the first by name."""
    found = sorted(
        (
            f
            for f in files
            if f.local_name.lower().startswith("mmproj") and f.name.endswith(".gguf")
        ),
        key=lambda f: f.name,
    )
    for label in ("f16", "bf16", "f32"):
        for f in found:
            if _matches_quant(f.local_name, label):
                return [f]
    return found[:1]


def select_files(spec: DownloadSpec, files: list[RemoteFile]) -> tuple[list[RemoteFile], str]:
    """The files to fetch and the model's format: one quantization of a GGUF repository (its
    shards included, and its vision projector if it has one), or the MLX folder's files."""
    ggufs = [
        f
        for f in files
        if f.name.lower().endswith(".gguf") and not f.local_name.lower().startswith("mmproj")
    ]
    if ggufs:
        chosen = ggufs
        if spec.quantization:
            chosen = [f for f in ggufs if _matches_quant(f.name, spec.quantization)]
            if not chosen:
                raise DownloadError(
                    f"{spec.repo} has no {spec.quantization} file; it has: "
                    + ", ".join(_quant_labels([f.name for f in ggufs]) or ["?"])
                )
        groups: dict[str, list[RemoteFile]] = {}
        for f in chosen:
            match = _SPLIT.search(f.name)
            groups.setdefault(f.name[: match.start()] if match else f.name, []).append(f)
        if len(groups) > 1:
            preferred = [k for k in groups if _matches_quant(k, "Q4_K_M")]
            if spec.quantization or not preferred:
                raise DownloadError(
                    f"{spec.repo} holds several GGUF files; name one quantization as "
                    f"{spec.repo}@<quantization>, one of: "
                    + ", ".join(_quant_labels([f.name for f in chosen]) or sorted(groups))
                )
            groups = {preferred[0]: groups[preferred[0]]}
        return sorted(next(iter(groups.values())), key=lambda f: f.name) + _projector(files), "gguf"
    mlx = [f for f in files if "/" not in f.name and f.name.lower().endswith(_MLX_SUFFIXES)]
    if not any(f.name.endswith(".safetensors") for f in mlx) or not any(
        f.name == "config.json" for f in mlx
    ):
        raise DownloadError(
            f"{spec.repo} is neither an MLX model (config.json with *.safetensors) nor holds "
            "GGUF files."
        )
    return sorted(mlx, key=lambda f: f.name), "mlx"


def _safe_name(name: str) -> bool:
    parts = name.split("/")
    return all(p and p not in (".", "..") and "\\" not in p for p in parts) and not name.startswith(
        "/"
    )
