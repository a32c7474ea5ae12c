"""The SDK's KV config stacks to our requests, through the wire models of
:mod:`mlxserve.protocols.sdk_config` (which say which keys are read and how)."""

from __future__ import annotations

from typing import Any

from mlxserve.core.instance import LoadRequest
from mlxserve.protocols.sdk_config import (
    RAW_COMPLETION_LAYER,
    KVConfigStack,
    LoadConfig,
    LoadOptions,
    P,
    Prediction,
    PredictionConfig,
    Tools,
    parse_parameter,
)

__all__ = ["P", "Prediction", "collapse", "echo", "load_request", "parse_tools", "prediction"]


def collapse(stack: Any) -> tuple[dict[str, Any], set[str]]:
    """The collapsed fields of a ``KVConfigStack``, and the names of its layers."""
    if stack is None:
        return {}, set()
    return parse_parameter(KVConfigStack, stack).collapse()


def prediction(stack: Any) -> Prediction:
    fields, layers = collapse(stack)
    config = parse_parameter(PredictionConfig, fields)
    return config.to_core(raw=RAW_COMPLETION_LAYER in layers)


def parse_tools(value: Any) -> tuple[dict[str, Any], ...]:
    """``llm.prediction.tools`` (or the same shape built from ``toolDefinitions``)."""
    return () if value is None else parse_parameter(Tools, value).to_core()


def load_request(
    stack: Any, *, identifier: Any = None, ttl_ms: Any = None, embedding: bool = False
) -> LoadRequest:
    options = parse_parameter(LoadOptions, {"identifier": identifier, "ttlMs": ttl_ms})
    config = parse_parameter(LoadConfig, collapse(stack)[0])
    return config.to_core(identifier=options.identifier, ttl=options.ttl(), embedding=embedding)


def echo(pred: Prediction, default_temperature: float) -> dict[str, Any]:
    """The prediction config the server used, as the ``success`` message reports it."""
    temperature = pred.temperature if pred.temperature is not None else default_temperature
    fields: list[dict[str, Any]] = [{"key": P + "temperature", "value": temperature}]
    max_tokens = pred.max_tokens
    fields.append(
        {
            "key": P + "maxPredictedTokens",
            "value": {"checked": max_tokens is not None, "value": max_tokens or 1},
        }
    )
    fields.append({"key": P + "stopStrings", "value": list(pred.stops)})
    return {"fields": fields}
