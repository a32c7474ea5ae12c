"""Changed-middle prompt-cache reuse on MLX (``cache_reuse``): runs of a cached prompt found
again past the first difference are moved to their new positions (keys re-rotated) and the
tokens between them are computed; ``cache_reuse=0`` keeps to exact prefix reuse."""

from __future__ import annotations

import asyncio
import random

import anthropic
import mlx.core as mx
import openai
import pytest
from mlx_lm import load as mlx_load
from mlx_lm.models.cache import KVCache, make_prompt_cache
from mlx_lm.models.rope_utils import DynamicNTKScalingRoPE, initialize_rope

from backends.mlx.kvquant import quantized_caches
from backends.mlx.prompt_cache import PromptCache, Run, align
from backends.mlx.splice import Splice, key_shifts, rope_shift
from tests.conftest import MLX_KEY
from tests.engine_harness import generate, load, onehead_models, weights


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 30000) for _ in range(n)]


A, X, Y, B, C = (tokens(n, s) for n, s in ((40, 1), (6, 2), (11, 3), (70, 4), (50, 5)))


def test_align_finds_moved_runs_and_skips_short_ones():
    old = A + X + B
    # A changed middle of another length: B moves by +5, and stops before the last token.
    assert align(old, A + Y + B, 40, 32, len(A + Y + B) - 1) == [Run(46, 51, 69)]
    # Text removed: B moves back.
    assert align(old, A + B + [7], 40, 32, len(A + B)) == [Run(46, 40, 70)]
    # Blocks reordered: each is found where it now is.
    assert align(A + B + C, A + C + B + [7], 40, 32, 160) == [Run(110, 40, 50), Run(40, 90, 70)]
    # Runs shorter than min_run stay to be computed.
    assert align(old, A + Y + B, 40, 80, len(A + Y + B) - 1) == []
    # Longer runs are found from windows hashed every min_run - 32 + 1 tokens of the cached
    # prompt, then extended back to where they start.
    assert align(old, A + Y + B, 40, 48, len(A + Y + B) - 1) == [Run(46, 51, 69)]
    # Repetitive text: one run, not one per repetition, at the shift that matches longest
    # (a window of it matches at every period's shift).
    assert align([1, 2, 3] * 100, [9] + [1, 2, 3] * 100, 0, 64, 301) == [Run(0, 1, 300)]
    r = tokens(35, 9)
    head, other = tokens(7, 10), tokens(12, 11)
    assert align(head + r * 10, other + r * 10 + [7], 0, 64, 362) == [Run(7, 12, 350)]


def fake_kv(n: int) -> list[KVCache]:
    c = KVCache()
    c.keys = c.values = mx.zeros((1, 1, n, 4))
    c.offset = n
    return [c]


def test_plan_moves_runs_only_when_they_serve_more_than_an_exact_prefix():
    store = PromptCache(1 << 20)
    store.store(A + B + X, fake_kv(116))  # shares A + B exactly
    store.store(Y + B, fake_kv(81))  # most recent: shares B, moved
    assert store.plan(A + B + C, 32) is None  # fetch's 110 exact tokens beat 70 moved
    store.store(C + X + B, fake_kv(126))
    reuse = store.plan(C + Y + B + [7], 32)  # 50 exact, then B moved: 120
    assert reuse is not None and reuse.prefix == 50 and reuse.runs == [Run(56, 61, 70)]
    assert store.plan(C + Y + B + [7], 100) is None


ROPES = [
    None,
    {"type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
]


@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("scaling", ROPES)
def test_rotating_a_cached_key_equals_the_key_at_the_new_position(scaling, traditional):
    rope = initialize_rope(16, 10000.0, traditional, scaling, 4096)
    shift = rope_shift(rope)
    assert shift is not None
    raw = mx.random.normal((1, 2, 9, 16), key=mx.random.key(0))
    cached = rope(raw, offset=30)
    for delta in (17, -11):
        assert mx.allclose(shift(cached, delta), rope(raw, offset=30 + delta), atol=1e-5)
    if scaling and scaling.get("rope_type") == "yarn":
        # YaRN scales its input: applying the rope again would scale the key twice.
        assert not mx.allclose(
            rope(cached.reshape(18, 1, 16), offset=17).reshape(cached.shape),
            rope(raw, offset=47),
            atol=1e-3,
        )


@pytest.fixture(scope="module")
def tiny(models_root):
    model, _ = mlx_load(str(weights(models_root, "mlx")))[:2]
    return model


@pytest.fixture(scope="module")
def onehead():
    # Heads of 64: KV-cache quantization needs groups of 32 or 64.
    model, _ = mlx_load(str(onehead_models()["mlx"]))[:2]
    return model


def test_models_with_an_unverified_rope_keep_to_prefix_reuse(tiny):
    assert key_shifts(tiny) is not None
    layer = tiny.layers[1].self_attn
    original = layer.rope
    layer.rope = DynamicNTKScalingRoPE(16, 4096, False, 10000.0, 2.0)
    try:
        assert key_shifts(tiny) is None
    finally:
        layer.rope = original


def cold_cache(model, prompt: list[int], quantized: bool = False) -> list:
    cache = quantized_caches(model, 32, 8) if quantized else make_prompt_cache(model)
    model(mx.array(prompt)[None], cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def layer0_keys(cache: list) -> mx.array:
    keys = cache[0].keys
    if isinstance(keys, tuple):
        packed, scales, biases = keys
        keys = mx.dequantize(
            packed, scales, biases, group_size=cache[0].group_size, bits=cache[0].bits
        )
    return keys[..., : cache[0].offset, :]


@pytest.mark.parametrize("quantized", [False, True])
def test_moved_keys_equal_a_cold_runs_at_their_new_positions(tiny, onehead, quantized):
    model = onehead if quantized else tiny
    old, new = A + X + B, A + Y + B + [7]
    store = PromptCache(1 << 30)
    store.store(old, cold_cache(model, old, quantized))
    reuse = store.plan(new, 32)
    assert reuse is not None and reuse.prefix == 40 and reuse.runs == [Run(46, 51, 70)]
    shifts = key_shifts(model)
    assert shifts is not None
    splice = Splice(new, reuse, shifts)
    chunks = 0
    while not splice.advance(model, 4):
        chunks += 1
    assert chunks == 3  # the 11 changed tokens, 4 at a time
    assert splice.filled == reuse.end == 121 and reuse.reused == 110
    # Layer 0's keys depend only on the token and its position: the rotated run equals what a
    # cold run computes at the new positions, the computed gap too.
    got = layer0_keys(splice.cache)
    want = layer0_keys(cold_cache(model, new[:121], quantized))
    # 8-bit keys are quantized twice on the moved path (once when first cached).
    tol = 0.05 if quantized else 1e-4
    assert mx.allclose(got, want, atol=tol * mx.abs(want).max().item()).item()
    # Without the rotation they would not be: this comparison can fail.
    unrotated = layer0_keys(cold_cache(model, old, quantized))[..., 46:116, :]
    assert not mx.allclose(unrotated, want[..., 51:121, :], atol=tol * 10).item()
    # Deeper layers' moved keys attended to the old text: approximate, not equal.
    assert splice.cache[1].offset == 121


def chat(text: str) -> str:
    return f"<|im_start|>system\n{text}<|im_end|>\n<|im_start|>user\nGo on.<|im_end|>\n"


BODY = "You review pull requests for the storage team and answer in short lists. " * 12


@pytest.fixture(scope="module")
def engines(models_root):
    reusing = load(models_root, "mlx", cache_reuse=32)
    exact = load(models_root, "mlx", cache_reuse=0)
    cold = load(models_root, "mlx", prompt_cache_bytes=0)
    yield reusing, exact, cold
    for e in (reusing, exact, cold):
        e.close()


def test_cache_reuse_zero_matches_a_cold_run_and_reuse_reports_what_it_skipped(engines):
    reusing, exact, cold = engines
    first = reusing.tokenize(chat(f"Date: Monday 1 June.\n{BODY}"))
    second = reusing.tokenize(chat(f"Date: Tuesday 2 June, a holiday.\n{BODY}"))
    prefix = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    # The changed line: the tokens between the shared prefix and the unchanged rest.
    same_tail = next(i for i in range(1, len(first)) if first[-i - 1] != second[-i - 1])
    changed = len(second) - prefix - same_tail

    async def run():
        out = {}
        for name, engine in (("reusing", reusing), ("exact", exact)):
            await generate(engine, first, 6)
            out[name] = await generate(engine, second, 6)
        out["cold"] = await generate(cold, second, 6)
        return out

    out = asyncio.run(run())
    assert out["exact"].cached == prefix
    assert out["exact"].tokens == out["cold"].tokens
    # Everything but the changed line and the last token (sampling needs its logits).
    assert out["reusing"].cached == len(second) - changed - 1
    assert out["reusing"].reason in ("stop", "length")


def test_concurrent_requests_beside_a_splice_equal_their_solo_outputs(engines):
    reusing, _, cold = engines
    first = reusing.tokenize(chat(f"Build 7.\n{BODY}"))
    second = reusing.tokenize(chat(f"Build 8, with the flaky test skipped.\n{BODY}"))
    others = [
        reusing.tokenize(chat(f"Question {i}: what does {w} mean?"))
        for i, w in enumerate(["idempotent", "quorum", "fsync"])
    ]

    async def run():
        await generate(reusing, first, 4)
        together = await asyncio.gather(
            generate(reusing, second, 8), *(generate(reusing, p, 8) for p in others)
        )
        solo = [await generate(cold, p, 8) for p in others]
        return together, solo

    together, solo = asyncio.run(run())
    assert together[0].cached > len(second) // 2
    assert [r.tokens for r in together[1:]] == [r.tokens for r in solo]


SERVER_BODY = (
    "You are the build assistant of a storage team. You read logs, point at the failing "
    "step and propose the smallest fix. Keep answers short and cite file names. "
) * 10


def test_changed_system_line_through_the_server(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)

    def ask(header: str):
        messages = [
            {"role": "system", "content": f"{header}\n{SERVER_BODY}"},
            {"role": "user", "content": "Why did the nightly build fail?"},
        ]
        return client.chat.completions.create(
            model=MLX_KEY, messages=messages, max_tokens=4, temperature=0
        ).usage

    ask("cwd: /srv/build  time: 05:31:02")
    usage = ask("cwd: /srv/build/nightly  time: 05:32:47  git: main@4f1c2e9")
    assert usage.prompt_tokens > 300
    cached = usage.prompt_tokens_details.cached_tokens
    # Not computed: all but the header line and the prompt's last token.
    assert usage.prompt_tokens - 40 <= cached <= usage.prompt_tokens - 10


def test_truncated_tool_result_through_the_server(server):
    client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    log = "\n".join(
        f"step {i}: compiled module storage/{i}.c in {i * 7 % 13} ms" for i in range(40)
    )
    later = "\n".join(f"test {i}: passed in {i * 3 % 11} ms" for i in range(40))
    tools = [
        {
            "name": "run",
            "description": "Run a shell command.",
            "input_schema": {"type": "object", "properties": {"cmd": {"type": "string"}}},
        }
    ]

    def turn(first_result: str):
        messages = [
            {"role": "user", "content": "Build it and run the tests."},
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "t1", "name": "run", "input": {"cmd": "make"}}
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "t1", "content": first_result}],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "t2", "name": "run", "input": {"cmd": "make test"}}
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "t2", "content": later}],
            },
        ]
        return client.messages.create(
            model=MLX_KEY, system=SERVER_BODY, messages=messages, tools=tools, max_tokens=4
        ).usage

    turn(log)
    # The client cut the first tool result in the middle of the history.
    usage = turn(log[: len(log) // 2] + "\n[... 20 lines cut ...]")
    read = usage.cache_read_input_tokens
    prompt = usage.input_tokens + read + usage.cache_creation_input_tokens
    assert prompt > 600
    # Computed: the cut marker and the prompt's last token (the rest moved back).
    assert 5 <= prompt - read <= 40
