"""Hostile and broken model files against a real server: a template-injection payload in an
MLX and a GGUF chat template renders sandboxed (CVE-2024-34359), and truncated, empty or
crafted model files fail cleanly while the server and the other models keep working
(robustness.md S7, S8, D6, M3)."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import httpx
import pytest

from tests.conftest import GGUF_KEY, MLX_KEY, Server

HI = [{"role": "user", "content": "hi"}]


def _payloads(marker: Path) -> list[str]:
    return [
        f"{{{{ lipsum.__globals__['os'].popen('touch {marker}').read() }}}}",
        f"{{{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}}}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    ]


def _link_folder(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name.startswith("."):
            continue
        os.link(f, dst / f.name)


def _mlx_with_template(src: Path, dst: Path, template: str) -> None:
    _link_folder(src, dst)
    config = dst / "tokenizer_config.json"
    text = config.read_text()
    config.unlink()  # a hard link: never write through to the shared test model
    import json

    data = json.loads(text)
    data["chat_template"] = template
    config.write_text(json.dumps(data))


def _gguf_with_template(src: Path, dst: Path, template: str) -> None:
    """The GGUF twin with its chat template replaced in place (padded to the same length)."""
    data = bytearray(src.read_bytes())
    key = b"tokenizer.chat_template"
    at = data.index(key) + len(key)
    (vtype,) = struct.unpack_from("<I", data, at)
    (length,) = struct.unpack_from("<Q", data, at + 4)
    assert vtype == 8 and len(template) <= length
    start = at + 12
    data[start : start + length] = template.ljust(length).encode()
    dst.parent.mkdir(parents=True)
    dst.write_bytes(bytes(data))


def _gguf_header(n_tensors: int, n_kv: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)


@pytest.fixture(scope="module")
def hostile(models_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-models")
    marker = root / "pwned"
    mlx_src = models_root / MLX_KEY
    gguf_src = next((models_root / GGUF_KEY).glob("*.gguf"))
    _link_folder(mlx_src, root / "acme" / "healthy-mlx")
    for i, payload in enumerate(_payloads(marker)):
        _mlx_with_template(mlx_src, root / "evil" / f"template{i}-mlx", payload)
        _gguf_with_template(gguf_src, root / "evil" / f"template{i}-gguf" / "m.gguf", payload)

    broken = root / "broken"
    # truncated safetensors: the header reads, the weights are cut off
    _link_folder(mlx_src, broken / "truncated-mlx")
    weights = broken / "truncated-mlx" / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data[: len(data) // 2])
    # a safetensors header cut short
    _link_folder(mlx_src, broken / "header-cut-mlx")
    weights = broken / "header-cut-mlx" / "model.safetensors"
    weights.unlink()
    weights.write_bytes(data[:100])
    # config.json that is not JSON
    _link_folder(mlx_src, broken / "bad-config-mlx")
    (broken / "bad-config-mlx" / "config.json").unlink()
    (broken / "bad-config-mlx" / "config.json").write_text("{not json")
    # GGUF: empty, wrong magic, absurd tensor count, absurd string length, data cut off
    for name, content in {
        "empty-gguf": b"",
        "bad-magic-gguf": b"GGUX" + gguf_src.read_bytes()[4:4096],
        "many-tensors-gguf": _gguf_header(2**63),
        "huge-string-gguf": _gguf_header(0, 1) + struct.pack("<Q", 2**62) + b"key",
        "cut-gguf": gguf_src.read_bytes()[: gguf_src.stat().st_size // 2],
    }.items():
        (broken / name).mkdir(parents=True)
        (broken / name / "m.gguf").write_bytes(content)

    srv = Server(root, tmp_path_factory.mktemp("home-hostile"), "--no-auto-evict")
    srv.marker = marker
    srv.root = root
    yield srv
    srv.stop()
    shutil.rmtree(root, ignore_errors=True)


def _chat(srv, model: str) -> httpx.Response:
    return httpx.post(
        srv.url + "/v1/chat/completions",
        json={"model": model, "messages": HI, "max_tokens": 2},
        timeout=120,
    )


@pytest.mark.parametrize("fmt", ["mlx", "gguf"])
@pytest.mark.parametrize("i", range(3))
def test_template_injection_is_sandboxed(hostile, fmt, i):
    r = _chat(hostile, f"evil/template{i}-{fmt}")
    assert r.status_code == 400, r.text
    assert "unsafe" in r.json()["error"]["message"] or "template" in r.json()["error"]["message"]
    assert not hostile.marker.exists()
    # the server is fine and so is a healthy model
    assert _chat(hostile, "acme/healthy-mlx").status_code == 200


BROKEN = [
    "truncated-mlx",
    "header-cut-mlx",
    "bad-config-mlx",
    "empty-gguf",
    "bad-magic-gguf",
    "many-tensors-gguf",
    "huge-string-gguf",
    "cut-gguf",
]


@pytest.mark.parametrize("name", BROKEN)
def test_broken_model_files_fail_cleanly(hostile, name):
    for _ in range(2):
        r = _chat(hostile, f"broken/{name}")
        assert r.status_code in (404, 500), r.text
        err = r.json()["error"]
        assert err["code"] in ("model_not_found", "model_load_failed"), err
        if r.status_code == 500:
            assert r.headers["x-should-retry"] == "false"
        assert str(hostile.root) not in r.text and ".safetensors" not in r.text
        assert ".gguf" not in r.text
    assert hostile.proc.poll() is None
    assert _chat(hostile, "acme/healthy-mlx").status_code == 200
    health = hostile.health()
    assert health["status"] == "ok"
    assert not [m for m in health["loaded"] if m["id"].startswith("broken/")]


def test_broken_models_are_not_listed(hostile):
    ids = {m["id"] for m in httpx.get(hostile.url + "/v1/models").json()["data"]}
    assert "acme/healthy-mlx" in ids
    assert not {i for i in ids if i.startswith("broken/")} - {
        "broken/truncated-mlx",
        "broken/cut-gguf",
    }
