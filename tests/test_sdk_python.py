"""End to end: the official LM Studio Python SDK (``lmstudio`` 1.5.0) against a real server,
over the SDK's websocket protocol, on the MLX and the GGUF twin."""

from __future__ import annotations

import json
from typing import Annotated

import httpx
import lmstudio as lms
import msgspec
import pytest

from tests.conftest import EMBED_GGUF_KEY, EMBED_MLX_KEY, GGUF_KEY, MLX_KEY, THINK_MLX_KEY

MODELS = [MLX_KEY, GGUF_KEY]


@pytest.fixture(scope="module")
def client(server, embedding_models):
    host = server.url.removeprefix("http://")
    with lms.Client(host) as c:
        yield c
        # Leave the shared server as we found it: unload what these tests loaded.
        for handle in c.llm.list_loaded() + c.embedding.list_loaded():
            if handle.identifier.startswith("sdk-py"):
                handle.unload()


def test_discovery_probes(server):
    assert httpx.get(server.url + "/lmstudio-greeting").json() == {"lmstudio": True}
    status = httpx.get(server.url + "/lms-status").json()
    assert isinstance(status["package"], str) and isinstance(status["version"], str)


def test_list_downloaded(client):
    keys = {m.model_key for m in client.list_downloaded_models()}
    assert {MLX_KEY, GGUF_KEY, EMBED_MLX_KEY, EMBED_GGUF_KEY} <= keys
    llms = {m.model_key for m in client.llm.list_downloaded()}
    assert MLX_KEY in llms and EMBED_MLX_KEY not in llms
    gguf = next(m for m in client.list_downloaded_models() if m.model_key == GGUF_KEY)
    assert gguf.info.format == "gguf" and gguf.info.path.startswith(GGUF_KEY + "/")


@pytest.mark.parametrize("key", MODELS)
def test_model_info_and_tokens(client, key):
    model = client.llm.model(key)
    info = model.get_info()
    assert info.model_key == key and info.context_length > 0
    assert model.get_context_length() == info.context_length
    assert model.get_load_config().context_length == info.context_length
    tokens = model.tokenize("hello world")
    assert len(tokens) == model.count_tokens("hello world") > 0
    chat = lms.Chat("You are terse.")
    chat.add_user_message("ping")
    formatted = model.apply_prompt_template(chat)
    assert "You are terse." in formatted and "ping" in formatted
    assert any(h.identifier == model.identifier for h in client.llm.list_loaded())


@pytest.mark.parametrize("key", MODELS)
def test_respond_whole_and_streamed(client, key):
    model = client.llm.model(key)
    config = {
        "temperature": 0,
        "maxTokens": 6,
        "topKSampling": 40,
        "topPSampling": 0.9,
        "minPSampling": 0.05,
        "repeatPenalty": 1.1,
        "stopStrings": ["\n\n\n\n"],
    }
    whole = model.respond("Hello", config=config)
    assert whole.stats.predicted_tokens_count == 6
    assert whole.stats.stop_reason == "maxPredictedTokensReached"
    assert whole.stats.time_to_first_token_sec is not None
    assert whole.model_info.model_key == key
    assert whole.load_config.context_length > 0
    assert whole.prediction_config.temperature == 0

    stream = model.respond_stream("Hello", config=config)
    fragments = [f.content for f in stream]
    result = stream.result()
    assert "".join(fragments) == result.content == whole.content
    assert result.stats.predicted_tokens_count == 6


@pytest.mark.parametrize("key", MODELS)
def test_complete_raw_text(client, key):
    model = client.llm.model(key)
    result = model.complete("Once upon a time", config={"temperature": 0, "maxTokens": 5})
    assert result.stats.predicted_tokens_count == 5
    # No chat template: the prompt is the text itself (plus the BOS token, if the model has one).
    assert result.stats.prompt_tokens_count <= model.count_tokens("Once upon a time") + 1


def test_mlx_and_gguf_agree(client):
    outputs = {
        key: client.llm.model(key).respond("Hi", config={"temperature": 0, "maxTokens": 8}).content
        for key in MODELS
    }
    assert outputs[MLX_KEY] == outputs[GGUF_KEY]


@pytest.mark.parametrize("key", MODELS)
def test_stop_string(client, key):
    model = client.llm.model(key)
    text = model.respond("Hello", config={"temperature": 0, "maxTokens": 8}).content
    stop = text[2:4]
    assert stop.strip()
    result = model.respond(
        "Hello", config={"temperature": 0, "maxTokens": 8, "stopStrings": [stop]}
    )
    assert result.stats.stop_reason == "stopStringFound"
    assert stop not in result.content


@pytest.mark.parametrize("key", MODELS)
def test_cancel(client, key):
    model = client.llm.model(key)
    stream = model.respond_stream("Tell a long story", config={"maxTokens": 4000})
    for n, _ in enumerate(stream):
        if n == 1:
            stream.cancel()
    assert stream.result().stats.stop_reason == "userStopped"


@pytest.mark.parametrize("key", MODELS)
def test_structured(client, key):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "ok": {"type": "boolean"}},
        "required": ["name", "ok"],
        "additionalProperties": False,
    }
    result = client.llm.model(key).respond(
        "A person", response_format=schema, config={"temperature": 0, "maxTokens": 60}
    )
    assert isinstance(result.parsed, dict), result.content
    assert set(result.parsed) == {"name", "ok"}
    assert json.loads(result.content) == result.parsed
    completed = client.llm.model(key).complete(
        "A person:", response_format=schema, config={"temperature": 0, "maxTokens": 60}
    )
    assert isinstance(completed.parsed, dict), completed.content


Digit = Annotated[int, msgspec.Meta(ge=0, le=99)]


@pytest.mark.parametrize("key", MODELS)
def test_act_forced_tool_call(client, key, forced_tool_calls):
    calls: list[tuple[int, int]] = []

    def add(a: Digit, b: Digit) -> int:
        """Add two numbers."""
        calls.append((a, b))
        return a + b

    messages = []
    result = client.llm.model(key).act(
        "What is 1 + 2?",
        [add],
        max_prediction_rounds=2,
        config={"temperature": 0, "maxTokens": 40},
        on_message=messages.append,
    )
    assert result.rounds == 2
    assert calls and all(0 <= a <= 99 and 0 <= b <= 99 for a, b in calls)
    roles = [m.role for m in messages]
    assert roles[:2] == ["assistant", "tool"] and roles[-1] == "assistant"
    # The forcing grammar allows parallel calls: a second one cut off by maxTokens comes back
    # as text, never dropped.
    requests = [p for p in messages[0].content if p.type == "toolCallRequest"]
    assert requests and requests[0].tool_call_request.name == "add"
    results = [p for p in messages[1].content if p.type == "toolCallResult"]
    assert results[0].tool_call_id == requests[0].tool_call_request.id


def test_load_unload_identifiers(client):
    first = client.llm.load_new_instance(
        GGUF_KEY, "sdk-py-a", config={"contextLength": 512}, ttl=600
    )
    assert first.identifier == "sdk-py-a" and first.get_context_length() == 512
    with pytest.raises(lms.LMStudioServerError, match="already exists"):
        client.llm.load_new_instance(GGUF_KEY, "sdk-py-a")
    second = client.llm.load_new_instance(GGUF_KEY, config={"contextLength": 512})
    third = client.llm.load_new_instance(GGUF_KEY, config={"contextLength": 512})
    base, _, n = second.identifier.partition(":")
    assert third.identifier == f"{base}:{int(n or 1) + 1}"
    loaded = {h.identifier for h in client.llm.list_loaded()}
    assert {"sdk-py-a", second.identifier, third.identifier} <= loaded
    for handle in (first, second, third):
        handle.unload()
    loaded = {h.identifier for h in client.llm.list_loaded()}
    assert not {"sdk-py-a", third.identifier} & loaded


@pytest.mark.parametrize("key", [EMBED_MLX_KEY, EMBED_GGUF_KEY])
def test_embedding(client, key):
    model = client.embedding.model(key)
    vector = model.embed("hello world")
    assert len(vector) == 384 and all(isinstance(x, float) for x in vector)
    assert len(model.embed(["a", "b"])) == 2
    # LM Studio's quirk: tokenize includes [CLS] and [SEP], countTokens does not.
    assert len(model.tokenize("hello world")) == model.count_tokens("hello world") + 2
    assert model.get_context_length() > 0


def test_errors_name_the_problem(client):
    with pytest.raises(lms.LMStudioModelNotFoundError):
        client.llm.model("no-such/model")
    with pytest.raises(lms.LMStudioModelNotFoundError):
        client.llm.unload("No such model")
    handle = client.llm.load_new_instance(MLX_KEY, "sdk-py-gone", config={"contextLength": 256})
    handle.unload()
    with pytest.raises(lms.LMStudioModelNotFoundError):
        handle.tokenize("x")
    with pytest.raises(lms.LMStudioModelNotFoundError):
        handle.respond("x")
    with pytest.raises(lms.LMStudioServerError, match="GBNF"):
        client.llm.model(MLX_KEY).respond(
            "x", response_format={"type": "gbnf", "gbnfGrammar": 'root ::= "a"'}
        )


def test_async_client_opens_every_namespace(server, embedding_models):
    import asyncio

    async def run():
        async with lms.AsyncClient(server.url.removeprefix("http://")) as c:
            return [m.model_key for m in await c.list_downloaded_models()]

    assert MLX_KEY in asyncio.run(run())


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


# No description: templates are given one anyway (an empty one), as generation gives them.
CLOCK = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


@pytest.mark.parametrize("key", [*MODELS, THINK_MLX_KEY])
def test_applied_template_is_the_prompt_the_model_is_given(client, key):
    model = client.llm.model(key)
    chat = lms.Chat("You are terse.")
    chat.add_user_message("What is the weather in Paris?")
    formatted = model.apply_prompt_template(chat, {"toolDefinitions": [WEATHER, CLOCK]})
    assert "get_weather" in formatted and "What is the weather in Paris?" in formatted
    result = model.respond(
        chat,
        config={
            "rawTools": {"type": "toolArray", "tools": [WEATHER, CLOCK]},
            "maxTokens": 1,
            "temperature": 0,
        },
    )
    assert result.stats.prompt_tokens_count == len(model.tokenize(formatted))
