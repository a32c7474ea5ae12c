"""Schema fuzzing (robustness.md F1, after vLLM's test_openai_schema.py): schemathesis
generates requests from ``/openapi.json``, valid ones and invalid ones, and sends them to a
real server with the tiny models. No reply may be a 5xx; every status, content type and JSON
body must match the document.

Bounded: a few examples per operation, no shrinking, a fixed seed. Stateful or unbounded
routes are left out (downloads and search reach the network, deleting a model deletes it, the
log stream never ends). Inference
requests name one of the test models (or an unknown one) and ask for a few tokens at most,
so that valid requests really generate."""

from __future__ import annotations

import copy
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable

from tests.conftest import EMBED_MLX_KEY, GGUF_KEY, MLX_KEY, Server

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

EXAMPLES = {GenerationMode.POSITIVE: 12, GenerationMode.NEGATIVE: 8}
SKIP = {
    "/api/v1/models/download",
    "/api/v1/logs/stream",
    "/openapi.json",
    # Reaches the network (Hugging Face), and deletes models on disk.
    "/api/v1/models/search",
    "/api/v1/models/delete",
}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
TEXT_MODELS = [MLX_KEY, GGUF_KEY, "nobody/unknown-model"]
INFERENCE = {
    "ChatCompletionRequest": TEXT_MODELS,
    "CompletionRequest": TEXT_MODELS,
    "MessagesRequest": TEXT_MODELS,
    "CountTokensRequest": TEXT_MODELS,
    "ResponsesRequest": TEXT_MODELS,
    "ChatRequest": TEXT_MODELS,
    "EmbeddingRequest": [EMBED_MLX_KEY, "nobody/unknown-model"],
}
LENGTHS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "n", "top_logprobs")


def _for_the_test_models(document: dict[str, Any]) -> dict[str, Any]:
    """The document with inference requests narrowed to the test models and short replies."""
    doc = copy.deepcopy(document)
    schemas = doc["components"]["schemas"]
    for name, models in INFERENCE.items():
        props = schemas[name]["properties"]
        props["model"] = {"enum": models}
        for field in LENGTHS:
            if field in props:
                props[field] = {"type": "integer", "minimum": 1, "maximum": 4}
        # Without a limit a random-weight model writes until its context is full.
        limit = next((f for f in ("max_tokens", "max_output_tokens") if f in props), None)
        if limit is not None:
            schemas[name]["required"] = sorted({*schemas[name].get("required", []), limit})
    return doc


@pytest.fixture(scope="module")
def fuzz_server(models_root, embedding_models, tmp_path_factory):
    srv = Server(models_root, tmp_path_factory.mktemp("home-fuzz"), "--no-auto-evict")
    yield srv
    srv.stop()


def _operations(fuzz_server):
    document = httpx.get(fuzz_server.url + "/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(_for_the_test_models(document))
    schema.config.generation.update(allow_x00=False)
    for result in schema.get_all_operations():
        op = result.ok()
        if op.path not in SKIP:
            yield op


@pytest.mark.parametrize("mode", list(EXAMPLES), ids=lambda m: m.value)
def test_fuzz_every_operation(fuzz_server, mode):
    failures: list[str] = []
    tried = 0
    for op in _operations(fuzz_server):

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES[mode],
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            nonlocal tried
            tried += 1
            try:
                case.call_and_validate(base_url=fuzz_server.url, checks=CHECKS, timeout=60)
            except Exception as exc:  # noqa: BLE001 - collected, reported together
                body = repr(getattr(case, "body", None))[:600]
                failures.append(f"{case.method} {case.path} {body}: {exc}"[:1500])

        try:
            run()
        except Unsatisfiable:
            continue  # nothing to vary (no body, no parameters): no invalid request exists
    assert tried > 20
    assert not failures, "\n\n".join(failures[:10])
    assert fuzz_server.proc.poll() is None
