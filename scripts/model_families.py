"""Tiny random-weight test models of real model families (used by make_test_models.py).

A family model is the tiny Qwen2 of make_test_models.py (same architecture, same seeded
weights, the Qwen2 byte-level BPE vocabulary) with a real family's chat template, taken
from llama.cpp's collection in the llama-cpp-python sdist
(``vendor/llama.cpp/models/templates/*.jinja``), and that family's control tokens put into
the vocabulary's unused ``[PAD...]`` slots, so the vocabulary size, and therefore the
weights, stay the same. Both formats declare the same bos/eos/end-of-turn tokens (config,
generation_config and tokenizer_config on the MLX side; eos/eot/eom ids on the GGUF side),
so greedy ids and stops agree across formats.

What is not the real model: the ids of the family tokens, the base vocabulary (Qwen2's for
every family), and bos is never added by the tokenizer (add_bos false on both formats): the
templates that want a bos write ``bos_token`` themselves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np


class Family(NamedTuple):  # NamedTuple, not dataclass: importable by file path
    """One family: its template file and the tokens its template and output use."""

    template: str  # file name under vendor/llama.cpp/models/templates/
    special: tuple[str, ...]  # control tokens: special in tokenizer.json, CONTROL in GGUF
    eos: str
    bos: str | None = None  # None: the family has no bos (tokenizer_config bos_token null)
    # Tokens that end generation besides eos (generation_config eos_token_id; GGUF eot/eom).
    eog: tuple[str, ...] = ()
    # Added tokens that are plain text in the real tokenizer (Qwen's <think>, <tool_call>):
    # non-special added tokens in tokenizer.json, USER_DEFINED in GGUF.
    added: tuple[str, ...] = ()
    pad: str | None = None
    # Base-vocabulary tokens that llama.cpp does not treat as end of generation for this
    # family (it drops "</s>" where "<|tool_response>" exists, for Gemma 4).
    not_eog: tuple[str, ...] = ()
    # Special tokens that swallow the whitespace after them. llama.cpp sets this on every
    # control token of a model named phi-3 (and so does Phi-3's own tokenizer.json).
    rstrip: tuple[str, ...] = ()


_QWEN_TEXT = (
    "<tool_call>",
    "</tool_call>",
    "<think>",
    "</think>",
    "<tool_response>",
    "</tool_response>",
)
_CHATML = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
_GLM = (
    "[gMASK]",
    "<sop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|endoftext|>",
)
_GLM_TEXT = (
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
    "<tool_response>",
    "</tool_response>",
)
_DEEPSEEK = (
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>",
    "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
)
_MISTRAL = (
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[TOOL_CALLS]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[ARGS]",
    "[CALL_ID]",
    "[TOOL_CONTENT]",
    "[IMG]",
)
_LLAMA3 = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
)
_LLAMA3_EOG = ("<|end_of_text|>", "<|eom_id|>")


def _llama3(template: str) -> Family:
    return Family(template, _LLAMA3, "<|eot_id|>", "<|begin_of_text|>", _LLAMA3_EOG)


def _mistral(template: str, *more: str) -> Family:
    return Family(template, _MISTRAL + more, "</s>", "<s>")


# Keyed by the model name's suffix: the models are mlxserve-test/tiny-<key>-mlx and -gguf.
FAMILIES: dict[str, Family] = {
    "gpt-oss": Family(
        "openai-gpt-oss-120b.jinja",
        (
            "<|startoftext|>",
            "<|endoftext|>",
            "<|start|>",
            "<|end|>",
            "<|message|>",
            "<|channel|>",
            "<|constrain|>",
            "<|return|>",
            "<|call|>",
        ),
        "<|return|>",
        "<|startoftext|>",
        ("<|call|>", "<|endoftext|>"),
    ),
    "qwen3": Family(
        "Qwen-Qwen3-0.6B.jinja",
        _CHATML,
        "<|im_end|>",
        None,
        ("<|endoftext|>",),
        _QWEN_TEXT,
        "<|endoftext|>",
    ),
    "qwen3-coder": Family(
        "Qwen3-Coder.jinja",
        _CHATML,
        "<|im_end|>",
        None,
        ("<|endoftext|>",),
        _QWEN_TEXT,
        "<|endoftext|>",
    ),
    "qwen3.5": Family(
        "Qwen3.5-4B.jinja",
        _CHATML + ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
        "<|im_end|>",
        None,
        ("<|endoftext|>",),
        _QWEN_TEXT,
        "<|endoftext|>",
    ),
    "glm-4.6": Family(
        "GLM-4.6.jinja", _GLM, "<|endoftext|>", None, ("<|user|>", "<|observation|>"), _GLM_TEXT
    ),
    "glm-4.7": Family(
        "GLM-4.7-Flash.jinja",
        _GLM,
        "<|endoftext|>",
        None,
        ("<|user|>", "<|observation|>"),
        _GLM_TEXT,
    ),
    "deepseek-v3.1": Family(
        "deepseek-ai-DeepSeek-V3.1.jinja",
        _DEEPSEEK,
        "<｜end▁of▁sentence｜>",
        "<｜begin▁of▁sentence｜>",
        (),
        ("<think>", "</think>"),
    ),
    "deepseek-r1": Family(
        "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
        _DEEPSEEK,
        "<｜end▁of▁sentence｜>",
        "<｜begin▁of▁sentence｜>",
        (),
        ("<think>", "</think>"),
    ),
    "mistral-small-3.2": _mistral("Mistral-Small-3.2-24B-Instruct-2506.jinja"),
    "ministral-reasoning": _mistral(
        "mistralai-Ministral-3-14B-Reasoning-2512.jinja", "[THINK]", "[/THINK]"
    ),
    "devstral": _mistral("unsloth-mistral-Devstral-Small-2507.jinja"),
    "gemma4": Family(
        "google-gemma-4-31B-it.jinja",
        (
            "<bos>",
            "<eos>",
            "<pad>",
            "<|turn>",
            "<turn|>",
            "<|tool>",
            "<tool|>",
            "<|tool_call>",
            "<tool_call|>",
            "<|tool_response>",
            "<tool_response|>",
            "<|channel>",
            "<channel|>",
            "<|think|>",
            '<|"|>',
            "<|image|>",
            "<|audio|>",
            "<|video|>",
        ),
        "<eos>",
        "<bos>",
        ("<turn|>", "<|tool_response>"),
        (),
        "<pad>",
        ("</s>",),
    ),
    # Gemma 3's own template is not in the sdist; Gemma 2's is the same plain
    # <start_of_turn> format without tools (and it refuses a system message).
    "gemma2": Family(
        "google-gemma-2-2b-it.jinja",
        ("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"),
        "<eos>",
        "<bos>",
        ("<end_of_turn>",),
        (),
        "<pad>",
    ),
    "llama3.1": _llama3("meta-llama-Llama-3.1-8B-Instruct.jinja"),
    "llama3.2": _llama3("meta-llama-Llama-3.2-3B-Instruct.jinja"),
    "llama3.3": _llama3("meta-llama-Llama-3.3-70B-Instruct.jinja"),
    "kimi-k2": Family(
        "moonshotai-Kimi-K2.jinja",
        (
            "[BOS]",
            "[EOS]",
            "<|im_end|>",
            "<|im_user|>",
            "<|im_assistant|>",
            "<|im_system|>",
            "<|im_middle|>",
            "<|tool_calls_section_begin|>",
            "<|tool_calls_section_end|>",
            "<|tool_call_begin|>",
            "<|tool_call_argument_begin|>",
            "<|tool_call_end|>",
            "<|media_start|>",
            "<|media_content|>",
            "<|media_end|>",
            "<|media_pad|>",
        ),
        "<|im_end|>",
        "[BOS]",
        ("[EOS]",),
    ),
    "minimax-m2": Family(
        "MiniMax-M2.jinja",
        ("]~!b[", "]~b]", "[e~["),
        "[e~[",
        "]~!b[",
        (),
        ("<think>", "</think>", "<minimax:tool_call>", "</minimax:tool_call>"),
    ),
    "granite-4.0": Family(
        "ibm-granite-granite-4.0.jinja",
        ("<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>"),
        "<|end_of_text|>",
        "<|end_of_text|>",
        (),
        ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"),
    ),
    "smollm3": Family(
        "HuggingFaceTB-SmolLM3-3B.jinja",
        ("<|im_start|>", "<|im_end|>"),
        "<|im_end|>",
        None,
        (),
        ("<think>", "</think>", "<tool_call>", "</tool_call>"),
    ),
    "lfm2": Family(
        "LFM2-8B-A1B.jinja",
        (
            "<|startoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|tool_list_start|>",
            "<|tool_list_end|>",
            "<|tool_call_start|>",
            "<|tool_call_end|>",
            "<|tool_response_start|>",
            "<|tool_response_end|>",
        ),
        "<|im_end|>",
        "<|startoftext|>",
    ),
    "phi-3.5": Family(
        "microsoft-Phi-3.5-mini-instruct.jinja",
        ("<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        "<|endoftext|>",
        "<s>",
        ("<|end|>",),
        rstrip=("</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    ),
}


def family_vocab(base: Any, family: Family, control: int, user_defined: int, normal: int) -> Any:
    """The base vocabulary with the family's tokens: existing texts are reused (and typed as
    the family needs), new ones take the [PAD...] slots in order."""
    tokens, types = list(base.tokens), list(base.token_types)
    slots = iter(
        i for i, t in enumerate(tokens) if types[i] == user_defined and t.startswith("[PAD")
    )
    index = {t: i for i, t in enumerate(tokens)}
    wanted = [(t, control) for t in family.special] + [(t, user_defined) for t in family.added]
    for text in (family.eos, family.bos, family.pad, *family.eog):
        if text is not None and text not in family.special + family.added:
            wanted.append((text, control))
    for text, kind in wanted:
        i = index.get(text)
        if i is None:
            i = next(slots)
            tokens[i] = text
            index[text] = i
        elif types[i] not in (normal, kind) and kind == user_defined:
            continue  # already a control token of the base vocabulary: keep it special
        types[i] = kind
    return type(base)(tokens, types, list(base.merges))


def eog_texts(family: Family, base_eog: tuple[str, ...], tokens: list[str]) -> list[str]:
    """Every token that ends generation: the family's, and the base vocabulary's own
    (llama.cpp treats <|im_end|>, <|endoftext|> and </s> as such by their text)."""
    out = [
        family.eos,
        *family.eog,
        *(t for t in base_eog if t in tokens and t not in family.not_eog),
    ]
    return list(dict.fromkeys(out))


def write_family_mlx(
    folder: Path,
    family: Family,
    weights: dict[str, np.ndarray],
    vocab: Any,
    tokenizer_json: str,
    template: str,
    config: dict[str, Any],
    base_eog: tuple[str, ...],
) -> None:
    from safetensors.numpy import save_file

    eog = [vocab.id_of(t) for t in eog_texts(family, base_eog, vocab.tokens)]
    bos = vocab.id_of(family.bos) if family.bos else None
    pad = vocab.id_of(family.pad) if family.pad else None

    def dump(name: str, data: Any) -> None:
        (folder / name).write_text(
            json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )

    dump("config.json", {**config, "bos_token_id": bos, "eos_token_id": eog})
    dump("generation_config.json", {"bos_token_id": bos, "eos_token_id": eog, "pad_token_id": pad})
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if family.rstrip:
        data = json.loads(tokenizer_json)
        for token in data["added_tokens"]:
            token["rstrip"] = token["rstrip"] or token["content"] in family.rstrip
        tokenizer_json = json.dumps(data, indent=2, ensure_ascii=False)
    (folder / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    dump(
        "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": False,
            "add_eos_token": False,
            "bos_token": family.bos,
            "eos_token": family.eos,
            "pad_token": family.pad,
            "unk_token": None,
            "chat_template": template,
            "clean_up_tokenization_spaces": False,
            "model_max_length": config["max_position_embeddings"],
            "split_special_tokens": False,
        },
    )


def add_family_tokens(writer: Any, family: Family, vocab: Any) -> None:
    """GGUF special-token ids: bos, eos, and the family's other end-of-turn tokens as eot
    and eom (llama.cpp ends generation on all three)."""
    if family.bos:
        writer.add_bos_token_id(vocab.id_of(family.bos))
    writer.add_eos_token_id(vocab.id_of(family.eos))
    if family.pad:
        writer.add_pad_token_id(vocab.id_of(family.pad))
    if len(family.eog) > 2:
        raise ValueError("GGUF has room for two end-of-turn ids besides eos")
    for add, text in zip(
        (writer.add_eot_token_id, writer.add_eom_token_id), family.eog, strict=False
    ):
        add(vocab.id_of(text))
    writer.add_add_bos_token(False)
