"""Downloads against a hub look-alike on loopback: spec parsing, file choice, verification,
resume, one transfer for concurrent requests, disk space (``mlxserve.core.downloads``)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from mlxserve.core import downloads
from mlxserve.core.downloads import (
    DownloadManager,
    HubModelNotFound,
    HubUnreachable,
    InsufficientDiskSpace,
)
from mlxserve.core.hubfiles import DownloadError, DownloadSpec, RemoteFile, parse_spec, select_files
from mlxserve.core.registry import Registry
from mlxserve.errors import InvalidRequest
from tests.hubserver import Hub, HubServer

REPO = "hub-test/tiny-qwen2-mlx"
GGUF_REPO = "hub-test/tiny-qwen2-GGUF"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def hub(models_root):
    hub = Hub()
    hub.add_repo(REPO, models_root / "mlxserve-test" / "tiny-qwen2-mlx")
    server = HubServer(hub)
    yield hub, server.url
    server.close()


@pytest.fixture(scope="module")
def gguf_folder(models_root, tmp_path_factory) -> Path:
    """A GGUF repository holding two quantizations (the same tiny model under two names)."""
    folder = tmp_path_factory.mktemp("gguf-repo")
    source = models_root / "mlxserve-test" / "tiny-qwen2-gguf" / "tiny-qwen2-f32.gguf"
    for name in ("tiny-qwen2-Q4_K_M.gguf", "tiny-qwen2-Q8_0.gguf"):
        try:
            os.link(source, folder / name)
        except OSError:
            shutil.copy(source, folder / name)
    (folder / "README.md").write_text("# tiny\n")
    return folder


def _run(root: Path, url: str, *specs: str) -> list:
    async def go():
        manager = DownloadManager(root, Registry(root), endpoint=url)
        jobs = await asyncio.gather(*(manager.start(manager.parse(s)) for s in specs))
        for job in jobs:
            if job is not None:
                await job.finished.wait()
        return jobs

    return asyncio.run(go())


def _transfers(hub: Hub, name: str) -> list[str | None]:
    return [
        rng for method, path, rng in hub.requests if method == "GET" and path.endswith("/" + name)
    ]


# --- parsing and choosing files ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "repo", "quant"),
    [
        ("mlx-community/Qwen3-0.6B-4bit", "mlx-community/Qwen3-0.6B-4bit", None),
        (
            "https://huggingface.co/mlx-community/Qwen3-0.6B-4bit",
            "mlx-community/Qwen3-0.6B-4bit",
            None,
        ),
        (
            "https://huggingface.co/lmstudio-community/X-GGUF/tree/main",
            "lmstudio-community/X-GGUF",
            None,
        ),
        ("hf.co/lmstudio-community/X-GGUF", "lmstudio-community/X-GGUF", None),
        ("lmstudio-community/X-GGUF@Q4_K_M", "lmstudio-community/X-GGUF", "Q4_K_M"),
    ],
)
def test_parse_spec(text, repo, quant):
    assert parse_spec(text) == DownloadSpec(repo, quant)


def test_parse_spec_quantization_field():
    assert parse_spec("https://huggingface.co/a/b-GGUF", "Q8_0") == DownloadSpec("a/b-GGUF", "Q8_0")


@pytest.mark.parametrize(
    "text",
    [
        "../../x",
        "..%2F..%2Fx",
        "/etc/passwd",
        "a/../../b",
        "..\\x",
        "a/..",
        "onlyname",
        "a/b/c",
        "https://evil.example/a/b",
        "a/b@../../x",
        "a/b@",
        "a/abc\n@Q8_0",
    ],
)
def test_parse_spec_refuses(text):
    with pytest.raises(InvalidRequest):
        parse_spec(text)


def _remote(*names: str) -> list[RemoteFile]:
    return [
        RemoteFile(n, 10, "0" * 64 if n.endswith((".gguf", ".safetensors")) else None, None)
        for n in names
    ]


def test_select_gguf_quantization_and_shards():
    files = _remote(
        "m-Q4_K_M.gguf",
        "m-Q8_0-00001-of-00002.gguf",
        "m-Q8_0-00002-of-00002.gguf",
        "mmproj-m-f16.gguf",
        "README.md",
    )
    chosen, fmt = select_files(DownloadSpec("a/m-GGUF", "Q8_0"), files)
    assert fmt == "gguf"
    # A vision repository's projector comes along.
    assert [f.name for f in chosen] == [
        "m-Q8_0-00001-of-00002.gguf",
        "m-Q8_0-00002-of-00002.gguf",
        "mmproj-m-f16.gguf",
    ]
    # No quantization named: LM Studio's default, Q4_K_M, when the repository has it.
    chosen, _ = select_files(DownloadSpec("a/m-GGUF"), files)
    assert [f.name for f in chosen] == ["m-Q4_K_M.gguf", "mmproj-m-f16.gguf"]
    projectors = _remote("m-Q4_K_M.gguf", "mmproj-m-f32.gguf", "mmproj-m-bf16.gguf")
    chosen, _ = select_files(DownloadSpec("a/m-GGUF"), projectors)
    assert [f.name for f in chosen] == ["m-Q4_K_M.gguf", "mmproj-m-bf16.gguf"]
    chosen, _ = select_files(DownloadSpec("a/m-GGUF"), _remote("m-Q4_K_M.gguf"))
    assert [f.name for f in chosen] == ["m-Q4_K_M.gguf"]
    with pytest.raises(DownloadError, match="Q4_K_M, Q8_0"):
        select_files(DownloadSpec("a/m-GGUF", "Q2_K"), files)
    with pytest.raises(DownloadError, match="several GGUF files"):
        select_files(DownloadSpec("a/m-GGUF"), _remote("m-Q5_K_S.gguf", "m-Q6_K.gguf"))


def test_select_mlx_files():
    files = _remote(
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "modeling_x.py",
        "pytorch_model.bin",
        ".gitattributes",
        "sub/extra.json",
    )
    chosen, fmt = select_files(DownloadSpec("a/m"), files)
    assert fmt == "mlx"
    assert [f.name for f in chosen] == ["config.json", "model.safetensors", "tokenizer.json"]
    with pytest.raises(DownloadError, match="neither an MLX model"):
        select_files(DownloadSpec("a/m"), _remote("pytorch_model.bin", "config.json"))


# --- transfers ---------------------------------------------------------------------------


def test_download_verifies_and_places_model_once_for_concurrent_requests(
    hub, models_root, tmp_path
):
    hub_, url = hub
    jobs = _run(tmp_path, url, REPO, REPO)
    assert jobs[0] is jobs[1]
    status = jobs[0].status()
    assert status["status"] == "completed"
    assert status["downloaded_bytes"] == status["total_size_bytes"] > 0
    assert "completed_at" in status
    # One transfer of each file, however many asked.
    assert len(_transfers(hub_, "model.safetensors")) == 1
    source = models_root / "mlxserve-test" / "tiny-qwen2-mlx"
    dest = tmp_path / "hub-test" / "tiny-qwen2-mlx"
    assert _sha(dest / "model.safetensors") == _sha(source / "model.safetensors")
    assert Registry(tmp_path).get(REPO) is not None
    # The staging area is gone; the next request finds the model without any transfer.
    assert not (tmp_path / downloads.STAGING_DIR).exists()
    before = len(hub_.requests)
    assert _run(tmp_path, url, REPO) == [None]
    assert len(hub_.requests) == before


def test_checksum_mismatch_is_refused_and_leaves_nothing(hub, tmp_path):
    hub_, url = hub
    hub_.corrupt.add("model.safetensors")
    (job,) = _run(tmp_path, url, REPO)
    assert job.state == "failed"
    assert "sha256" in job.error and "model.safetensors" in job.error
    assert not (tmp_path / "hub-test").exists()
    assert Registry(tmp_path).scan() == []
    staged = {p.name for p in job.staging.iterdir()}
    assert not any(n.startswith("model.safetensors") for n in staged)
    # The hub is fixed: the next request fetches only what is missing, and succeeds.
    hub_.corrupt.clear()
    (job,) = _run(tmp_path, url, REPO)
    assert job.state == "completed", job.error
    assert len(_transfers(hub_, "config.json")) == 1


def test_cut_transfer_resumes_with_range(hub, models_root, tmp_path):
    hub_, url = hub
    hub_.drop_after["model.safetensors"] = 25_000_000
    (job,) = _run(tmp_path, url, REPO)
    assert job.state == "completed", job.error
    ranges = _transfers(hub_, "model.safetensors")
    assert len(ranges) == 2 and ranges[0] is None
    # The retry asks for the rest only (from the last whole chunk received).
    resumed_at = int(ranges[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= 25_000_000
    source = models_root / "mlxserve-test" / "tiny-qwen2-mlx" / "model.safetensors"
    assert _sha(tmp_path / REPO / "model.safetensors") == _sha(source)


def test_partial_file_from_an_earlier_process_is_resumed(hub, models_root, tmp_path):
    hub_, url = hub
    source = models_root / "mlxserve-test" / "tiny-qwen2-mlx" / "model.safetensors"
    staging = tmp_path / downloads.STAGING_DIR / "hub-test__tiny-qwen2-mlx"
    staging.mkdir(parents=True)
    (staging / "model.safetensors.incomplete").write_bytes(source.read_bytes()[:1_000_000])
    (job,) = _run(tmp_path, url, REPO)
    assert job.state == "completed", job.error
    assert _transfers(hub_, "model.safetensors") == ["bytes=1000000-"]
    assert _sha(tmp_path / REPO / "model.safetensors") == _sha(source)


def test_not_enough_disk_space(hub, tmp_path, monkeypatch):
    _, url = hub
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(downloads.shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(InsufficientDiskSpace, match="Not enough disk space"):
        _run(tmp_path, url, REPO)
    assert [p.name for p in tmp_path.iterdir()] == []


def test_unknown_repository(hub, tmp_path):
    _, url = hub
    with pytest.raises(HubModelNotFound):
        _run(tmp_path, url, "hub-test/nothing-here")


def test_gguf_quantizations_share_the_model_folder(gguf_folder, tmp_path):
    hub = Hub()
    hub.add_repo(GGUF_REPO, gguf_folder)
    server = HubServer(hub)
    try:
        (job,) = _run(tmp_path, server.url, f"{GGUF_REPO}@Q8_0")
        assert job.state == "completed", job.error
        assert job.status()["model_key"] == GGUF_REPO  # its only quantization
        folder = tmp_path / GGUF_REPO
        assert sorted(p.name for p in folder.iterdir()) == ["tiny-qwen2-Q8_0.gguf"]
        info = Registry(tmp_path).get(GGUF_REPO)
        assert info is not None and info.format == "gguf"
        (job,) = _run(tmp_path, server.url, f"{GGUF_REPO}@q4_k_m")
        assert job.state == "completed", job.error
        # Two quantizations now: each is loadable by its own key.
        assert job.status()["model_key"] == f"{GGUF_REPO}@Q4_K_M"
        assert Registry(tmp_path).get(f"{GGUF_REPO}@Q8_0").weights.name == "tiny-qwen2-Q8_0.gguf"
        assert sorted(p.name for p in folder.iterdir()) == [
            "tiny-qwen2-Q4_K_M.gguf",
            "tiny-qwen2-Q8_0.gguf",
        ]
        assert _run(tmp_path, server.url, f"{GGUF_REPO}@Q8_0") == [None]
        with pytest.raises(DownloadError, match="no Q2_K file"):
            _run(tmp_path, server.url, f"{GGUF_REPO}@Q2_K")
    finally:
        server.close()


def test_unreachable_hub_is_a_502(tmp_path):
    # Whatever the hub client raises for a refused connection (httpx errors in
    # huggingface_hub 1.x and later, OSError before) is a 502, never a generic 500.
    from tests.conftest import free_port

    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(HubUnreachable, match="Cannot reach the model hub") as exc:
        _run(tmp_path, url, REPO)
    assert exc.value.status == 502
