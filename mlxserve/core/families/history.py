"""Checks and reshaping of a conversation's tool turns, shared by the families."""

from __future__ import annotations

from typing import Any

from mlxserve.errors import InvalidRequest


def check_tool_results(messages: list[dict[str, Any]]) -> None:
    """A ``tool`` message must answer a call an earlier assistant message made."""
    called: set[str] = set()
    for message in messages:
        for call in message.get("tool_calls") or ():
            if isinstance(call, dict) and call.get("id"):
                called.add(str(call["id"]))
        if message.get("role") != "tool":
            continue
        call_id = message.get("tool_call_id")
        if call_id and str(call_id) not in called:
            raise InvalidRequest(
                f"A tool message answers tool_call_id '{call_id}', which no earlier assistant "
                "message called.",
                param="messages",
            )
