"""The LM Studio SDK websocket's ``llm`` messages (``predict``, ``applyPromptTemplate``):
pydantic models with ``to_core()`` like every other dialect's. The prediction config inside is
a KV config stack (:mod:`mlxserve.protocols.sdk_config` reads its keys); the chat history is
the SDK's ``ChatHistoryData``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlxserve.core import images
from mlxserve.core.types import CoreRequest, SamplingParams
from mlxserve.protocols.sdk_config import (
    RAW_COMPLETION_LAYER,
    KVConfigStack,
    Prediction,
    PredictionConfig,
    ToolDefinition,
    Tools,
    _Wire,
    parse_parameter,
)
from mlxserve.sdk import files
from mlxserve.sdk.transport import SdkError

__all__ = ["ApplyPromptTemplateParameter", "PredictParameter", "parse_parameter"]


def _text_parts(
    message: dict[str, Any], role: str, home: Path | None
) -> str | list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for part in message.get("content") or []:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "file":
            if role != "user" or home is None:
                raise SdkError("File parts (images) are accepted in user messages only.")
            parts.append(files.image_part(home, part))
        elif kind not in ("toolCallRequest", "toolCallResult") or role not in ("assistant", "tool"):
            raise SdkError(f"Unexpected content part {kind!r} in a {role} message.")
    return images.message_content(parts)


def history_messages(history: Any, home: Path | None = None) -> list[dict[str, Any]]:
    """``ChatHistoryData`` to chat-template messages (HF conventions, as the REST APIs use);
    images uploaded under ``home`` (``files.uploadFileBase64``) become image parts."""
    messages = history.get("messages") if isinstance(history, dict) else None
    if not isinstance(messages, list):
        raise SdkError("history must be {messages: [...]}.")
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "user", "assistant", "tool"):
            raise SdkError(f"Unknown message role {role!r}.")
        if role == "tool":
            for part in message.get("content") or []:
                if not isinstance(part, dict) or part.get("type") != "toolCallResult":
                    raise SdkError("Tool messages may hold only toolCallResult parts.")
                entry: dict[str, Any] = {"role": "tool", "content": str(part.get("content", ""))}
                if isinstance(part.get("toolCallId"), str):
                    entry["tool_call_id"] = part["toolCallId"]
                if isinstance(part.get("name"), str):
                    entry["name"] = part["name"]
                out.append(entry)
            continue
        entry = {"role": role, "content": _text_parts(message, role, home)}
        calls = [
            p["toolCallRequest"]
            for p in message.get("content") or []
            if isinstance(p, dict) and p.get("type") == "toolCallRequest"
        ]
        if calls:
            entry["tool_calls"] = [
                {
                    "id": c.get("id") or f"call_{n}",
                    "type": "function",
                    "function": {"name": c.get("name"), "arguments": c.get("arguments") or {}},
                }
                for n, c in enumerate(calls)
            ]
        out.append(entry)
    return out


def _raw_prompt(messages: list[dict[str, Any]]) -> str:
    # The SDKs' completion layer renders nothing but the contents, one after the other.
    return "".join(m["content"] for m in messages)


class PredictParameter(_Wire):
    """``llm`` channel ``predict`` (``respond``, ``complete``, each round of ``act``)."""

    modelSpecifier: Any = None
    history: Any = None
    predictionConfigStack: KVConfigStack | None = None
    fuzzyPresetIdentifier: str | None = None

    def prediction(self) -> Prediction:
        preset = self.fuzzyPresetIdentifier
        if preset:
            raise SdkError(
                f"No preset matches '{preset[:128]}'; mlxserve has no presets.",
                display_data={
                    "code": "generic.presetNotFound",
                    "specifiedFuzzyPresetIdentifier": preset[:256],
                    "availablePresetsSample": [],
                    "totalAvailablePresets": 0,
                },
            )
        stack = self.predictionConfigStack
        fields, layers = stack.collapse() if stack is not None else ({}, set())
        config = parse_parameter(PredictionConfig, fields)
        return config.to_core(raw=RAW_COMPLETION_LAYER in layers)

    def to_core(
        self,
        model: str,
        default_temperature: float,
        home: Path | None,
        extra_tools: tuple[dict[str, Any], ...] = (),
    ) -> tuple[CoreRequest, Prediction]:
        """The core request for ``model`` (an instance id), and the prediction config as
        read (echoed in the ``success`` message)."""
        pred = self.prediction()
        messages = history_messages(self.history, home)
        defaults = SamplingParams()
        sampling = SamplingParams(
            temperature=pred.temperature if pred.temperature is not None else default_temperature,
            top_p=pred.top_p if pred.top_p is not None else defaults.top_p,
            top_k=pred.top_k or 0,
            min_p=pred.min_p if pred.min_p is not None else defaults.min_p,
            repeat_penalty=pred.repeat_penalty
            if pred.repeat_penalty is not None
            else defaults.repeat_penalty,
            presence_penalty=pred.presence_penalty or 0.0,
        )
        common: dict[str, Any] = {
            "model": model,
            "sampling": sampling,
            "max_tokens": pred.max_tokens,
            "stops": pred.stops,
            "json_schema": pred.json_schema,
            "draft_model": pred.draft_model,
            "num_draft_tokens": pred.num_draft_tokens,
        }
        if pred.raw:
            return CoreRequest(prompt=_raw_prompt(messages), **common), pred
        request = CoreRequest(
            messages=tuple(messages),
            tools=(*pred.tools, *extra_tools),
            tool_choice=pred.tool_choice,
            # The SDK protocol has no parallel-calls switch, so a forced call is one call: a
            # parallel-capable forcing grammar let a model repeat its call until maxTokens, and
            # the cut-off last call failed the whole act() round in the SDK.
            parallel_tool_calls=False,
            **common,
        )
        return request, pred


class ApplyPromptTemplateOpts(_Wire):
    omitBosToken: bool | None = None
    omitEosToken: bool | None = None
    toolDefinitions: list[ToolDefinition] | None = None

    def tools(self) -> tuple[dict[str, Any], ...]:
        return Tools(type="toolArray", tools=self.toolDefinitions or []).to_core()


class ApplyPromptTemplateParameter(_Wire):
    """``llm`` rpc ``applyPromptTemplate``: the prompt a prediction with this history and
    config would give the model."""

    specifier: Any = None
    history: Any = None
    predictionConfigStack: KVConfigStack | None = None
    opts: ApplyPromptTemplateOpts = ApplyPromptTemplateOpts()

    def to_core(
        self, model: str, default_temperature: float, home: Path | None
    ) -> tuple[CoreRequest, Prediction]:
        predict = PredictParameter(
            history=self.history, predictionConfigStack=self.predictionConfigStack
        )
        return predict.to_core(model, default_temperature, home, self.opts.tools())
