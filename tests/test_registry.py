import json
import logging

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file

from mlxserve.core.registry import Registry, params_string, valid_key, valid_key_part


def make_mlx(folder, *, quant_bits=None, template="{{ messages }}"):
    folder.mkdir(parents=True)
    config = {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "max_position_embeddings": 8192,
        "torch_dtype": "float32",
    }
    tensors = {"model.embed_tokens.weight": np.zeros((100, 8), np.float32)}
    if quant_bits:
        config["quantization"] = {"group_size": 64, "bits": quant_bits}
        tensors = {
            "model.embed_tokens.weight": np.zeros((100, 8 * quant_bits // 32), np.uint32),
            "model.embed_tokens.scales": np.zeros((100, 1), np.float16),
            "model.embed_tokens.biases": np.zeros((100, 1), np.float16),
        }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    save_file(tensors, str(folder / "model.safetensors"))


def make_gguf(path, *, template="{% for m in messages %}{% endfor %}{% if tools %}{% endif %}"):
    path.parent.mkdir(parents=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(2048)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_chat_template(template)
    w.add_tensor("token_embd.weight", np.zeros((50, 16), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_discovers_mlx_and_gguf_with_metadata(tmp_path):
    make_mlx(tmp_path / "acme" / "tiny-mlx")
    make_mlx(tmp_path / "acme" / "tiny-4bit", quant_bits=4)
    make_gguf(tmp_path / "acme" / "tiny-gguf" / "tiny-f32.gguf")
    models = {m.key: m for m in Registry(tmp_path).scan()}
    assert set(models) == {"acme/tiny-mlx", "acme/tiny-4bit", "acme/tiny-gguf"}

    mlx = models["acme/tiny-mlx"]
    assert (mlx.format, mlx.architecture, mlx.quantization) == ("mlx", "qwen2", "F32")
    assert mlx.bits_per_weight == 32 and mlx.params_string == "800"
    assert mlx.max_context_length == 8192 and not mlx.trained_for_tool_use
    assert mlx.size_bytes == sum(p.stat().st_size for p in mlx.path.iterdir())

    q = models["acme/tiny-4bit"]
    assert (q.quantization, q.bits_per_weight, q.params_string) == ("4bit", 4.0, "800")

    g = models["acme/tiny-gguf"]
    assert (g.format, g.architecture, g.quantization) == ("gguf", "llama", "F32")
    assert g.params_string == "800" and g.bits_per_weight == 32.0
    assert g.max_context_length == 2048 and g.trained_for_tool_use
    assert g.weights.name == "tiny-f32.gguf"


def test_unusable_folders_are_skipped_and_logged_once(tmp_path, caplog):
    make_mlx(tmp_path / "ok" / "model")
    (tmp_path / "bad" / "notes").mkdir(parents=True)
    (tmp_path / "bad" / "notes" / "readme.txt").write_text("hi")
    (tmp_path / "bad" / "broken-gguf").mkdir()
    (tmp_path / "bad" / "broken-gguf" / "x.gguf").write_bytes(b"GGUF\x03\x00garbage" * 3)
    (tmp_path / "bad" / "empty-gguf").mkdir()
    (tmp_path / "bad" / "empty-gguf" / "x.gguf").write_bytes(b"")
    make_mlx(tmp_path / "bad" / "bad-config")
    (tmp_path / "bad" / "bad-config" / "config.json").write_text("{not json")
    make_mlx(tmp_path / "bad" / "bad-tensors")
    (tmp_path / "bad" / "bad-tensors" / "model.safetensors").write_bytes(b"\xff" * 20)
    (tmp_path / "stray-file.txt").write_text("x")

    registry = Registry(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mlxserve.registry"):
        assert [m.key for m in registry.scan()] == ["ok/model"]
        first = [r.getMessage() for r in caplog.records]
        registry.scan()
        registry.scan()
    assert len(caplog.records) == len(first) == 5
    assert any("bad/broken-gguf" in m and "GGUF" in m for m in first)
    assert any("bad/bad-config" in m and "config.json" in m for m in first)


def test_get_validates_keys_before_touching_the_filesystem(tmp_path):
    make_mlx(tmp_path / "acme" / "m")
    registry = Registry(tmp_path)
    assert registry.get("acme/m") is not None
    for key in ["../acme/m", "acme/../acme/m", "/etc/passwd", "acme", "acme/m/x", "", "acme/.."]:
        assert registry.get(key) is None


def test_missing_root_is_empty(tmp_path):
    assert Registry(tmp_path / "nope").scan() == []


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (800, "800"),
        (135_000_000, "135M"),
        (494_032_768, "494M"),
        (7_241_732_096, "7.2B"),
        (1_500_000, "1.5M"),
        (70_000_000_000, "70B"),
    ],
)
def test_params_string(n, text):
    assert params_string(n) == text


def test_demo_marker_labels_the_model(tmp_path):
    make_mlx(tmp_path / "mlxserve" / "demo-random-weights-x")
    marker = tmp_path / "mlxserve" / "demo-random-weights-x" / "mlxserve-demo.json"
    marker.write_text(json.dumps({"description": "DEMO: random weights"}))
    (model,) = Registry(tmp_path).scan()
    assert model.description == "DEMO: random weights"


def test_several_gguf_quantizations_get_a_key_each(tmp_path):
    folder = tmp_path / "acme" / "tiny-GGUF"
    make_gguf(folder / "tiny-Q8_0.gguf")
    make_gguf(tmp_path / "x" / "y" / "tiny-Q4_K_M.gguf")
    (tmp_path / "x" / "y" / "tiny-Q4_K_M.gguf").rename(folder / "tiny-Q4_K_M.gguf")
    # A split set is one quantization, keyed by its first shard.
    make_gguf(tmp_path / "x" / "z" / "a.gguf")
    for shard in ("tiny-BF16-00001-of-00002.gguf", "tiny-BF16-00002-of-00002.gguf"):
        (folder / shard).write_bytes((tmp_path / "x" / "z" / "a.gguf").read_bytes())
    models = {m.key: m for m in Registry(tmp_path).scan() if m.publisher == "acme"}
    assert set(models) == {
        "acme/tiny-GGUF",
        "acme/tiny-GGUF@Q4_K_M",
        "acme/tiny-GGUF@Q8_0",
        "acme/tiny-GGUF@BF16",
    }
    assert models["acme/tiny-GGUF"].weights.name == "tiny-Q4_K_M.gguf"  # the first, as before
    assert models["acme/tiny-GGUF@Q8_0"].weights.name == "tiny-Q8_0.gguf"
    assert models["acme/tiny-GGUF@BF16"].weights.name == "tiny-BF16-00001-of-00002.gguf"
    registry = Registry(tmp_path)
    assert registry.get("acme/tiny-GGUF@q8_0").weights.name == "tiny-Q8_0.gguf"
    assert registry.get("acme/tiny-GGUF@Q2_K") is None
    assert registry.get("acme/tiny-GGUF@") is None


def test_a_single_gguf_keeps_one_key(tmp_path):
    make_gguf(tmp_path / "acme" / "tiny-GGUF" / "tiny-Q8_0.gguf")
    assert [m.key for m in Registry(tmp_path).scan()] == ["acme/tiny-GGUF"]


@pytest.mark.parametrize("key", ["acme/abc\n", "acme\n/abc", "acme/abc@Q8_0\n"])
def test_keys_with_a_trailing_newline_are_refused(key):
    assert not valid_key_part("abc\n")
    assert not valid_key(key)
