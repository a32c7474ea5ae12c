"""End to end: the official openai SDK's embeddings.create against a real server, on the real
all-MiniLM-L6-v2 served as MLX and as GGUF (converted by scripts/make_embedding_models.py).

Loading one embedding model just in time evicts the other (LM Studio's auto-evict), so the
per-model tests share a module-scoped ``model`` fixture: pytest runs them grouped by model."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest
from tokenizers import Tokenizer

from tests.conftest import EMBED_GGUF_KEY, EMBED_MLX_KEY, MLX_KEY

MODELS = [EMBED_MLX_KEY, EMBED_GGUF_KEY]
CAT, KITTEN, REVENUE = (
    "A cat sits on the mat",
    "A kitten rests on a rug",
    "Quarterly revenue grew by eight percent",
)
TEXTS = [
    CAT,
    KITTEN,
    REVENUE,
    "Héllo, WORLD! Naïve café owners in 東京 don't sell 12,345.67 croissants.",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "tabs\tand\nnewlines   and emoji 😀 and [brackets] and a lone [SEP] marker",
    " leading and trailing spaces ",
]
LONG = " ".join(f"word{i} and another thought about item {i}." for i in range(120))


@pytest.fixture(scope="module")
def client(server, embedding_models):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(embedding_models) -> Tokenizer:
    tok = Tokenizer.from_file(str(embedding_models["mlx"] / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


def vectors(client, model, inputs, **kw) -> np.ndarray:
    r = client.embeddings.create(model=model, input=inputs, **kw)
    assert [d.index for d in r.data] == list(range(len(r.data)))
    return np.array([d.embedding for d in r.data], np.float64)


@pytest.fixture(scope="module", params=MODELS)
def model(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def embedded(client) -> dict[str, np.ndarray]:
    return {m: vectors(client, m, TEXTS, encoding_format="float") for m in MODELS}


def test_listed(client, server, embedding_models):
    ids = {m.id for m in client.models.list()}
    assert set(MODELS) <= ids
    # LM Studio's lists carry the type: "embedding" in v1, "embeddings" in legacy v0.
    v1 = {m["key"]: m for m in httpx.get(server.url + "/api/v1/models").json()["models"]}
    v0 = {m["id"]: m for m in httpx.get(server.url + "/api/v0/models").json()["data"]}
    for model in MODELS:
        assert v1[model]["type"] == "embedding" and v0[model]["type"] == "embeddings"
    assert v1[MLX_KEY]["type"] == "llm" and v0[MLX_KEY]["type"] == "llm"
    assert {v1[m]["format"] for m in MODELS} == {"mlx", "gguf"}


def test_semantics_dims_and_norm(embedded, model):
    v = embedded[model]
    assert v.shape == (len(TEXTS), 384)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    cat, kitten, revenue = v[0], v[1], v[2]
    assert cat @ kitten > cat @ revenue + 0.3
    assert cat @ kitten > 0.5 and abs(cat @ revenue) < 0.2


def test_mlx_and_gguf_agree(embedded):
    cosines = np.sum(embedded[EMBED_MLX_KEY] * embedded[EMBED_GGUF_KEY], axis=1)
    assert cosines.min() >= 0.999, cosines


def test_response_shape_usage_and_base64(client, embedded, tokenizer, model):
    r = client.embeddings.create(model=model, input=TEXTS[:2], encoding_format="float")
    assert r.object == "list" and r.model == model
    assert [d.object for d in r.data] == ["embedding", "embedding"]
    n_tokens = sum(len(tokenizer.encode(t).ids) for t in TEXTS[:2])  # with [CLS] and [SEP]
    assert r.usage.prompt_tokens == r.usage.total_tokens == n_tokens
    # The SDK asks for base64 by default and decodes it: the same float32 values.
    default = vectors(client, model, TEXTS)
    assert np.array_equal(default, embedded[model])
    # base64 is the little-endian float32 bytes of what "float" sends.
    url = str(client.base_url) + "embeddings"
    body = {"model": model, "input": TEXTS[:2]}
    floats = httpx.post(url, json={**body, "encoding_format": "float"}).json()["data"]
    packed = httpx.post(url, json={**body, "encoding_format": "base64"}).json()["data"]
    for f, b in zip(floats, packed, strict=True):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), "<f4")
        assert np.array_equal(decoded, np.array(f["embedding"], np.float32))


def test_batched_equals_one_by_one(client, embedded, model):
    singles = np.stack([vectors(client, model, t, encoding_format="float")[0] for t in TEXTS])
    assert np.sum(singles * embedded[model], axis=1).min() > 0.99999


def test_token_arrays(client, embedded, tokenizer, model):
    plain = [tokenizer.encode(t, add_special_tokens=False).ids for t in TEXTS[:3]]
    full = [tokenizer.encode(t).ids for t in TEXTS[:3]]
    for inputs in (plain, full):
        v = vectors(client, model, inputs, encoding_format="float")
        assert np.sum(v * embedded[model][:3], axis=1).min() > 0.99999
    one = vectors(client, model, plain[0], encoding_format="float")  # a single token array
    assert one.shape == (1, 384) and one[0] @ embedded[model][0] > 0.99999


def test_over_long_input_is_refused_or_truncated(client, tokenizer):
    ids = tokenizer.encode(LONG).ids
    assert len(ids) > 512
    head = ids[:511] + ids[-1:]  # what truncation keeps: the first tokens, then [SEP]
    cut = {}
    for model in MODELS:
        with pytest.raises(openai.BadRequestError) as exc:
            client.embeddings.create(model=model, input=["short", LONG])
        err = exc.value.body
        assert err["code"] == "context_length_exceeded" and err["param"] == "input[1]"
        assert "512" in err["message"] and str(len(ids)) in err["message"]
        r = client.embeddings.create(
            model=model, input=LONG, encoding_format="float", extra_body={"truncate": True}
        )
        assert r.usage.prompt_tokens == 512
        cut[model] = np.array(r.data[0].embedding)
        explicit = vectors(client, model, head, encoding_format="float")[0]
        assert cut[model] @ explicit > 0.99999
    assert cut[EMBED_MLX_KEY] @ cut[EMBED_GGUF_KEY] >= 0.999


def test_dimensions(client, model):
    assert vectors(client, model, CAT, dimensions=384).shape == (1, 384)
    for dims, text in ((1000, "at most 384"), (128, "does not support reduced dimensions")):
        with pytest.raises(openai.BadRequestError) as exc:
            client.embeddings.create(model=model, input=CAT, dimensions=dims)
        assert exc.value.body["param"] == "dimensions" and text in exc.value.body["message"]


def test_bad_token_ids(client, model):
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model=model, input=[[101, 2000], [101, 30522]])
    assert exc.value.body["param"] == "input[1]" and "0 to 30521" in exc.value.body["message"]


def test_wrong_model_type(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(
            model=EMBED_MLX_KEY, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
    assert exc.value.body["param"] == "model" and "embedding model" in exc.value.body["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=EMBED_GGUF_KEY, prompt="hi", max_tokens=4)
    assert exc.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model=MLX_KEY, input="hi")
    assert exc.value.body["param"] == "model" and "not an embedding model" in str(exc.value)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="mlxserve-test/no-such-model", input="hi")


def test_lm_studio_v0_route(server, embedded):
    r = httpx.post(
        server.url + "/api/v0/embeddings", json={"model": EMBED_GGUF_KEY, "input": [CAT]}
    )
    assert r.status_code == 200, r.text
    v = np.array(r.json()["data"][0]["embedding"])
    assert v @ embedded[EMBED_GGUF_KEY][0] > 0.99999


def test_health_lists_the_embedding_instance(client, server):
    vectors(client, EMBED_GGUF_KEY, CAT)
    loaded = {i["id"]: i for i in server.health()["loaded"]}
    assert loaded[EMBED_GGUF_KEY]["type"] == "embedding"
    assert loaded[EMBED_GGUF_KEY]["pending"] == 0
