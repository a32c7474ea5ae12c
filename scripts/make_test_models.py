#!/usr/bin/env python
"""Generate tiny seeded-random Qwen2 chat models for tests, in MLX and GGUF formats.

Both formats hold the same float32 weights and the real Qwen2 vocabulary, so greedy
decoding with mlx-lm and with llama.cpp (with an f32 KV cache) gives the same token ids.
Layout (LM Studio):

    <out>/<publisher>/<name>-mlx/            config.json, model.safetensors, tokenizer files
    <out>/<publisher>/<name>-gguf/<name>-f32.gguf

The vocabulary comes from ggml-vocab-qwen2.gguf, shipped in the llama-cpp-python
source distribution (fetched with pip, cached under <repo>/.cache/vocab/).
Output is deterministic and the run is idempotent: existing, stamped outputs are kept.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

GENERATOR_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB_FILE = "ggml-vocab-qwen2.gguf"
DEFAULT_VOCAB_DIR = REPO_ROOT / ".cache" / "vocab"
# llama.cpp's collection of real chat templates, from the same sdist as the vocabulary.
TEMPLATES_DIR = "templates"
_SDIST_TEMPLATES = "vendor/llama.cpp/models/templates/"
STAMP_FILE = ".mlxserve-test-model.json"
_FAMILIES_FILE = Path(__file__).resolve().with_name("model_families.py")
# Stamped into the outputs, so that any change to these scripts regenerates them.
_SOURCE_SHA256 = hashlib.sha256(
    Path(__file__).read_bytes() + _FAMILIES_FILE.read_bytes()
).hexdigest()
FORMATS = ("mlx", "gguf")

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2
CONTEXT, ROPE_THETA, RMS_EPS = 4096, 1_000_000.0, 1e-6
# Tokens of the Qwen2 vocabulary that llama.cpp treats as end of generation (by their text).
EOG_TEXTS = ("<|im_end|>", "<|endoftext|>", "</s>")
# A larger scale than the usual 0.02 init so that attention and MLP outputs are not
# negligible next to the embeddings: otherwise, with tied embeddings, the model just
# repeats its last input token and greedy-parity checks would prove little.
EMBED_STD, LINEAR_STD = 0.02, 0.15

# Qwen2 pre-tokenizer split; llama.cpp uses the same expression for tokenizer.ggml.pre=qwen2.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML with Qwen-2.5-style tools. Every tag trims whitespace and all text is emitted
# from expressions, so the result does not depend on trim_blocks/lstrip_blocks.
CHAT_TEMPLATE = r"""
{%- macro text(content) -%}
  {%- if content is string -%}{{- content -}}
  {%- elif content -%}
    {%- for part in content if part.type == 'text' -%}{{- part.text -}}{%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(start=0) -%}
{%- if messages and messages[0].role == 'system' -%}{%- set ns.start = 1 -%}{%- endif -%}
{%- if tools -%}
  {{- '<|im_start|>system\n' -}}
  {%- if ns.start -%}{{- text(messages[0].content) + '\n\n' -}}{%- endif -%}
  {{- '# Tools\n\nYou can use the functions below to help with the request. '
      'Their signatures are listed between <tools></tools> tags:\n<tools>' -}}
  {%- for tool in tools -%}{{- '\n' + (tool | tojson) -}}{%- endfor -%}
  {{- '\n</tools>\n\nTo use a function, answer with a JSON object holding its name and '
      'arguments between <tool_call></tool_call> tags, for example:\n<tool_call>\n'
      '{"name": <function-name>, "arguments": <arguments-as-json-object>}\n'
      '</tool_call><|im_end|>\n' -}}
{%- elif ns.start -%}
  {{- '<|im_start|>system\n' + text(messages[0].content) + '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages[ns.start:] -%}
  {%- if message.role == 'tool' -%}
    {%- if loop.first or loop.previtem.role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
    {{- '\n<tool_response>\n' + text(message.content) + '\n</tool_response>' -}}
    {%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
  {%- else -%}
    {%- set body = text(message.content) -%}
    {{- '<|im_start|>' + message.role + '\n' + body -}}
    {%- if message.role == 'assistant' and message.tool_calls -%}
      {%- for call in message.tool_calls -%}
        {%- set fn = call.function if call.function is defined else call -%}
        {%- if body or not loop.first -%}{{- '\n' -}}{%- endif -%}
        {{- '<tool_call>\n{"name": "' + fn.name + '", "arguments": ' -}}
        {%- if fn.arguments is string -%}{{- fn.arguments -}}
        {%- else -%}{{- fn.arguments | tojson -}}{%- endif -%}
        {{- '}\n</tool_call>' -}}
      {%- endfor -%}
    {%- endif -%}
    {{- '<|im_end|>\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
""".strip()

# The same template for a model that thinks first (DeepSeek-R1 / Qwen3 style): the generation
# prompt opens <think>, or gives an empty thinking block when enable_thinking is false.
THINKING_TEMPLATE = CHAT_TEMPLATE.replace(
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}",
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}{%- else -%}{{- '<think>\\n' -}}{%- endif -%}"
    "{%- endif -%}",
)
assert THINKING_TEMPLATE != CHAT_TEMPLATE
TEMPLATES = {"tools": CHAT_TEMPLATE, "thinking": THINKING_TEMPLATE}

# The server's registry reads this file (mlxserve.core.registry.DEMO_MARKER) to label a model.
DEMO_MARKER = "mlxserve-demo.json"
DEMO_PUBLISHER = "mlxserve"
DEMO_NAME = "demo-random-weights-qwen2"
DEMO_DESCRIPTION = (
    "DEMO model with RANDOM WEIGHTS (a tiny Qwen2 made by scripts/make_test_models.py): "
    "it answers at once, with gibberish. Add real models to the models directory."
)


class Vocab(NamedTuple):  # NamedTuple, not dataclass: importable by file path
    tokens: list[str]
    token_types: list[int]  # gguf.TokenType values
    merges: list[str]

    def id_of(self, token: str) -> int:
        return self.tokens.index(token)

    def eog_ids(self) -> list[int]:
        return [self.id_of(t) for t in EOG_TEXTS if t in self.tokens]


# ---------------------------------------------------------------- vocabulary


def _download_vocab(dest: Path) -> None:
    """Fetch the llama-cpp-python sdist matching the installed version (pip's cache
    makes repeats fast) and extract only the Qwen2 vocabulary from it."""
    _extract_from_sdist(
        lambda name: name.endswith(f"vendor/llama.cpp/models/{VOCAB_FILE}"), lambda name: dest
    )
    if not dest.is_file():
        raise RuntimeError(f"{VOCAB_FILE} not found in the llama-cpp-python sdist")


def _extract_from_sdist(wanted: Any, dest_of: Any) -> None:
    """Extract the sdist members whose name ``wanted(name)`` accepts to ``dest_of(name)``."""
    try:
        version = metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        raise RuntimeError(f"no llama-cpp-python installed; pass --vocab {VOCAB_FILE}") from None
    with tempfile.TemporaryDirectory() as tmp:
        # --no-binary only for this package: build requirements may stay wheels.
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            "llama-cpp-python",
            f"llama-cpp-python=={version}",
            "-d",
            tmp,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            raise RuntimeError(f"pip download failed:\n{proc.stdout}\n{proc.stderr}")
        with tarfile.open(sdists[0]) as tar:
            for member in tar:
                if member.isfile() and wanted(member.name):
                    dest = dest_of(member.name)
                    src = tar.extractfile(member)
                    assert src is not None
                    part = dest.with_name(f"{dest.name}.part{os.getpid()}")
                    with src, open(part, "wb") as out:
                        shutil.copyfileobj(src, out)
                    os.replace(part, dest)


def find_template(name: str, cache_dir: Path = DEFAULT_VOCAB_DIR) -> Path:
    """A chat template of llama.cpp's collection (all of them are extracted once)."""
    folder = cache_dir / TEMPLATES_DIR
    if not (folder / name).is_file():
        folder.mkdir(parents=True, exist_ok=True)
        _extract_from_sdist(
            lambda member: _SDIST_TEMPLATES in member and member.endswith(".jinja"),
            lambda member: folder / member.rsplit("/", 1)[1],
        )
    if not (folder / name).is_file():
        raise FileNotFoundError(f"no template {name} in the llama-cpp-python sdist")
    return folder / name


def find_vocab(vocab: Path | None = None, cache_dir: Path = DEFAULT_VOCAB_DIR) -> Path:
    if vocab is not None:
        if not vocab.is_file():
            raise FileNotFoundError(f"no vocabulary file at {vocab}")
        return vocab
    cached = cache_dir / VOCAB_FILE
    if cached.is_file():
        return cached
    spec = importlib.util.find_spec("llama_cpp")  # some builds ship the vendored models
    for location in (spec.submodule_search_locations or []) if spec else []:
        found = next(Path(location).rglob(VOCAB_FILE), None)
        if found is not None:
            return found
    cache_dir.mkdir(parents=True, exist_ok=True)
    _download_vocab(cached)
    return cached


@functools.lru_cache(maxsize=2)  # GGUFReader takes seconds on 150k strings; tests generate often
def _read_vocab_cached(path: Path, mtime_ns: int) -> Vocab:
    from gguf import GGUFReader, TokenType

    fields = GGUFReader(path).fields
    tokens = list(fields["tokenizer.ggml.tokens"].contents())
    types = [int(t) for t in fields["tokenizer.ggml.token_type"].contents()]
    # llama.cpp makes an ordinary "</s>" token (Qwen2 has one) a control, end-of-generation
    # token whatever the file says. Declare it so here, and make it special and an eos
    # token on the Hugging Face side too, so that both engines tokenize and stop alike.
    for i in (i for i, t in enumerate(tokens) if t in EOG_TEXTS):
        types[i] = TokenType.CONTROL
    return Vocab(tokens, types, list(fields["tokenizer.ggml.merges"].contents()))


def read_vocab(path: Path) -> Vocab:
    path = path.resolve()
    return _read_vocab_cached(path, path.stat().st_mtime_ns)


def build_tokenizer_json(vocab: Vocab) -> str:
    """A byte-level BPE tokenizer.json equivalent to llama.cpp's gpt2/qwen2 tokenizer."""
    from gguf import TokenType
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
    from tokenizers import pre_tokenizers as pre

    # The BPE model holds every token up to the last NORMAL one; the rest are added tokens.
    n_base = 1 + max(i for i, t in enumerate(vocab.token_types) if t == TokenType.NORMAL)
    tok = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(vocab.tokens[:n_base])},
            merges=[tuple(m.split(" ")) for m in vocab.merges],  # type: ignore[misc]
            unk_token=None,
            fuse_unk=False,
            byte_fallback=False,
            continuing_subword_prefix="",
            end_of_word_suffix="",
        )
    )
    # NFC as in Qwen2's own tokenizer (transformers' Qwen2Tokenizer forces it anyway).
    # llama.cpp does not normalize, so only NFC text tokenizes identically in both.
    tok.pre_tokenizer = pre.Sequence(
        [
            pre.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # New added tokens get consecutive ids, so add them one by one in id order. CONTROL
    # tokens are special; USER_DEFINED ones ([PAD...]) are plain text in llama.cpp.
    extra = [i for i, t in enumerate(vocab.token_types) if t != TokenType.NORMAL]
    for i in extra:
        special = vocab.token_types[i] == TokenType.CONTROL
        added = AddedToken(vocab.tokens[i], special=special, normalized=False)
        if special:
            tok.add_special_tokens([added])
        else:
            tok.add_tokens([added])
        assert tok.token_to_id(vocab.tokens[i]) == i
    return tok.to_str(pretty=True)


# ---------------------------------------------------------------- weights


def make_weights(seed: int, n_vocab: int) -> dict[str, np.ndarray]:
    """Qwen2 weights under Hugging Face names, drawn in a fixed order."""
    rng = np.random.default_rng(seed)

    def normal(std: float, *shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)

    head_dim = HIDDEN // HEADS
    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": normal(EMBED_STD, n_vocab, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj, heads in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
            rows = heads * head_dim
            w[f"{p}self_attn.{proj}_proj.weight"] = normal(LINEAR_STD, rows, HIDDEN)
            w[f"{p}self_attn.{proj}_proj.bias"] = normal(LINEAR_STD, rows)
        w[f"{p}self_attn.o_proj.weight"] = normal(LINEAR_STD, HIDDEN, HEADS * head_dim)
        w[f"{p}mlp.gate_proj.weight"] = normal(LINEAR_STD, INTERMEDIATE, HIDDEN)
        w[f"{p}mlp.up_proj.weight"] = normal(LINEAR_STD, INTERMEDIATE, HIDDEN)
        w[f"{p}mlp.down_proj.weight"] = normal(LINEAR_STD, HIDDEN, INTERMEDIATE)
        w[f"{p}input_layernorm.weight"] = np.ones(HIDDEN, np.float32)
        w[f"{p}post_attention_layernorm.weight"] = np.ones(HIDDEN, np.float32)
    w["model.norm.weight"] = np.ones(HIDDEN, np.float32)
    return w


# For agent tests: an embedding dimension no layer writes to (its o_proj and down_proj rows are
# zero) holds 1.0 for every token and more for <|im_end|>, so the final state always leans
# towards ending the turn: at temperature 0.8 about one token in eight ends it.
TURN_END_DIM, TURN_END_LEAD = 0, 24.0


def end_turns_early(weights: dict[str, np.ndarray], eos_id: int) -> None:
    """Make the model end its replies by itself after a few tokens (in place)."""
    embed = weights["model.embed_tokens.weight"]
    embed[:, TURN_END_DIM] = 1.0
    embed[eos_id, TURN_END_DIM] = 1.0 + TURN_END_LEAD
    for i in range(LAYERS):
        weights[f"model.layers.{i}.self_attn.o_proj.weight"][TURN_END_DIM, :] = 0.0
        weights[f"model.layers.{i}.mlp.down_proj.weight"][TURN_END_DIM, :] = 0.0


def gguf_name(hf_name: str) -> str:
    # Qwen2 uses NEOX-style rope, which is HF's layout: no q/k permutation as for llama.
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    parts = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{parts[module]}.{kind}"


# ---------------------------------------------------------------- writers


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def model_config(n_vocab: int, bos: Any, eos: Any, context: int = CONTEXT) -> dict[str, Any]:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": context,
        "rope_theta": ROPE_THETA,
        "rms_norm_eps": RMS_EPS,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "vocab_size": n_vocab,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "initializer_range": LINEAR_STD,
    }


def write_mlx(
    folder: Path,
    weights: dict[str, np.ndarray],
    vocab: Vocab,
    tokenizer_json: str,
    template: str = CHAT_TEMPLATE,
    context: int = CONTEXT,
) -> None:
    from safetensors.numpy import save_file

    eot, im_end = vocab.id_of("<|endoftext|>"), vocab.id_of("<|im_end|>")
    _write_json(folder / "config.json", model_config(len(vocab.tokens), eot, im_end, context))
    _write_json(
        folder / "generation_config.json",
        {
            "bos_token_id": eot,
            "eos_token_id": vocab.eog_ids(),
            "pad_token_id": eot,
        },
    )
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    _write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "Qwen2Tokenizer",
            "add_bos_token": False,
            "add_prefix_space": False,
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "chat_template": template,
            "clean_up_tokenization_spaces": False,
            "errors": "replace",
            "model_max_length": context,
            "split_special_tokens": False,
        },
    )


def write_gguf(
    path: Path,
    weights: dict[str, np.ndarray],
    vocab: Vocab,
    name: str,
    template: str = CHAT_TEMPLATE,
    family: Any = None,
    context: int = CONTEXT,
) -> None:
    """``family``: a model_families.Family whose special-token ids replace Qwen2's."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="qwen2")
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(context)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    add_tokenizer(writer, vocab, template, family)
    for hf_name, array in weights.items():  # tied embeddings: no output.weight
        writer.add_tensor(gguf_name(hf_name), array)
    finish_gguf(writer)


def add_tokenizer(writer: Any, vocab: Vocab, template: str, family: Any = None) -> None:
    """The Qwen2 vocabulary, its special tokens (or ``family``'s) and the chat ``template``
    into a GGUF writer's header: every generated chat model's tokenizer."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    if family is not None:
        _families().add_family_tokens(writer, family, vocab)
    else:
        # Without an explicit id llama.cpp would take token 11 as BOS for gpt2 vocabularies;
        # <|endoftext|> is what converted Qwen2 GGUFs use, and it is never added.
        writer.add_bos_token_id(vocab.id_of("<|endoftext|>"))
        writer.add_eos_token_id(vocab.id_of("<|im_end|>"))
        writer.add_pad_token_id(vocab.id_of("<|endoftext|>"))
        writer.add_add_bos_token(False)
    writer.add_chat_template(template)


def finish_gguf(writer: Any) -> None:
    """Write a GGUF writer's header, metadata and tensors, and close its file."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---------------------------------------------------------------- driver


@functools.lru_cache(maxsize=1)
def _families() -> Any:
    """scripts/model_families.py, loaded by path (this script is itself loaded so)."""
    spec = importlib.util.spec_from_file_location("model_families", _FAMILIES_FILE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stamp(fmt: str, name: str, seed: int, folder: Path, variant: dict[str, Any]) -> dict[str, Any]:
    files = sorted(p for p in folder.iterdir() if p.name != STAMP_FILE)
    return {
        "generator": "mlxserve make_test_models",
        "version": GENERATOR_VERSION,
        "source_sha256": _SOURCE_SHA256,
        "format": fmt,
        "name": name,
        "seed": seed,
        **variant,
        "files": {p.name: p.stat().st_size for p in files},
    }


def is_stamped(
    folder: Path, stamp: Callable[[Path], dict[str, Any]], stamp_file: str = STAMP_FILE
) -> bool:
    """Whether ``folder`` holds a finished model stamped ``stamp(folder)``: the same generator
    and inputs, and the same files at the same sizes."""
    try:
        found = json.loads((folder / stamp_file).read_text(encoding="utf-8"))
        return bool(found == stamp(folder) and found["files"])
    except (OSError, ValueError):
        return False


def build(
    target: Path,
    write: Callable[[Path], None],
    stamp: Callable[[Path], dict[str, Any]],
    stamp_file: str = STAMP_FILE,
) -> None:
    """``write(folder)`` a model into a temporary folder beside ``target``, stamp it, and
    publish it as ``target``; a concurrent run that published the same model first wins."""
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        write(tmp)
        _write_json(tmp / stamp_file, stamp(tmp))
        try:
            _publish(tmp, target)
        except OSError:
            if not is_stamped(target, stamp, stamp_file):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a publish


def _publish(tmp: Path, target: Path) -> None:
    """Replace target by the finished tmp folder; target never looks complete while partial."""
    umask = os.umask(0)
    os.umask(umask)
    for path in tmp.rglob("*"):  # mkdtemp and safetensors create owner-only modes
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
    tmp.chmod(0o777 & ~umask)
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".old-{target.name}-", dir=target.parent))
        os.rename(target, old / target.name)
        shutil.rmtree(old)
    os.rename(tmp, target)


def _remove_stale_temps(base: Path, name: str) -> None:
    """Drop temp folders left by killed runs (older than any live run can be)."""
    cutoff = time.time() - 600
    for path in base.glob(f".*-{name}-*"):
        if path.name.startswith((".tmp-", ".old-")) and path.stat().st_mtime < cutoff:
            shutil.rmtree(path, ignore_errors=True)


def generate(
    out_root: Path,
    publisher: str = "mlxserve-test",
    name: str = "tiny-qwen2",
    seed: int = 0,
    formats: Sequence[str] = FORMATS,
    vocab: Path | None = None,
    description: str | None = None,
    template: str = "tools",
    family: str | None = None,
    context: int = CONTEXT,
    ends_turns: bool = False,
) -> dict[str, Path]:
    """Write the models; return {"mlx": model folder, "gguf": .gguf file} for the formats asked.

    ``template`` picks the chat template: "tools" (ChatML with tools) or "thinking" (the
    same, opening a <think> block). ``family`` (a key of model_families.FAMILIES) instead
    gives the model that family's real template and special tokens. ``context`` is the
    context length the model declares (the weights are the same whatever it is);
    ``ends_turns`` makes it end its replies by itself after a few sampled tokens
    (:func:`end_turns_early`). A ``description`` is
    written to DEMO_MARKER in each folder: the server labels such a model with it (the demo
    models ``scripts/serve`` installs)."""
    fam = None
    if family is not None:
        families = _families().FAMILIES
        if family not in families:
            raise ValueError(f"unknown family {family!r}; known: {', '.join(families)}")
        fam = families[family]
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown formats: {sorted(unknown)}")
    base = Path(out_root) / publisher
    folders = {fmt: base / f"{name}-{fmt}" for fmt in FORMATS if fmt in formats}
    result = {fmt: (d / f"{name}-f32.gguf" if fmt == "gguf" else d) for fmt, d in folders.items()}
    variant = {"context": context, "ends_turns": ends_turns}

    def stamp_of(fmt: str) -> Callable[[Path], dict[str, Any]]:
        return functools.partial(_stamp, fmt, name, seed, variant=variant)

    todo = [fmt for fmt, d in folders.items() if not is_stamped(d, stamp_of(fmt))]
    if not todo:
        return result

    voc = read_vocab(find_vocab(vocab))
    chat_template = TEMPLATES[template]
    if fam is not None:
        from gguf import TokenType

        voc = _families().family_vocab(
            voc, fam, TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.NORMAL
        )
        chat_template = find_template(fam.template).read_text(encoding="utf-8")
    weights = make_weights(seed, len(voc.tokens))
    if ends_turns:
        end_turns_early(weights, voc.id_of("<|im_end|>"))
    base.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(base, name)

    def write(fmt: str, tmp: Path) -> None:
        if fmt == "mlx" and fam is not None:
            _families().write_family_mlx(
                tmp,
                fam,
                weights,
                voc,
                build_tokenizer_json(voc),
                chat_template,
                model_config(len(voc.tokens), None, None, context),
                EOG_TEXTS,
            )
        elif fmt == "mlx":
            write_mlx(tmp, weights, voc, build_tokenizer_json(voc), chat_template, context)
        else:
            write_gguf(tmp / f"{name}-f32.gguf", weights, voc, name, chat_template, fam, context)
        if description:
            _write_json(tmp / DEMO_MARKER, {"description": description})

    for fmt in todo:
        build(folders[fmt], functools.partial(write, fmt), stamp_of(fmt))
        print(f"wrote {fmt} model {result[fmt]}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="models root (LM Studio layout)")
    parser.add_argument("--publisher", default="mlxserve-test")
    parser.add_argument("--name", default="tiny-qwen2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated: mlx,gguf")
    parser.add_argument("--vocab", type=Path, default=None, help=f"an existing {VOCAB_FILE}")
    parser.add_argument(
        "--family",
        default=None,
        help="a model family (scripts/model_families.py), or 'all': the family's real chat "
        "template and special tokens; the model is named tiny-<family>",
    )
    parser.add_argument("--context", type=int, default=CONTEXT, help="declared context length")
    parser.add_argument(
        "--ends-turns", action="store_true", help="end replies by itself after a few tokens"
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help=f"write the labelled demo models {DEMO_PUBLISHER}/{DEMO_NAME}-mlx and -gguf",
    )
    args = parser.parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    publisher, name, description = args.publisher, args.name, None
    if args.demo:
        publisher, name, description = DEMO_PUBLISHER, DEMO_NAME, DEMO_DESCRIPTION
    try:
        if args.family:
            keys = list(_families().FAMILIES) if args.family == "all" else [args.family]
            for key in keys:
                generate(
                    args.out, publisher, f"tiny-{key}", args.seed, formats, args.vocab, family=key
                )
            return 0
        generate(
            args.out,
            publisher,
            name,
            args.seed,
            formats,
            args.vocab,
            description,
            context=args.context,
            ends_turns=args.ends_turns,
        )
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        parser.exit(1, f"error: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
