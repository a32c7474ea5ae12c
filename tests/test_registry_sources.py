"""Models people already have: LM Studio's models folder and the Hugging Face cache, read
where they lie (``mlxserve.core.sources``, ``Registry(root, sources)``)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import httpx

from mlxserve.core.registry import Registry
from mlxserve.core.sources import (
    ExternalSource,
    external_sources,
    hf_cache_dir,
    lmstudio_models_dir,
)
from mlxserve.settings import Settings
from tests.conftest import GGUF_KEY, MLX_KEY, Server


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.link(src, dst)


def _hf_repo(cache: Path, repo: str, folder: Path, drop: str | None = None) -> Path:
    """``folder`` as the Hugging Face cache holds it: blobs, a snapshot of symlinks, refs."""
    org, name = repo.split("/")
    repo_dir = cache / f"models--{org}--{name}"
    revision = hashlib.sha1(repo.encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        if f.name.startswith(".") or f.name == drop:
            continue
        blob = repo_dir / "blobs" / hashlib.sha256(f.name.encode()).hexdigest()
        _link(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    return repo_dir


def _tree(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.lstat().st_mtime_ns) for p in root.rglob("*"))


def _external(tmp_path: Path, models_root: Path) -> tuple[Path, Path, Path]:
    own = tmp_path / "own"
    _link(models_root / GGUF_KEY / "tiny-qwen2-f32.gguf", own / GGUF_KEY / "tiny-qwen2-f32.gguf")
    lms = tmp_path / "lmstudio-models"
    gguf = models_root / GGUF_KEY / "tiny-qwen2-f32.gguf"
    _link(gguf, lms / "lmstudio-community" / "tiny-GGUF" / "tiny-Q8_0.gguf")
    # The same key as a model of the models directory: the models directory wins.
    _link(gguf, lms / GGUF_KEY / "other.gguf")
    hf = tmp_path / "hf" / "hub"
    _hf_repo(hf, "mlx-community/tiny-mlx", models_root / MLX_KEY)
    # An interrupted download: the index names a shard the snapshot lacks.
    broken = models_root / MLX_KEY
    repo_dir = _hf_repo(hf, "mlx-community/broken-mlx", broken)
    snapshot = next((repo_dir / "snapshots").iterdir())
    (snapshot / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}})
    )
    return own, lms, hf


def test_sources_are_listed_with_stable_unambiguous_keys(models_root, tmp_path):
    own, lms, hf = _external(tmp_path, models_root)
    sources = [ExternalSource("lmstudio", lms), ExternalSource("hf-cache", hf)]
    registry = Registry(own, sources)
    models = {m.key: m for m in registry.scan()}
    assert sorted(models) == [
        "lmstudio-community/tiny-GGUF",
        "mlx-community/tiny-mlx",
        GGUF_KEY,
    ]
    assert models[GGUF_KEY].source == "models" and models[GGUF_KEY].path == own / GGUF_KEY
    assert models["lmstudio-community/tiny-GGUF"].source == "lmstudio"
    hf_model = models["mlx-community/tiny-mlx"]
    assert hf_model.source == "hf-cache" and hf_model.format == "mlx"
    assert hf_model.name == "tiny-mlx" and hf_model.size_bytes > 1_000_000
    assert registry.get("mlx-community/tiny-mlx") == hf_model
    assert [m.key for m in registry.scan()] == sorted(models)


def test_default_locations(tmp_path, monkeypatch):
    home = tmp_path / "home"
    assert lmstudio_models_dir(home) == home / ".lmstudio" / "models"
    (home / ".lmstudio").mkdir(parents=True)
    (home / ".lmstudio" / "settings.json").write_text(json.dumps({"downloadsFolder": "/m/x"}))
    assert lmstudio_models_dir(home) == Path("/m/x")
    for name in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    assert hf_cache_dir(home) == home / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    assert hf_cache_dir(home) == tmp_path / "hfhome" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hc"))
    assert hf_cache_dir(home) == tmp_path / "hc"


def test_sources_switch_by_setting(tmp_path):
    on = Settings(
        home=tmp_path,
        lmstudio_models=True,
        lmstudio_models_dir=tmp_path / "l",
        hf_cache_models=True,
        hf_cache_dir=tmp_path / "h",
    )
    assert [(s.name, s.root) for s in external_sources(on)] == [
        ("lmstudio", tmp_path / "l"),
        ("hf-cache", tmp_path / "h"),
    ]
    off = Settings(home=tmp_path, lmstudio_models=False, hf_cache_models=False)
    assert external_sources(off) == []
    # The models directory is never a second source of itself.
    same = Settings(
        home=tmp_path,
        lmstudio_models=True,
        lmstudio_models_dir=tmp_path / "models",
        hf_cache_models=False,
    )
    assert external_sources(same) == []


def test_server_serves_them_read_only(models_root, tmp_path, monkeypatch):
    own, lms, hf = _external(tmp_path, models_root)
    monkeypatch.setenv("MLXSERVE_LMSTUDIO_MODELS", "true")
    monkeypatch.setenv("MLXSERVE_LMSTUDIO_MODELS_DIR", str(lms))
    monkeypatch.setenv("MLXSERVE_HF_CACHE_MODELS", "true")
    monkeypatch.setenv("MLXSERVE_HF_CACHE_DIR", str(hf))
    before = (_tree(lms), _tree(hf))
    home = tmp_path / "home"
    home.mkdir()
    srv = Server(own, home)
    try:
        keys = [m["key"] for m in httpx.get(f"{srv.url}/api/v1/models").json()["models"]]
        assert "mlx-community/tiny-mlx" in keys and "lmstudio-community/tiny-GGUF" in keys
        for model in ("mlx-community/tiny-mlx", "lmstudio-community/tiny-GGUF"):
            r = httpx.post(
                f"{srv.url}/v1/chat/completions",
                json={
                    "model": model,
                    "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 3,
                },
                timeout=120,
            )
            assert r.status_code == 200, r.text
    finally:
        srv.stop()
    assert (_tree(lms), _tree(hf)) == before


def test_source_folders_expand_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = Settings(
        home=tmp_path / "state",
        lmstudio_models=True,
        lmstudio_models_dir=Path("~/lm"),
        hf_cache_models=True,
        hf_cache_dir=Path("~/hf"),
    )
    assert settings.lmstudio_models_dir == tmp_path / "lm"
    assert settings.hf_cache_dir == tmp_path / "hf"
    assert [s.root for s in external_sources(settings)] == [tmp_path / "lm", tmp_path / "hf"]
    # LM Studio's own settings may name its folder with a "~" too.
    (tmp_path / ".lmstudio").mkdir()
    (tmp_path / ".lmstudio" / "settings.json").write_text(json.dumps({"downloadsFolder": "~/d"}))
    default = Settings(home=tmp_path / "state", lmstudio_models=True, hf_cache_models=False)
    assert [s.root for s in external_sources(default)] == [tmp_path / "d"]
