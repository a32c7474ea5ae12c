"""Embeddings without a real model: request validation (ASGI level), fitting inputs to the
window, the engine's batching machinery, registry detection and the GGUF vocabulary."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from script_loader import load_script
from starlette.testclient import TestClient

from backends.base import LoadOptions
from backends.embedding import EmbeddingCancelled, EmbeddingEngine, EmbeddingInfo
from mlxserve.app import create_app
from mlxserve.core.embeddings import EmbeddingRequest, _check_dimensions, _complete
from mlxserve.core.registry import Registry
from mlxserve.errors import InputTooLong, InvalidRequest
from mlxserve.protocols.embeddings import MAX_INPUTS
from mlxserve.protocols.embeddings import EmbeddingRequest as WireRequest
from mlxserve.settings import Settings

# --------------------------------------------------------------- request validation


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    app = create_app(Settings(home=root, models_dir=root))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize("path", ["/v1/embeddings", "/api/v0/embeddings"])
@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": ["ok", ""]}, "input[1]"),
        ({"input": ["ok", 3]}, "input[1]"),
        ({"input": [[1, 2], []]}, "input[1]"),
        ({"input": [[1, 2], "x"]}, "input[1]"),
        ({"input": [[1, -2]]}, "input[0][1]"),
        ({"input": [1, True]}, "input[1]"),
        ({"input": [1, 2.5]}, "input[1]"),
        ({"input": [1, 2**31]}, "input[1]"),
        ({"input": [{"text": "x"}]}, "input"),
        ({"input": [None]}, "input"),
        ({"input": None}, "input"),
        ({"input": 42}, "input"),
        ({"input": ["x"] * (MAX_INPUTS + 1)}, "input"),
        ({"encoding_format": "int8"}, "encoding_format"),
        ({"dimensions": 0}, "dimensions"),
        ({"dimensions": "big"}, "dimensions"),
        ({"truncate": "yes"}, "truncate"),
        ({"model": ""}, "model"),
    ],
)
def test_bad_requests_name_the_param(client, path, patch, param):
    body = {"model": "some/model", "input": "hello", **patch}
    err = error(client.post(path, json=body), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_lone_surrogates_are_refused(client):
    raw = b'{"model": "m/x", "input": ["ok", "bad \\ud800"]}'
    r = client.post("/v1/embeddings", content=raw, headers={"content-type": "application/json"})
    assert error(r, 400)["param"] == "input[1]"


def test_missing_fields(client):
    assert error(client.post("/v1/embeddings", json={"model": "m/x"}), 400)["param"] == "input"
    assert error(client.post("/v1/embeddings", json={"input": "x"}), 400)["param"] == "model"


@pytest.mark.parametrize(
    "value", ["hello", ["a", "b"], [1, 2, 3], [[1, 2], [3]], ["x"] * MAX_INPUTS]
)
def test_well_formed_input_reaches_the_model_lookup(client, value):
    body = {"model": "nobody/none", "input": value, "user": "u", "extra": {"ignored": True}}
    err = error(client.post("/v1/embeddings", json=body), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"


@pytest.mark.parametrize(
    ("value", "inputs", "single"),
    [
        ("hi", ("hi",), True),
        (["a", "b"], ("a", "b"), False),
        ([5, 6], ((5, 6),), True),
        ([[5], [6, 7]], ((5,), (6, 7)), False),
    ],
)
def test_to_core(value, inputs, single):
    core = WireRequest.model_validate(
        {"model": "m/x", "input": value, "dimensions": 8, "truncate": True}
    ).to_core()
    assert (core.inputs, core.single, core.truncate, core.dimensions) == (inputs, single, True, 8)


# --------------------------------------------------------------- fitting inputs


INFO = EmbeddingInfo(
    format="mlx",
    dimensions=4,
    context_length=6,
    vocab_size=100,
    pooling="mean",
    normalize=True,
    prefix=(1,),
    suffix=(2,),
)


def request(inputs, **kw) -> EmbeddingRequest:
    return EmbeddingRequest(model="m/x", inputs=inputs, **kw)


def test_inputs_get_the_special_tokens_once():
    texts = request(("a", "b"))
    assert _complete(texts, [[5, 6], []], INFO, ids=False) == [[1, 5, 6, 2], [1, 2]]
    # A text whose tokens look like the special ones is still wrapped.
    assert _complete(texts, [[1, 5, 2]], INFO, ids=False) == [[1, 1, 5, 2, 2]]
    arrays = request(((5,), (1, 5, 2), (1, 5), (5, 2)))
    seqs = [[5], [1, 5, 2], [1, 5], [5, 2]]
    assert _complete(arrays, seqs, INFO, ids=True) == [[1, 5, 2]] * 4


def test_long_inputs_are_refused_unless_truncation_is_asked():
    long = [[7] * 10]
    with pytest.raises(InputTooLong) as exc:
        _complete(request(("x",), single=True), long, INFO, ids=False)
    assert exc.value.param == "input" and exc.value.code == "context_length_exceeded"
    assert "12 tokens" in exc.value.message and "maximum of 6" in exc.value.message
    with pytest.raises(InputTooLong) as exc:
        _complete(request(("a", "b")), [[3], [7] * 5], INFO, ids=False)
    assert exc.value.param == "input[1]"
    # Exactly the window fits; truncation keeps the first tokens and the special ones.
    assert _complete(request(("x",)), [[7, 8, 9, 10]], INFO, ids=False) == [[1, 7, 8, 9, 10, 2]]
    cut = _complete(request(("x",), truncate=True), [list(range(10, 20))], INFO, ids=False)
    assert cut == [[1, 10, 11, 12, 13, 2]]


def test_dimensions():
    assert _check_dimensions(request(("x",)), INFO) == 4
    assert _check_dimensions(request(("x",), dimensions=4), INFO) == 4
    for bad in (2, 5):
        with pytest.raises(InvalidRequest) as exc:
            _check_dimensions(request(("x",), dimensions=bad), INFO)
        assert exc.value.param == "dimensions"
    matryoshka = EmbeddingInfo(**{**INFO.__dict__, "matryoshka_dimensions": (2,)})
    assert _check_dimensions(request(("x",), dimensions=2), matryoshka) == 2


# --------------------------------------------------------------- engine machinery


class FakeEngine(EmbeddingEngine):
    """Vector i of an input is (len, first token, 0, ...): checks order and batching."""

    format = "mlx"
    batch_tokens = 12
    max_batch_inputs = 3

    def _load(self) -> EmbeddingInfo:
        self.passes: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        return EmbeddingInfo(
            format="mlx", dimensions=3, context_length=8, vocab_size=50, pooling="mean",
            normalize=self.options.kv_cache_f32,
        )  # fmt: skip

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [[len(t)] for t in texts]

    def _encode(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        self.gate.wait()
        self.passes.append([len(ids) for ids in batch])
        return np.array([[len(ids), ids[0], 0] for ids in batch], np.float32)

    def _unload(self) -> None:
        pass


def test_batches_are_sorted_and_within_budget():
    engine = FakeEngine(Path("fake"), LoadOptions(context_length=8))
    try:
        inputs = [[9] * n for n in (5, 1, 8, 2, 2, 3, 1)]
        vectors = engine.embed(inputs).result()
        assert vectors[:, 0].tolist() == [5, 1, 8, 2, 2, 3, 1]  # back in request order
        # padded cost = inputs x longest <= 12, at most 3 inputs a pass, shortest first
        assert engine.passes == [[1, 1, 2], [2, 3], [5], [8]]
        assert engine.embedded_inputs == 7 and engine.pending == 0
    finally:
        engine.close()


def test_vectors_are_normalized_when_the_model_says_so():
    engine = FakeEngine(Path("fake"), LoadOptions(context_length=8, kv_cache_f32=True))
    try:
        v = engine.embed([[3, 4], [7]]).result()
        assert np.allclose(np.linalg.norm(v, axis=1), 1.0)
    finally:
        engine.close()


def test_cancel_and_queue_limits():
    engine = FakeEngine(Path("fake"), LoadOptions(context_length=8), max_queue=2)
    try:
        engine.gate.clear()
        cancel = threading.Event()
        running = engine.embed([[1], [2] * 8], cancel)  # two passes; blocked in the first
        queued = engine.embed([[1]])
        with pytest.raises(Exception, match="already waiting"):
            engine.embed([[1]])
        assert queued.cancel()  # a queued call cancelled before it runs frees its slot
        cancel.set()
        engine.gate.set()
        with pytest.raises(EmbeddingCancelled):
            running.result(timeout=5)
        assert engine.pending == 0
        assert engine.embed([[1]]).result(timeout=5).shape == (1, 3)
    finally:
        engine.close()


# --------------------------------------------------------------- registry and converter


def test_registry_types(tmp_path):
    from safetensors.numpy import save_file

    def folder(name: str, config: dict, extra: dict[str, str] | None = None) -> None:
        path = tmp_path / "pub" / name
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps(config))
        save_file({"w": np.zeros((4, 4), np.float32)}, str(path / "model.safetensors"))
        for rel, text in (extra or {}).items():
            (path / rel).write_text(text)

    bert = {"model_type": "bert", "max_position_embeddings": 512}
    folder("st", {"model_type": "qwen3"}, {"modules.json": "[]"})
    folder("bert", bert)
    folder("chat", {"model_type": "qwen2"})
    types = {m.name: m.type for m in Registry(tmp_path).scan()}
    assert types == {"st": "embedding", "bert": "embedding", "chat": "llm"}


def _converter():
    module = load_script("make_embedding_models")
    return module


def test_wordpiece_vocab_in_llama_cpp_spelling():
    from gguf import TokenType

    tokenizer = {
        "model": {
            "type": "WordPiece",
            "continuing_subword_prefix": "##",
            "vocab": {"[PAD]": 0, "[CLS]": 1, "play": 2, "##ing": 3, "[unused0]": 4},
        },
        "added_tokens": [
            {"id": 0, "content": "[PAD]", "special": True},
            {"id": 1, "content": "[CLS]", "special": True},
        ],
    }
    tokens, types = _converter().wordpiece_vocab(tokenizer)
    assert tokens == ["[PAD]", "[CLS]", "\u2581play", "ing", "\u2581[unused0]"]
    assert types == [TokenType.CONTROL] * 2 + [TokenType.NORMAL] * 3
