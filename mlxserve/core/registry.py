"""Model discovery: LM Studio's folder layout, metadata read from the files, never the weights."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from backends import mlx_vision_available
from mlxserve.core.families import detect_family
from mlxserve.core.sources import ExternalSource, hf_snapshot

log = logging.getLogger("mlxserve.registry")

# A model key is "publisher/model"; both parts are plain folder names.
_KEY_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SPLIT_GGUF = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
# A folder holding several GGUF quantizations lists each as "publisher/model@<QUANT>" too.
_QUANT_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_QUANT_IN_NAME = re.compile(
    r"(?:^|[-_.])((?:I?Q\d[A-Z0-9_]*?|BF16|F16|F32))(?=[-.])", re.IGNORECASE
)
# Written by our generator into demo models so that they are labelled everywhere.
DEMO_MARKER = "mlxserve-demo.json"
# Encoder families: their checkpoints make embeddings, never text.
_ENCODER_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "distilbert", "nomic_bert", "modernbert", "mpnet"}
)


@dataclass(frozen=True)
class ModelInfo:
    """A downloaded model, as read from its files."""

    key: str
    publisher: str
    name: str
    format: Literal["mlx", "gguf"]
    path: Path  # the model folder
    weights: Path  # the GGUF file, or the MLX folder
    architecture: str
    quantization: str
    bits_per_weight: float
    size_bytes: int
    params_string: str
    max_context_length: int
    trained_for_tool_use: bool
    type: Literal["llm", "embedding"] = "llm"
    description: str | None = None
    # LM Studio's reasoning settings the model's family and template allow: () none, ("on",)
    # it always thinks, ("off", "on") it has a switch, ("low", "medium", "high") levels.
    reasoning_options: tuple[str, ...] = ()
    reasoning_default: str = "on"
    # Where it lies: "models" (the models directory), "lmstudio" or "hf-cache" (read-only).
    source: str = "models"
    # Takes images: an MLX checkpoint with a vision tower (served through mlx-vlm), or a
    # GGUF with its projector (mmproj-*.gguf) in the folder (llama.cpp mtmd).
    vision: bool = False

    @property
    def display_name(self) -> str:
        return self.name


def valid_key_part(part: str) -> bool:
    return bool(_KEY_PART.fullmatch(part)) and ".." not in part


def valid_key(key: str) -> bool:
    """``publisher/model``, or ``publisher/model@QUANT`` for one GGUF quantization."""
    parts = key.split("/")
    if len(parts) != 2:
        return False
    name, at, quant = parts[1].partition("@")
    return (
        valid_key_part(parts[0])
        and valid_key_part(name)
        and (not at or bool(_QUANT_KEY.fullmatch(quant)))
    )


def params_string(n: int) -> str:
    """``494_032_768`` -> ``"494M"``; ``7_241_732_096`` -> ``"7.2B"``."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            value = n / scale
            text = f"{value:.1f}" if value < 10 else f"{value:.0f}"
            return text.removesuffix(".0") + unit
    return str(n)


class UnusableModel(Exception):
    """A folder that looks like a model but cannot be served; the message says why."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnusableModel(f"{path.name} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise UnusableModel(f"{path.name} is not a JSON object")
    return data


def _demo_description(folder: Path) -> str | None:
    marker = folder / DEMO_MARKER
    if not marker.is_file():
        return None
    try:
        return str(json.loads(marker.read_text()).get("description", "demo model"))
    except (OSError, json.JSONDecodeError):
        return "demo model"


def _family_facts(template: Any, architecture: str) -> dict[str, Any]:
    """The ModelInfo fields the model's family and template decide: tool training and the
    reasoning settings."""
    if not isinstance(template, str):
        return {"trained_for_tool_use": False}
    family = detect_family(template, {"architecture": architecture})
    facts: dict[str, Any] = {"trained_for_tool_use": family.trained_for_tools(template)}
    options = family.reasoning_options(template)
    if options is not None:
        facts |= {"reasoning_options": options.allowed, "reasoning_default": options.default}
    return facts


def _mlx_model_type(folder: Path, config: dict[str, Any]) -> Literal["llm", "embedding"]:
    """A sentence-transformers folder, or an encoder architecture, is an embedding model."""
    sentence_transformers = ("modules.json", "config_sentence_transformers.json")
    if any((folder / name).is_file() for name in sentence_transformers):
        return "embedding"
    return "embedding" if config.get("model_type") in _ENCODER_TYPES else "llm"


def _mlx_info(publisher: str, folder: Path) -> ModelInfo:
    from safetensors import safe_open

    config = _read_json(folder / "config.json")
    files = sorted(folder.glob("*.safetensors"))
    quant = config.get("quantization") or config.get("quantization_config") or {}
    bits = quant.get("bits") if isinstance(quant, dict) else None
    n_params = 0
    dtypes: set[str] = set()
    for file in files:
        try:
            with safe_open(str(file), framework="numpy") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    sl = f.get_slice(name)
                    dtype = str(sl.get_dtype())
                    numel = 1
                    for d in sl.get_shape():
                        numel *= int(d)
                    if bits and (name.endswith(".scales") or name.endswith(".biases")):
                        continue
                    if bits and dtype in ("U32", "uint32"):
                        numel = numel * 32 // int(bits)
                    else:
                        dtypes.add(dtype)
                    n_params += numel
        except Exception as exc:  # safetensors raises its own error types
            raise UnusableModel(f"{file.name} is not a readable safetensors file ({exc})") from exc
    architectures = config.get("architectures") or []
    architecture = str(config.get("model_type") or (architectures[0] if architectures else "?"))
    text_config = config.get("text_config")
    if not isinstance(text_config, dict):
        text_config = {}
    max_ctx = (
        config.get("max_position_embeddings")
        or text_config.get("max_position_embeddings")
        or config.get("n_positions")
        or 2048
    )
    if bits:
        quantization, bpw = f"{int(bits)}bit", float(bits)
    else:
        dtype = (sorted(dtypes) or [str(config.get("torch_dtype", "F16"))])[0].upper()
        dtype = {"FLOAT32": "F32", "FLOAT16": "F16", "BFLOAT16": "BF16"}.get(dtype, dtype)
        quantization = dtype
        bpw = float(re.sub(r"\D", "", dtype) or 16)
    tokenizer_config: dict[str, Any] = {}
    if (folder / "tokenizer_config.json").is_file():
        tokenizer_config = _read_json(folder / "tokenizer_config.json")
    template = tokenizer_config.get("chat_template")
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8", errors="replace")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = " ".join(str(t.get("template", "")) for t in template if isinstance(t, dict))
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return ModelInfo(
        key=f"{publisher}/{folder.name}",
        publisher=publisher,
        name=folder.name,
        format="mlx",
        path=folder,
        weights=folder,
        architecture=architecture,
        quantization=quantization,
        bits_per_weight=bpw,
        size_bytes=size,
        params_string=params_string(n_params),
        max_context_length=int(max_ctx),
        **_family_facts(template, architecture),
        type=_mlx_model_type(folder, config),
        description=_demo_description(folder),
        vision=isinstance(config.get("vision_config"), dict) and mlx_vision_available(),
    )


def _gguf_info(publisher: str, folder: Path, file: Path, shards: list[Path]) -> ModelInfo:
    from gguf import LlamaFileType

    from mlxserve.core.gguf_header import GGUFFormatError, read_header

    try:
        header = read_header(file)
    except (OSError, GGUFFormatError) as exc:
        raise UnusableModel(f"{file.name} is not a readable GGUF file ({exc})") from exc
    meta = header.metadata
    arch = str(meta.get("general.architecture") or "?")
    file_type = meta.get("general.file_type")
    n_params, n_bytes = header.n_params, header.n_bytes
    if file_type is not None:
        try:
            quantization = LlamaFileType(int(file_type)).name
            quantization = quantization.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            quantization = f"type-{file_type}"
    else:
        quantization = "?"
    split_count = meta.get("split.count")
    if split_count and int(split_count) > 1:
        # Only the first shard's tensors were counted; estimate from the total size.
        total = sum(p.stat().st_size for p in shards)
        n_params = int(n_params * total / max(file.stat().st_size, 1))
        n_bytes = int(n_bytes * total / max(file.stat().st_size, 1))
    bpw = round(n_bytes * 8 / n_params, 2) if n_params else 0.0
    max_ctx = meta.get(f"{arch}.context_length") or 2048
    template = meta.get("tokenizer.chat_template")
    model_type: Literal["llm", "embedding"] = (
        "embedding" if meta.get(f"{arch}.pooling_type") else "llm"
    )
    # The projector (loaded with the model) counts in its size, and so in the guardrail.
    projectors = sorted(p for p in folder.glob("mmproj*.gguf") if p.is_file())[:1]
    return ModelInfo(
        key=f"{publisher}/{folder.name}",
        publisher=publisher,
        name=folder.name,
        format="gguf",
        path=folder,
        weights=file,
        architecture=arch,
        quantization=quantization,
        bits_per_weight=bpw,
        size_bytes=sum(p.stat().st_size for p in [*shards, *projectors]),
        params_string=params_string(n_params),
        max_context_length=int(max_ctx),
        **_family_facts(template, arch),
        type=model_type,
        description=_demo_description(folder),
        # A GGUF folder is a vision model when its projector lies beside the weights.
        vision=bool(projectors),
    )


def _quant_label(file: Path, info: ModelInfo) -> str:
    """The quantization a GGUF file name says (``X-Q8_0.gguf``), else its header's."""
    name = _SPLIT_GGUF.sub(".gguf", file.name)
    match = _QUANT_IN_NAME.search(name)
    return match.group(1).upper() if match else info.quantization.upper()


def _inspect(publisher: str, folder: Path) -> list[ModelInfo]:
    ggufs = sorted(
        p for p in folder.glob("*.gguf") if p.is_file() and not p.name.startswith("mmproj")
    )
    if ggufs:
        # One model per single file or per split set (by its first shard, never the others).
        first_shards = [p for p in ggufs if not _SPLIT_GGUF.search(p.name)] + [
            p for p in ggufs if _SPLIT_GGUF.search(p.name) and "-00001-of-" in p.name
        ]
        if not first_shards:
            raise UnusableModel("split GGUF without its first shard")
        infos = []
        for file in first_shards:
            match = _SPLIT_GGUF.search(file.name)
            shards = [file]
            if match:
                stem = file.name[: match.start()]
                shards = sorted(folder.glob(f"{stem}-*-of-{match.group(2)}.gguf"))
            infos.append((file, _gguf_info(publisher, folder, file, shards)))
        if len(infos) == 1:
            return [infos[0][1]]
        # The folder's key stays the first file's; each quantization gets its own key too.
        out = [infos[0][1]]
        for file, info in infos:
            label = _quant_label(file, info)
            key = f"{info.key}@{label}"
            if not _QUANT_KEY.fullmatch(label) or any(o.key == key for o in out):
                log.info("%s: no key of its own for %s", info.key, file.name)
                continue
            out.append(replace(info, key=key, name=f"{info.name}@{label}"))
        return out
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            listed = set(weight_map.values()) if isinstance(weight_map, dict) else set()
            missing = sorted(str(n) for n in listed if not (folder / str(n)).is_file())
            if missing:
                raise UnusableModel(f"incomplete: {missing[0]} is missing")
        return [_mlx_info(publisher, folder)]
    raise UnusableModel("neither config.json with *.safetensors (MLX) nor a .gguf file (GGUF)")


class Registry:
    """The models under one root, then those of other tools' folders (``sources``, read-only),
    rescanned on demand; unchanged folders are not re-read. A key names one model: the first
    source that holds it wins (the root first), so keys stay the same across scans."""

    def __init__(self, root: Path, sources: list[ExternalSource] | None = None) -> None:
        self.root = root
        self.sources = sources or []
        self._cache: dict[Path, tuple[tuple[Any, ...], list[ModelInfo]]] = {}
        self._reported: dict[Path, str] = {}
        # The last scan's models and the folder times it saw: a listing with nothing changed
        # stats those folders and walks nothing. Scans run in threads (``models``, ``find``),
        # one at a time.
        self._lock = threading.Lock()
        self._models: list[ModelInfo] | None = None
        self._stamp: tuple[Any, ...] = ()
        self._watched: list[Path] = []

    def invalidate(self) -> None:
        """Rescan on the next listing: files changed inside a model folder (a download or a
        deletion finished), which the folder times watched do not always show."""
        with self._lock:
            self._models = None

    async def models(self) -> list[ModelInfo]:
        """:meth:`scan` off the event loop."""
        return await asyncio.to_thread(self.scan)

    async def find(self, key: str) -> ModelInfo | None:
        """:meth:`get` off the event loop."""
        return await asyncio.to_thread(self.get, key)

    @staticmethod
    def _times(paths: list[Path]) -> tuple[Any, ...]:
        out: list[Any] = []
        for path in paths:
            try:
                st = path.stat()
                out.append((st.st_mtime_ns, st.st_ino))
            except OSError:
                out.append(None)
        return tuple(out)

    def _fingerprint(self, folder: Path) -> tuple[Any, ...]:
        entries = []
        for p in sorted(folder.iterdir()):
            try:
                st = p.stat()
            except OSError:
                continue
            entries.append((p.name, st.st_size, st.st_mtime_ns))
        return tuple(entries)

    def scan(self) -> list[ModelInfo]:
        """Every usable model, sorted by key. Unusable folders are logged once, then skipped.
        Blocking (it reads the disk): the event loop calls :meth:`models` instead."""
        with self._lock:
            if self._models is not None and self._times(self._watched) == self._stamp:
                return self._models
            # The times are taken before the walk, so a change during it shows next time.
            watched = self._watch_list()
            stamp = self._times(watched)
            models = self._scan()
            self._models, self._stamp, self._watched = models, stamp, watched
            return models

    def _watch_list(self) -> list[Path]:
        """The folders whose times change when a model appears, goes or changes: each root,
        its publisher folders and model folders (a Hugging Face repository's ``refs`` and
        ``snapshots``)."""
        out: list[Path] = []
        roots = [(self.root, "models")] + [(s.root, s.name) for s in self.sources]
        for root, name in roots:
            out.append(root)
            try:
                if not root.is_dir():
                    continue
                if name == "hf-cache":
                    for repo in root.glob("models--*--*"):
                        out += [repo, repo / "refs", repo / "snapshots"]
                    continue
                for publisher in root.iterdir():
                    if publisher.is_dir() and not publisher.name.startswith("."):
                        out.append(publisher)
                        out += [f for f in publisher.iterdir() if f.is_dir()]
            except OSError:
                continue
        return out

    def _scan(self) -> list[ModelInfo]:
        seen: set[Path] = set()
        found: dict[str, ModelInfo] = {}
        candidates = self._layout(self.root, "models")
        for source in self.sources:
            if source.name == "hf-cache":
                candidates += self._hf_cache(source.root)
            else:
                candidates += self._layout(source.root, source.name)
        for publisher, name, folder, source_name in candidates:
            seen.add(folder)
            for info in self._inspect_cached(publisher, folder, name, source_name):
                first = found.get(info.key)
                if first is not None:
                    self._report(folder, f"{info.key} is served from {first.source} already")
                    continue
                found[info.key] = info
        for gone in set(self._cache) - seen:
            del self._cache[gone]
        return sorted(found.values(), key=lambda m: m.key)

    @staticmethod
    def _layout(root: Path, source: str) -> list[tuple[str, str, Path, str]]:
        """``<publisher>/<model>/`` folders (the models directory, LM Studio's)."""
        out: list[tuple[str, str, Path, str]] = []
        try:
            publishers = sorted(root.iterdir()) if root.is_dir() else []
            for publisher_dir in publishers:
                if not publisher_dir.is_dir() or publisher_dir.name.startswith("."):
                    continue
                for folder in sorted(publisher_dir.iterdir()):
                    if folder.is_dir() and not folder.name.startswith("."):
                        out.append((publisher_dir.name, folder.name, folder, source))
        except OSError as exc:
            log.warning("cannot read %s models at %s: %s", source, root, exc.strerror)
        return out

    @staticmethod
    def _hf_cache(root: Path) -> list[tuple[str, str, Path, str]]:
        """``models--<org>--<name>`` repositories of the Hugging Face cache, at their snapshot."""
        out: list[tuple[str, str, Path, str]] = []
        try:
            repos = sorted(root.glob("models--*--*")) if root.is_dir() else []
        except OSError:
            return out
        for repo_dir in repos:
            _, publisher, name = repo_dir.name.split("--", 2)
            snapshot = hf_snapshot(repo_dir)
            if snapshot is not None:
                out.append((publisher, name, snapshot, "hf-cache"))
        return out

    def _inspect_cached(
        self, publisher: str, folder: Path, name: str | None = None, source: str = "models"
    ) -> list[ModelInfo]:
        try:
            fingerprint = self._fingerprint(folder)
        except OSError as exc:
            self._report(folder, f"cannot be read ({exc.strerror})")
            return []
        cached = self._cache.get(folder)
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        infos: list[ModelInfo] = []
        name = name or folder.name
        if not (valid_key_part(publisher) and valid_key_part(name)):
            self._report(folder, "its name is not a valid model key part")
        else:
            try:
                infos = _inspect(publisher, folder)
                if name != folder.name or source != "models":
                    infos = [self._renamed(i, publisher, name, source) for i in infos]
                self._reported.pop(folder, None)
            except UnusableModel as exc:
                self._report(folder, str(exc))
            except Exception as exc:  # a scan never crashes on one bad folder
                self._report(folder, f"{type(exc).__name__}: {exc}")
        self._cache[folder] = (fingerprint, infos)
        return infos

    @staticmethod
    def _renamed(info: ModelInfo, publisher: str, name: str, source: str) -> ModelInfo:
        _, at, quant = info.key.partition("@")
        suffix = f"@{quant}" if at else ""
        return replace(info, key=f"{publisher}/{name}{suffix}", name=name + suffix, source=source)

    def _report(self, folder: Path, reason: str) -> None:
        if self._reported.get(folder) != reason:
            self._reported[folder] = reason
            rel = folder.relative_to(self.root) if folder.is_relative_to(self.root) else folder
            log.warning("skipping %s: %s", rel, reason)

    def get(self, key: str) -> ModelInfo | None:
        """The model with this key, or None. Never touches a path outside the root."""
        if not valid_key(key):
            return None
        models = self.scan()
        for info in models:
            if info.key == key:
                return info
        if "@" in key:  # quantization labels are case-insensitive, as in downloads
            for info in models:
                if "@" in info.key and info.key.lower() == key.lower():
                    return info
        return None
