"""Chat templates from model files, rendered in a sandbox, the same way for every format."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mlxserve.errors import InvalidRequest

log = logging.getLogger("mlxserve.templates")

# Used when a model ships no chat template: plain ChatML, which most small models understand.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TemplateError(Exception):
    """A chat template that does not compile."""


def _raise_exception(message: str) -> None:
    # Templates call this to reject a conversation (e.g. roles that do not alternate):
    # that is the client's input at fault, so it becomes a 400.
    raise InvalidRequest(f"The model's chat template rejected the messages: {message}")


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` (Hugging Face's mark of the assistant's part,
    for training masks; LFM2.5 and Laguna templates use it): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols", _GenerationTag],
        undefined=jinja2.Undefined,
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=64)
def _compile(source: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateError as exc:
        raise TemplateError(f"chat template does not compile: {exc}") from exc


def template_supports_tools(source: str | None) -> bool:
    """Whether a chat template renders a ``tools`` list (a cheap check on the source)."""
    return bool(source) and "tools" in str(source)


class ChatTemplate:
    """A model's chat template with the special tokens it refers to."""

    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = "") -> None:
        if not source:
            source = FALLBACK_TEMPLATE
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._template = _compile(source)

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        """Render a conversation to the prompt text the model was trained on."""
        context: dict[str, Any] = {
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            **extra,
        }
        if tools:
            context["tools"] = tools
        try:
            return self._template.render(**context)
        except InvalidRequest:
            raise
        except jinja2.exceptions.SecurityError as exc:
            raise InvalidRequest(f"The chat template tried an unsafe operation: {exc}") from exc
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as exc:
            log.warning("chat template failed to render: %s", exc)
            raise InvalidRequest(
                f"The model's chat template could not render these messages: {exc}"
            ) from exc
