"""Prompt-cache entries spilled to disk: the file store (checksums, atomic writes, one LRU
budget for every model), each engine's round trip, and a real server whose chat's next turn
is served from disk after an unload and after a restart, with the reply of a cold run."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import openai
import pytest

from backends.base import CHECKPOINT_TAIL, LoadOptions
from backends.spill import SUFFIX, SpillStore, open_store
from tests.conftest import GGUF_KEY, MLX_KEY, Server
from tests.engine_harness import generate, load
from tests.test_kv_quant import engine as kvq_engine
from tests.test_kv_quant import paths  # noqa: F401 - the one-head model KV quantization needs
from tests.test_prompt_cache_hybrid import (
    CHAT,
    hybrid_models,  # noqa: F401 - its fixture
)
from tests.test_prompt_cache_hybrid import _open as open_hybrid

FORMATS = ["mlx", "gguf"]


def put(store: SpillStore, tokens: list[int], payload: bytes) -> None:
    store.put(tokens, {"n": len(tokens)}, lambda f: f.write(payload))
    store.flush()


def files(root: Path) -> list[Path]:
    return sorted(root.glob(f"*/*{SUFFIX}"))


def test_an_entry_survives_a_new_store_and_is_found_by_prefix(tmp_path):
    store = SpillStore(tmp_path, "model-a", 1 << 20)
    put(store, list(range(100)), b"kv" * 50)
    store.close()
    again = SpillStore(tmp_path, "model-a", 1 << 20)
    key, n = again.longest([*range(60), 7, 7])
    assert key == tuple(range(100)) and n == 60
    # The prompt's last token is never served: sampling needs its logits.
    assert again.longest(list(range(100)))[1] == 99
    got = again.read(key)
    assert got is not None and got[0] == {"n": 100} and bytes(got[1]) == b"kv" * 50
    assert again.longest([5, *range(99)]) == (None, 0)
    # Another model's folder is another index.
    assert len(SpillStore(tmp_path, "model-b", 1 << 20)) == 0
    again.close()


def test_a_longer_entry_replaces_the_prefix_it_covers_and_a_covered_one_is_not_written(
    tmp_path,
):
    store = SpillStore(tmp_path, "m", 1 << 20)
    put(store, list(range(40)), b"a")
    put(store, list(range(80)), b"b")
    assert len(store) == 1 and len(files(tmp_path)) == 1
    assert not store.wants(list(range(50)))
    put(store, list(range(50)), b"c")
    assert len(files(tmp_path)) == 1
    key, _ = store.longest(list(range(90)))
    got = store.read(key) if key else None
    assert got is not None and bytes(got[1]) == b"b"
    store.close()


@pytest.mark.parametrize("damage", ["flip", "truncate", "cut-header", "garbage"])
def test_a_damaged_file_is_a_miss_and_is_deleted(tmp_path, damage):
    store = SpillStore(tmp_path, "m", 1 << 20)
    put(store, list(range(64)), bytes(range(256)) * 4)
    (path,) = files(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "cut-header":
        data = data[:30]
    else:
        data = bytearray(b"not a cache file")
    path.write_bytes(bytes(data))
    if damage in ("flip", "truncate"):
        # The header still reads: the index finds it, the checksum turns it away.
        key, n = store.longest(list(range(70)))
        assert key is not None and n == 64
        assert store.read(key) is None
    else:
        # Files whose header cannot be read are dropped when the folder is indexed.
        store.close()
        store = SpillStore(tmp_path, "m", 1 << 20)
    assert store.longest(list(range(70))) == (None, 0)
    assert not path.exists()
    store.close()


def test_entries_that_cannot_be_cut_back_serve_only_prompts_holding_them_whole(tmp_path):
    store = SpillStore(tmp_path, "recurrent", 1 << 20, trimmable=False)
    put(store, list(range(40)), b"prompt checkpoint")
    put(store, list(range(80)), b"prompt and reply")
    # The longer entry does not replace the shorter: a recurrent state cannot be cut back.
    assert len(store) == 2
    assert store.longest([*range(60), 7, 7]) == ((*range(40),), 40)
    assert store.longest([*range(80), 7])[1] == 80
    assert store.longest([*range(30), 7]) == (None, 0)
    store.close()


def test_a_home_whose_spill_folder_cannot_be_made_serves_without_spilling(tmp_path, caplog):
    blocked = tmp_path / "prompt-cache"
    blocked.write_text("a file where the folder would be")
    options = LoadOptions(context_length=64, prompt_cache_dir=blocked, prompt_cache_disk_bytes=1)
    assert open_store(options, "model", [], {}) is None
    assert "spilling is off for model" in caplog.text
    off = LoadOptions(context_length=64, prompt_cache_dir=tmp_path, prompt_cache_disk_bytes=0)
    assert open_store(off, "model", [], {}) is None


def test_leftover_temporary_files_are_removed(tmp_path):
    (tmp_path / "m").mkdir()
    leftover = tmp_path / "m" / f"abc{SUFFIX}.tmp-1234abcd"
    leftover.write_bytes(b"half a file")
    SpillStore(tmp_path, "m", 1 << 20).close()
    assert not leftover.exists()


def test_the_budget_covers_every_model_and_drops_the_least_recently_used(tmp_path):
    payload = b"x" * 4000
    a = SpillStore(tmp_path, "model-a", 10_000)
    b = SpillStore(tmp_path, "model-b", 10_000)
    put(a, [1] * 20, payload)
    put(b, [2] * 20, payload)
    old = time.time() - 100
    for i, path in enumerate(files(tmp_path)):
        os.utime(path, (old + i, old + i))
    # A hit makes an entry the most recently used, across restarts too (the file's mtime).
    assert a.read((1,) * 20) is not None
    put(b, [3] * 20, payload)
    assert sum(p.stat().st_size for p in files(tmp_path)) <= 10_000
    assert b.longest([2] * 21) == (None, 0)
    assert a.longest([1] * 21)[1] == 20 and b.longest([3] * 21)[1] == 20
    # An entry larger than the whole budget is not kept.
    put(a, [4] * 20, b"y" * 20_000)
    assert a.longest([4] * 21) == (None, 0)
    a.close()
    b.close()


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_engine_reloads_its_spilled_prompt_cache(models_root, tmp_path, fmt):
    spill = {"prompt_cache_dir": tmp_path, "prompt_cache_disk_bytes": 1 << 30}
    engine = load(models_root, fmt, **spill)
    system = "<|im_start|>system\nYou are terse and exact.<|im_end|>\n" * 6
    one = engine.tokenize(system + "<|im_start|>user\nOne?<|im_end|>\n<|im_start|>assistant\n")
    two = engine.tokenize("<|im_start|>system\nAnother.<|im_end|>\n" * 6 + "Two?")
    three = engine.tokenize("<|im_start|>system\nThird.") * 5
    more = engine.tokenize("<|im_end|>\n<|im_start|>user\nMore")
    try:
        first = asyncio.run(generate(engine, one, 8))
        asyncio.run(generate(engine, two, 8))
    finally:
        engine.close()
    # Both conversations were written at the unload.
    assert len(files(tmp_path)) == 2
    following = one + first.tokens + more
    cold = load(models_root, fmt, prompt_cache_bytes=0)
    warm = load(models_root, fmt, **spill)
    try:
        reference = asyncio.run(generate(cold, following, 8))
        again = asyncio.run(generate(warm, following, 8))
    finally:
        cold.close()
        warm.close()
    assert again.cached >= len(one) and again.tokens == reference.tokens
    # A budget of one file and a bit: writing a third conversation drops the older files,
    # least recently used first, until the budget holds.
    budget = max(p.stat().st_size for p in files(tmp_path)) + 100
    small = load(models_root, fmt, prompt_cache_dir=tmp_path, prompt_cache_disk_bytes=budget)
    try:
        asyncio.run(generate(small, three, 4))
    finally:
        small.close()
    assert sum(p.stat().st_size for p in files(tmp_path)) <= budget
    reread = load(models_root, fmt, **spill)
    try:
        assert asyncio.run(generate(reread, [*two, 11], 2)).cached == 0
        assert asyncio.run(generate(reread, [*three, 11], 2)).cached >= len(three)
    finally:
        reread.close()


def test_quantized_mlx_entries_round_trip(paths, tmp_path):  # noqa: F811
    spill = {"prompt_cache_dir": tmp_path, "prompt_cache_disk_bytes": 1 << 30}
    engine = kvq_engine(paths, "mlx", kv_cache_bits=8, **spill)
    prompt = engine.tokenize("<|im_start|>system\nQuantized keys and values.<|im_end|>\n" * 5)
    try:
        first = asyncio.run(generate(engine, prompt, 6))
        # On the owner thread: it stores the entry after the stream has ended.
        entries = engine.call(lambda: engine._prompt_cache.entries()).result()
        memory = entries[0][1]
    finally:
        engine.close()
    # Another KV layout is another identity: the 8-bit entry is no use to a plain load.
    plain = kvq_engine(paths, "mlx", **spill)
    try:
        assert asyncio.run(generate(plain, prompt + first.tokens + [9], 2)).cached == 0
    finally:
        plain.close()
    again = kvq_engine(paths, "mlx", kv_cache_bits=8, **spill)
    try:
        following = prompt + first.tokens + [9]
        restored, n = again.call(lambda: again._spill.fetch(following, 0)).result()
        assert restored is not None and n == memory[0].offset
        for a, b in zip(memory, restored, strict=True):
            assert type(a) is type(b)
            for x, y in zip(a.keys, b.keys, strict=True):
                assert mx.array_equal(x, y).item()
    finally:
        again.close()


def chat(url: str, model: str, messages: list[Any]) -> tuple[str, int, int]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    assert r.usage is not None and r.usage.prompt_tokens_details is not None
    cached = r.usage.prompt_tokens_details.cached_tokens or 0
    return r.choices[0].message.content or "", r.usage.prompt_tokens, cached


def test_a_chat_resumes_from_disk_after_unload_and_restart(models_root, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "cold").mkdir()
    cold = Server(models_root, tmp_path / "cold", "--prompt-cache-bytes", "0")
    server = Server(models_root, home)
    try:
        history: dict[str, list[dict]] = {}
        # Each conversation's last prompt: the next turn reads at least that from disk.
        previous: dict[str, int] = {}
        for key in (MLX_KEY, GGUF_KEY):
            messages = [
                {"role": "system", "content": f"You explain {key} in detail. " * 12},
                {"role": "user", "content": "Where do we start?"},
            ]
            reply, prompt_tokens, _ = chat(server.url, key, messages)
            previous[key] = prompt_tokens
            messages += [
                {"role": "assistant", "content": reply},
                {"role": "user", "content": "And then?"},
            ]
            history[key] = messages
        env = {**os.environ, "MLXSERVE_HOME": str(home), "MLXSERVE_PORT": str(server.port)}
        subprocess.run(
            [sys.executable, "-m", "mlxserve", "unload", "--all"], env=env, check=True, timeout=60
        )
        for key, messages in history.items():
            reply, prompt_tokens, cached = chat(server.url, key, messages)
            assert previous[key] - 1 <= cached < prompt_tokens, (key, cached, previous[key])
            assert (reply, prompt_tokens, 0) == chat(cold.url, key, messages)
            previous[key] = prompt_tokens
            messages += [
                {"role": "assistant", "content": reply},
                {"role": "user", "content": "Why?"},
            ]
        server.stop()
        server = Server(models_root, home)
        for key, messages in history.items():
            reply, prompt_tokens, cached = chat(server.url, key, messages)
            assert previous[key] - 1 <= cached < prompt_tokens, (key, cached, previous[key])
            assert (reply, prompt_tokens, 0) == chat(cold.url, key, messages)
        server.stop()
        # Every file damaged: the prompt is computed again, and the server keeps serving.
        for path in files(home / "prompt-cache"):
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            path.write_bytes(bytes(data))
        server = Server(models_root, home)
        for key, messages in history.items():
            reply, prompt_tokens, cached = chat(server.url, key, messages)
            assert cached < prompt_tokens // 2
            assert (reply, prompt_tokens, 0) == chat(cold.url, key, messages)
        assert "checksum mismatch" in server.log_path.read_text()
    finally:
        server.stop()
        cold.stop()


@pytest.mark.parametrize(
    ("fmt", "name"),
    [
        ("gguf", "tiny-qwen35-hybrid"),
        ("mlx", "tiny-qwen35-hybrid"),
        ("mlx", "tiny-gemma3-sliding"),
    ],
)
def test_a_model_that_keeps_checkpoints_resumes_them_from_disk(hybrid_models, tmp_path, fmt, name):  # noqa: F811
    # Recurrent (Qwen3.5) and sliding-window (Gemma 3) layers cannot be cut back: the prompt's
    # checkpoint and the reply's are written at the unload, and after a restart each serves
    # the turn that holds it whole, with a cold run's reply.
    spill = {"prompt_cache_dir": tmp_path, "prompt_cache_disk_bytes": 1 << 30}
    warm = open_hybrid(hybrid_models, fmt, name, **spill)
    # Longer than the sliding window (32): the window has moved past the start.
    turn1 = warm.tokenize(CHAT.format("system", "You are terse. " * 12) + CHAT.format("user", "Hi"))
    turn1 += warm.tokenize("<|im_start|>assistant\n")
    tail = warm.tokenize("<|im_end|>\n" + CHAT.format("user", "And then?"))
    rewritten = turn1 + warm.tokenize("Something else.") + tail
    try:
        first = asyncio.run(generate(warm, turn1, 10))
    finally:
        warm.close()
    assert len(files(tmp_path)) == 2
    turn2 = turn1 + first.tokens + tail
    again = open_hybrid(hybrid_models, fmt, name, **spill)
    cold = open_hybrid(hybrid_models, fmt, name, prompt_cache_bytes=0)
    try:
        second = asyncio.run(generate(again, turn2, 10))
        branch = asyncio.run(generate(again, rewritten, 10))
        # The prompt's checkpoint is taken CHECKPOINT_TAIL tokens before its end. MLX reads
        # exactly the checkpoints; llama.cpp's reply ends before its last sampled token.
        if fmt == "mlx":
            assert second.cached == len(turn1) + len(first.tokens)
            assert branch.cached == len(turn1) - CHECKPOINT_TAIL
        else:
            assert second.cached >= len(turn1) + len(first.tokens) - 1
            assert branch.cached >= len(turn1) - CHECKPOINT_TAIL
        assert second.tokens == asyncio.run(generate(cold, turn2, 10)).tokens
        assert branch.tokens == asyncio.run(generate(cold, rewritten, 10)).tokens
    finally:
        again.close()
        cold.close()
