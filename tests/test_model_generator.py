"""scripts/make_test_models.py, checked with the real engines (mlx-lm and llama.cpp)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
MODELS_DIR = Path(os.environ.get("MLXSERVE_TEST_MODELS_DIR", REPO / ".cache" / "test-models"))
SCRIPT = REPO / "scripts" / "make_test_models.py"
PUBLISHER, NAME = "mlxserve-test", "tiny-qwen2"

TEXTS = [
    "Hello, world!",
    "  two leading spaces,\ttabs\n\nand blank lines\r\n",
    "café naïve résumé Ünïcödé",
    "日本語のテキストです。",
    "emoji 🎉👍🏽 and ☃ — “quotes” ‘x’",
    "numbers 1234567 3.14159 -42 1e-9",
    "I'm sure they'll've done it, DON'T YOU'D",
    "def f(x):\n    return x**2  # square\n",
    '{"name": "get_weather", "arguments": {"city": "Paris"}}',
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "an HTML-ish </s> and <s> and [PAD151700]",
]
PROMPTS = ["Hello, who are you?", "Write a haiku about the sea."]
N_GREEDY = 24


@pytest.fixture(scope="module")
def paths(make_models: ModuleType, models_root: Path) -> dict[str, Path]:
    return make_models.generate(models_root, publisher=PUBLISHER, name=NAME, seed=0)


@pytest.fixture(scope="module")
def mlx_pair(paths: dict[str, Path]) -> tuple[Any, Any]:
    from mlx_lm import load

    loaded = load(str(paths["mlx"]))
    return loaded[0], loaded[1]


@pytest.fixture(scope="module")
def llama(paths: dict[str, Path]) -> Any:
    import llama_cpp

    # f32 KV cache: llama.cpp's default f16 cache moves logits by ~1e-3, which flips
    # near-tied argmaxes of this random model in a few percent of long greedy runs.
    return llama_cpp.Llama(
        model_path=str(paths["gguf"]),
        n_ctx=512,
        verbose=False,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
    )


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _model_dirs(root: Path) -> list[Path]:
    return [root / PUBLISHER / f"{NAME}-mlx", root / PUBLISHER / f"{NAME}-gguf"]


def test_layout_and_metadata(models_root: Path, paths: dict[str, Path], llama: Any) -> None:
    mlx_dir, gguf_file = paths["mlx"], paths["gguf"]
    assert mlx_dir == models_root / PUBLISHER / f"{NAME}-mlx"
    assert gguf_file == models_root / PUBLISHER / f"{NAME}-gguf" / f"{NAME}-f32.gguf"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (mlx_dir / f).is_file()
    config = json.loads((mlx_dir / "config.json").read_text())
    tok_config = json.loads((mlx_dir / "tokenizer_config.json").read_text())
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"] is True
    assert config["vocab_size"] == llama.n_vocab() == 151936
    meta = llama.metadata
    assert meta["general.architecture"] == "qwen2"
    assert meta["tokenizer.chat_template"] == tok_config["chat_template"]
    assert meta["tokenizer.ggml.add_bos_token"] == "false"
    assert llama.token_eos() == 151645 and tok_config["eos_token"] == "<|im_end|>"


def test_same_end_of_generation_tokens(mlx_pair: tuple[Any, Any], llama: Any) -> None:
    import llama_cpp

    vocab = llama._model.vocab
    eog = {t for t in range(llama.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)}
    assert eog == set(mlx_pair[1].eos_token_ids) == {151643, 151645, 128247}


@pytest.mark.parametrize("text", TEXTS)
def test_tokenization_parity(mlx_pair: tuple[Any, Any], llama: Any, text: str) -> None:
    _, tokenizer = mlx_pair
    hf_ids = tokenizer.encode(text, add_special_tokens=False)
    assert hf_ids == llama.tokenize(text.encode(), add_bos=False, special=True)
    assert tokenizer.decode(hf_ids) == text
    assert llama.detokenize(hf_ids, special=True).decode() == text


def test_chat_template_renders_the_same_in_both_engines(
    mlx_pair: tuple[Any, Any], llama: Any
) -> None:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    _, tokenizer = mlx_pair
    tools: Any = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city, in °C",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    messages: Any = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Zürich?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "b",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Zürich"}},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "a", "content": "21"},
        {"role": "tool", "tool_call_id": "b", "content": "18"},
    ]
    formatter = Jinja2ChatFormatter(
        template=llama.metadata["tokenizer.chat_template"],
        eos_token="<|im_end|>",
        bos_token="",
        add_generation_prompt=True,
    )
    cases: Any = ((messages, {"tools": tools}), (messages[1:2], {}))
    for msgs, kwargs in cases:
        hf = tokenizer.apply_chat_template(
            msgs, add_generation_prompt=True, tokenize=False, **kwargs
        )
        assert hf == formatter(messages=msgs, **kwargs).prompt
    assert hf == "<|im_start|>user\nWeather in Paris and Zürich?<|im_end|>\n<|im_start|>assistant\n"
    full = formatter(messages=messages, tools=tools).prompt
    assert full.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert '\n<tools>\n{"type": "function", "function": {"name": "get_weather"' in full
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
        '"Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
        '"Zürich"}}\n</tool_call><|im_end|>\n'
    ) in full
    assert (
        "<|im_start|>user\n<tool_response>\n21\n</tool_response>\n<tool_response>\n18\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n"
    ) in full


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_parity(mlx_pair: tuple[Any, Any], llama: Any, prompt: str) -> None:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    model, tokenizer = mlx_pair
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids == llama.tokenize(text.encode(), add_bos=False, special=True)
    assert ids[:3] == [151644, 872, 198]  # <|im_start|> user \n

    steps = generate_step(
        mx.array(ids), model, max_tokens=N_GREEDY, sampler=lambda x: mx.argmax(x, axis=-1)
    )
    mlx_out = [int(token) for token, _ in steps]
    llama_out: list[int] = []
    for token in llama.generate(ids, temp=0.0, top_k=1, reset=True):
        llama_out.append(int(token))
        if len(llama_out) == N_GREEDY:
            break
    assert mlx_out == llama_out
    assert len(set(mlx_out)) > N_GREEDY // 2  # a model that repeats itself would prove little


def test_deterministic(
    make_models: ModuleType, models_root: Path, paths: dict[str, Path], tmp_path: Path
) -> None:
    make_models.generate(tmp_path / "a", publisher=PUBLISHER, name=NAME, seed=0)
    for ref, new in zip(_model_dirs(models_root), _model_dirs(tmp_path / "a"), strict=True):
        assert _hashes(ref) == _hashes(new)

    other = make_models.generate(tmp_path / "b", PUBLISHER, NAME, 1, formats=("mlx",))
    assert set(other) == {"mlx"}
    ref_hashes, other_hashes = _hashes(paths["mlx"]), _hashes(other["mlx"])
    assert other_hashes["model.safetensors"] != ref_hashes["model.safetensors"]
    assert other_hashes["tokenizer.json"] == ref_hashes["tokenizer.json"]


def test_idempotent(
    make_models: ModuleType, models_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def snapshot() -> dict[Path, tuple[int, int]]:
        files = [p for d in _model_dirs(models_root) for p in d.rglob("*")]
        return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in files}

    before = snapshot()
    capsys.readouterr()
    start = time.perf_counter()
    make_models.generate(models_root, publisher=PUBLISHER, name=NAME, seed=0)
    assert time.perf_counter() - start < 0.5
    assert snapshot() == before
    assert capsys.readouterr().out == ""

    cli = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(models_root)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout == "" and snapshot() == before


def test_unstamped_output_is_replaced(make_models: ModuleType, tmp_path: Path) -> None:
    # What an interrupted run of an older, non-atomic writer could have left behind.
    partial = tmp_path / PUBLISHER / f"{NAME}-mlx"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")
    out = make_models.generate(tmp_path, PUBLISHER, NAME, seed=0, formats=("mlx",))
    assert out["mlx"] == partial
    assert json.loads((partial / "config.json").read_text())["model_type"] == "qwen2"
    assert sorted(p.name for p in (tmp_path / PUBLISHER).iterdir()) == [f"{NAME}-mlx"]
    with pytest.raises(ValueError):
        make_models.generate(tmp_path, PUBLISHER, NAME, formats=("onnx",))
