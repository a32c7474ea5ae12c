"""The SDK's KV config stacks through their wire models: every key we read, the shapes the SDKs
send (checkboxes, unchecked meaning off; ``maxTokens: false``), and a value of the wrong shape
as an ``rpcError`` naming its key."""

from __future__ import annotations

import pytest

from mlxserve.protocols.sdk_config import LoadConfig, PredictionConfig, parse_parameter
from mlxserve.sdk.kvconfig import load_request, prediction
from mlxserve.sdk.transport import SdkError

P = "llm.prediction."
L = "llm.load."


def stack(*layers: dict) -> dict:
    return {
        "layers": [
            {"layerName": f"l{i}", "config": {"fields": [{"key": k, "value": v} for k, v in f]}}
            for i, f in enumerate(layer.items() for layer in layers)
        ]
    }


def test_prediction_keys_to_core():
    pred = prediction(
        stack(
            {P + "temperature": 1, P + "topKSampling": 0, P + "unknownKey": object()},
            {
                P + "temperature": 0.25,
                P + "llama.presencePenalty": {"checked": True, "value": 0.5},
                P + "speculativeDecoding.draftModel": "draft",
                P + "speculativeDecoding.numDraftTokensExact": 4,
                P + "maxPredictedTokens": {"checked": True, "value": False},
            },
        )
    )
    assert (pred.temperature, pred.top_k, pred.presence_penalty) == (0.25, None, 0.5)
    assert (pred.draft_model, pred.num_draft_tokens, pred.max_tokens) == ("draft", 4, None)
    assert prediction(None) == prediction(stack({}))
    tools = prediction(stack({P + "tools": {"type": "none"}}))
    assert tools.tools == () and tools.tool_choice == "auto"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (P + "temperature", True),
        (P + "temperature", "0.5"),
        (P + "topPSampling", {"checked": "yes", "value": 0.5}),
        (P + "stopStrings", "stop"),
        (P + "structured", {"type": "regex"}),
        (P + "tools", {"type": "toolArray", "tools": [{"type": "function", "function": {}}]}),
        (P + "toolChoice", {"type": "generic", "mode": "any"}),
        (P + "speculativeDecoding.draftModel", ""),
        (P + "speculativeDecoding.numDraftTokensExact", 17),
    ],
)
def test_a_bad_prediction_value_names_its_key(key, value):
    with pytest.raises(SdkError, match=f"Invalid '{key}"):
        prediction(stack({key: value}))


def test_load_keys_to_core():
    request = load_request(
        stack(
            {L + "contextLength": 2048, L + "numParallelSessions": 8},
            {
                L + "contextLength": 4096,
                L + "numParallelSessions": 3,
                L + "llama.flashAttention": True,
                L + "llama.evalBatchSize": 256,
                L + "llama.kCacheQuantizationType": {"checked": True, "value": "q8_0"},
                L + "llama.vCacheQuantizationType": {"checked": False, "value": "q4_0"},
                L + "mlx.kvCacheQuantization": {"enabled": True, "bits": 4, "groupSize": 64},
                "embedding.load.contextLength": 128,
            },
        ),
        identifier="a",
        ttl_ms=2500,
    )
    assert (request.context_length, request.parallel, request.eval_batch_size) == (4096, 3, 256)
    assert (request.flash_attention, request.cache_type_k, request.cache_type_v) == (
        True,
        "q8_0",
        None,
    )
    assert (request.kv_cache_quantization, request.identifier, request.ttl) == (4, "a", 2.5)
    embedding = load_request(
        stack({"embedding.load.contextLength": 128, L + "numParallelSessions": 2}),
        embedding=True,
    )
    assert (embedding.context_length, embedding.parallel) == (128, None)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (L + "contextLength", 0),
        (L + "numParallelSessions", 65),
        (L + "llama.flashAttention", "on"),
        (L + "llama.kCacheQuantizationType", "q8_0"),
        (L + "mlx.kvCacheQuantization", {"enabled": True, "bits": "4"}),
    ],
)
def test_a_bad_load_value_names_its_key(key, value):
    with pytest.raises(SdkError, match=f"Invalid '{key}"):
        load_request(stack({key: value}))


def test_values_checked_beyond_their_shape():
    with pytest.raises(SdkError, match="kCacheQuantizationType must be one of"):
        load_request(
            stack({L + "llama.kCacheQuantizationType": {"checked": True, "value": "q2_k"}})
        )
    with pytest.raises(SdkError, match="bits must be 2, 3, 4, 6 or 8"):
        load_request(stack({L + "mlx.kvCacheQuantization": {"enabled": True, "bits": 5}}))
    with pytest.raises(SdkError, match="maxTokens must be at least 1"):
        prediction(stack({P + "maxPredictedTokens": {"checked": True, "value": 0}}))
    with pytest.raises(SdkError, match="jsonSchema"):
        prediction(stack({P + "structured": {"type": "json"}}))
    with pytest.raises(SdkError, match="ttlMs"):
        load_request(None, ttl_ms=True)
    with pytest.raises(SdkError, match="identifier"):
        load_request(None, identifier=5)
    # The models take the collapsed fields as they are; their names are the SDK's keys.
    assert parse_parameter(LoadConfig, {L + "contextLength": 64}).llm_context == 64
    assert parse_parameter(PredictionConfig, {}).temperature is None
