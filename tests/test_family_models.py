"""The family test models of scripts/model_families.py, checked with the real engines.

Every family: the MLX tokenizer (as mlx-lm loads it) and the GGUF vocabulary (as llama.cpp
loads it) agree on the family's special tokens (one id each, the same id), on bos and on
every end-of-generation id; the real template renders a tool-call history with tools, and
that prompt tokenizes identically on both formats. A few families also decode greedily on
both engines (the weights are the same for every family, so a few cover the rest).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from mlxserve.core.templates import ChatTemplate

FAMILY_KEYS = [
    "gpt-oss",
    "qwen3",
    "qwen3-coder",
    "qwen3.5",
    "glm-4.6",
    "glm-4.7",
    "deepseek-v3.1",
    "deepseek-r1",
    "mistral-small-3.2",
    "ministral-reasoning",
    "devstral",
    "gemma4",
    "gemma2",
    "llama3.1",
    "llama3.2",
    "llama3.3",
    "kimi-k2",
    "minimax-m2",
    "granite-4.0",
    "smollm3",
    "lfm2",
    "phi-3.5",
]
GREEDY_KEYS = ("gpt-oss", "phi-3.5")
# Templates that take no tools (Gemma's also refuses a system message and a tool role;
# the sdist's SmolLM3 template, an Unsloth edit, dropped its xml_tools): the server offers
# tools through its fallback prompt there.
PLAIN = {"gemma2", "phi-3.5", "smollm3"}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
CALL_ID = "call12345"  # Mistral's templates insist on nine characters
HISTORY: list[dict[str, Any]] = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": CALL_ID,
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": CALL_ID, "name": "get_weather", "content": "sunny, 21 C"},
]


def test_every_family_is_listed(make_models: ModuleType) -> None:
    assert sorted(make_models._families().FAMILIES) == sorted(FAMILY_KEYS)


def test_unknown_family_is_refused(make_models: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown family"):
        make_models.generate(tmp_path, name="x", family="no-such-family")


@pytest.fixture(scope="module")
def vocab_only() -> Any:
    import llama_cpp

    def load(path: Path) -> Any:
        return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)

    return load


def _gguf_eog(llm: Any) -> set[int]:
    import llama_cpp

    vocab = llm._model.vocab
    return {t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)}


@pytest.mark.parametrize("key", FAMILY_KEYS)
def test_family_tokens_and_template(
    key: str, family_models: Any, make_models: ModuleType, vocab_only: Any
) -> None:
    """Read with the tokenizers library and the JSON files (loading transformers' tokenizer
    per family costs seconds); test_family_greedy_parity loads some through mlx-lm."""
    import llama_cpp
    from tokenizers import Tokenizer

    family = make_models._families().FAMILIES[key]
    paths = family_models(key)
    folder = paths["mlx"]
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    gen_config = json.loads((folder / "generation_config.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    llm = vocab_only(paths["gguf"])

    added = {t.content: t for t in tok.get_added_tokens_decoder().values()}
    for token in family.special + family.added:
        ids = tok.encode(token, add_special_tokens=False).ids
        assert len(ids) == 1, (token, ids)
        assert llm.tokenize(token.encode(), add_bos=False, special=True) == ids, token
        # Control tokens are special; Qwen's <think> and kin are plain added text.
        assert added[token].special == (token in family.special), token

    # The same end-of-generation ids (llama.cpp also ends on eot/eom and on known texts).
    eog = _gguf_eog(llm)
    assert set(gen_config["eos_token_id"]) == set(config["eos_token_id"]) == eog
    assert tok_config["eos_token"] == family.eos
    assert llm.token_eos() == tok.token_to_id(family.eos)
    assert {tok.token_to_id(t) for t in (family.eos, *family.eog)} <= eog
    assert tok_config["bos_token"] == family.bos
    if family.bos:
        assert llm.token_bos() == tok.token_to_id(family.bos) == gen_config["bos_token_id"]
    assert not llama_cpp.llama_vocab_get_add_bos(llm._model.vocab)
    assert not tok_config["add_bos_token"]
    assert llm.metadata["tokenizer.chat_template"] == tok_config["chat_template"]
    assert config["vocab_size"] == llm.n_vocab() == tok.get_vocab_size()

    # The real template renders tools and a tool-call round, the same prompt on both formats.
    template = ChatTemplate(
        tok_config["chat_template"], bos_token=family.bos or "", eos_token=family.eos
    )
    if key in PLAIN:
        assert "tools" not in template.source
        prompt = template.render([HISTORY[1]])
    else:
        prompt = template.render([dict(m) for m in HISTORY], tools=TOOLS)
        assert "sunny, 21 C" in prompt and "get_weather" in prompt
    if family.bos and "{{ bos_token" in template.source.replace("{{-", "{{"):
        assert prompt.startswith(family.bos)
    ids = tok.encode(prompt, add_special_tokens=False).ids
    assert ids == llm.tokenize(prompt.encode(), add_bos=False, special=True)
    if not family.rstrip:  # rstrip tokens swallow the newline after them
        assert tok.decode(ids, skip_special_tokens=False) == prompt


@pytest.mark.parametrize("key", GREEDY_KEYS)
def test_family_greedy_parity(key: str, family_models: Any) -> None:
    import llama_cpp
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    paths = family_models(key)
    model, wrapper = load(str(paths["mlx"]))[:2]
    hf = wrapper._tokenizer
    llm = llama_cpp.Llama(
        model_path=str(paths["gguf"]),
        n_ctx=2048,
        verbose=False,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
    )
    assert set(wrapper.eos_token_ids) == _gguf_eog(llm)
    prompt = ChatTemplate(hf.chat_template, bos_token=hf.bos_token or "").render(
        [{"role": "user", "content": "Hello, who are you?"}]
    )
    ids = hf.encode(prompt, add_special_tokens=False)
    steps = generate_step(mx.array(ids), model, sampler=make_sampler(0.0), max_tokens=12)
    mlx_out = [int(token) for token, _ in steps]
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
    gguf_out: list[int] = []
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        gguf_out.append(token)
        if len(gguf_out) == len(mlx_out):
            break
    assert len(mlx_out) == 12 and mlx_out == gguf_out
