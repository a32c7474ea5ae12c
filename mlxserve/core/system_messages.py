"""System messages where a chat template can take them.

Agents send system text in several places: Codex a run of ``developer`` messages at the
start, Claude Code ``system`` turns in the middle of the conversation. Templates differ: many
render any role in place (ChatML), others only read ``messages[0]`` as the system prompt and
drop or refuse a later one. Per template, decided once by rendering a probe conversation: a
system message the template renders in place stays there; otherwise its text is appended to
the leading system prompt, so the model still sees it.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from mlxserve.core.templates import ChatTemplate
from mlxserve.errors import InvalidRequest

log = logging.getLogger("mlxserve.templates")

_PROBE = "mlxserve-mid-conversation-system-probe"
_ANSWER = "mlxserve-probe-answer"


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


@lru_cache(maxsize=64)
def _renders_in_place(template: ChatTemplate) -> bool:
    probe = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": _ANSWER},
        {"role": "system", "content": _PROBE},
        {"role": "user", "content": "v"},
    ]
    try:
        rendered = template.render(probe, add_generation_prompt=True)
    except InvalidRequest:
        rendered = ""
    in_place = _ANSWER in rendered and rendered.find(_PROBE) > rendered.index(_ANSWER)
    log.info(
        "chat template %s mid-conversation system messages",
        "renders" if in_place else "does not render; merging into the system prompt",
    )
    return in_place


def renders_system_in_place(template: ChatTemplate) -> bool:
    """Whether ``template`` renders a system message after the first turn where it stands."""
    return _renders_in_place(template)


def arrange_system(template: ChatTemplate, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` with one leading system prompt (a leading run of system messages joined)
    and later system messages in place or merged into it, as ``template`` allows."""
    lead = 0
    while lead < len(messages) and messages[lead].get("role") == "system":
        lead += 1
    later = [i for i in range(lead, len(messages)) if messages[i].get("role") == "system"]
    if lead <= 1 and not later:
        return messages
    head = [_text(m.get("content")) for m in messages[:lead]]
    rest = messages[lead:]
    if later and not renders_system_in_place(template):
        head += [_text(m.get("content")) for m in rest if m.get("role") == "system"]
        rest = [m for m in rest if m.get("role") != "system"]
    text = "\n\n".join(t for t in head if t)
    return [{"role": "system", "content": text}, *rest] if lead or text else rest
