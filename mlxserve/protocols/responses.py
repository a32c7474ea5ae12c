"""OpenAI Responses API wire schemas (``POST /v1/responses``; responses are rendered by
``routes/responses.py``).

Unknown fields (``prompt_cache_key``, ``client_metadata``, ``include`` entries other than
``reasoning.encrypted_content``, ...) are accepted and ignored. What Codex sends is taken as it
means it: ``developer`` messages are system messages (placed by the core as the template
allows), the functions of a ``namespace`` tool are offered to the model as
``<namespace>__<name>`` and its calls come back as ``name`` + ``namespace``, hosted tools
(``web_search``, ...) and custom tools are dropped from what the model sees (logged), and
reasoning items are restored from the ``encrypted_content`` we sealed. Input items and content
parts of a kind we cannot honour (images, files, ...) are refused with a 400 naming them.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, StrictBool, Tag, model_validator

from mlxserve.core.mcp import Requested
from mlxserve.core.sealed import ReasoningSeal
from mlxserve.core.types import CoreRequest, SamplingParams
from mlxserve.errors import InvalidRequest
from mlxserve.protocols.openai import (
    MAX_TOP_LOGPROBS,
    MAX_TTL_SECONDS,
    REASONING_EFFORT,
    FunctionDef,
    _Lenient,
)
from mlxserve.protocols.responses_input import (
    NAMESPACE_SEPARATOR,
    FunctionCallItem,
    FunctionCallOutputItem,
    InputItem,
    McpCallItem,
    McpListToolsItem,
    MessageItem,
    ReasoningItem,
    _str_or_list,
    _tag,
    _text_of,
    _user_content,
)

LOGPROBS_INCLUDE = "message.output_text.logprobs"

log = logging.getLogger("mlxserve.responses")


class FunctionTool(FunctionDef):
    type: Literal["function"]


class AllowedTools(_Lenient):
    tool_names: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = None
    read_only: StrictBool | None = None


class McpTool(_Lenient):
    """A remote MCP server (``server_url``) whose tools the model may call; the server runs
    the calls itself. Tool approvals are not supported: ``require_approval`` must be
    ``"never"`` (or left out, which means the same here)."""

    type: Literal["mcp"]
    server_label: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    server_url: str | None = Field(default=None, min_length=1, max_length=2048)
    allowed_tools: (
        list[Annotated[str, Field(min_length=1, max_length=128)]] | AllowedTools | None
    ) = Field(default=None)
    headers: dict[str, Annotated[str, Field(max_length=8192)]] | None = Field(
        default=None, max_length=64
    )
    authorization: str | None = Field(default=None, max_length=8192)
    require_approval: Any = None

    @model_validator(mode="after")
    def _supported(self) -> McpTool:
        extra = self.model_extra or {}
        if extra.get("connector_id") is not None or self.server_url is None:
            raise ValueError("MCP tools need a 'server_url'; connectors are not supported")
        approval = self.require_approval
        never = approval in (None, "never") or (
            isinstance(approval, dict) and set(approval) <= {"never"}
        )
        if not never:
            raise ValueError("tool approvals are not supported; set require_approval to 'never'")
        if isinstance(self.allowed_tools, AllowedTools) and self.allowed_tools.read_only:
            raise ValueError("allowed_tools.read_only is not supported; list tool_names")
        return self

    def requested(self) -> Requested:
        names = self.allowed_tools
        if isinstance(names, AllowedTools):
            names = names.tool_names
        headers = dict(self.headers or {})
        if self.authorization:
            headers["Authorization"] = f"Bearer {self.authorization}"
        return Requested(
            "ephemeral",
            self.server_label,
            self.server_url,
            tuple(headers.items()),
            frozenset(names) if names is not None else None,
        )


class OtherTool(_Lenient):
    """A hosted tool (``web_search``, ``file_search``, ...) or a custom (free-text) tool:
    nothing here runs the former and no template writes the latter, so the model does not
    see it."""

    type: str


# A namespace holds function tools (custom ones are dropped like other tools).
Member = Annotated[
    Annotated[FunctionTool, Tag("Function")] | Annotated[OtherTool, Tag("Other")],
    _tag({"function": "Function"}),
]


class NamespaceTool(_Lenient):
    """A group of functions (Codex's ``multi_agent_v1``, ...); the model sees each as
    ``<namespace>__<name>``."""

    type: Literal["namespace"]
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    tools: list[Member] = Field(default_factory=list, max_length=512)

    def functions(self) -> list[tuple[str, FunctionDef]]:
        """``(name for the model, function)`` for each function tool."""
        return [
            (f"{self.name}{NAMESPACE_SEPARATOR}{t.name}", t)
            for t in self.tools
            if isinstance(t, FunctionTool)
        ]


Tool = Annotated[
    Annotated[FunctionTool, Tag("Function")]
    | Annotated[NamespaceTool, Tag("Namespace")]
    | Annotated[McpTool, Tag("Mcp")]
    | Annotated[OtherTool, Tag("Other")],
    _tag({"function": "Function", "namespace": "Namespace", "mcp": "Mcp"}),
]


class FunctionChoice(_Lenient):
    type: Literal["function"]
    name: str
    namespace: str | None = Field(default=None, max_length=64)

    def model_name(self) -> str:
        return f"{self.namespace}{NAMESPACE_SEPARATOR}{self.name}" if self.namespace else self.name


class McpChoice(_Lenient):
    """``{"type": "mcp", "server_label", "name"?}``: call that tool (without a name: call
    some tool) in the first round."""

    type: Literal["mcp"]
    server_label: str
    name: str | None = None


class TextFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("type 'json_schema' needs a 'schema'")
        return self

    def as_json_schema(self) -> dict[str, Any] | None:
        if self.type == "json_object":
            return {"type": "object"}
        return self.schema_ if self.type == "json_schema" else None


class TextConfig(_Lenient):
    format: TextFormat | None = None


class ReasoningConfig(_Lenient):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    # Reasoning is returned whole (``reasoning_text``); a summary is not made.
    summary: Literal["auto", "concise", "detailed", "none"] | None = None


def _arguments(text: str) -> Any:
    """Arguments as chat templates expect them: a dict, or the raw text if it is not JSON."""
    try:
        return json.loads(text or "{}")
    except json.JSONDecodeError:
        return text


class ResponsesRequest(_Lenient):
    model: str = Field(min_length=1, max_length=512)
    input: (
        Annotated[
            Annotated[str, Tag("Str")] | Annotated[list[InputItem], Tag("List")],
            Discriminator(_str_or_list),
        ]
        | None
    ) = None
    instructions: str | None = None
    tools: list[Tool] | None = Field(default=None, max_length=512)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | McpChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    store: StrictBool = True
    previous_response_id: str | None = Field(default=None, min_length=1, max_length=256)
    stream: StrictBool = False
    # "message.output_text.logprobs" asks for log probabilities, "reasoning.encrypted_content"
    # for sealed reasoning; others are accepted and have nothing to add here.
    include: list[str] | None = Field(default=None, max_length=32)
    top_logprobs: int | None = None
    background: StrictBool | None = None
    # Extensions LM Studio and llama.cpp accept.
    top_k: int | None = Field(default=None, ge=0, le=100_000)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repeat_penalty: float | None = Field(default=None, gt=0, le=10)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    ignore_eos: StrictBool = False
    # LM Studio's: idle seconds before a just-in-time loaded model is unloaded.
    ttl: float | None = Field(default=None, gt=0, le=MAX_TTL_SECONDS)

    @model_validator(mode="after")
    def _consistent(self) -> ResponsesRequest:
        extra = self.model_extra or {}
        for name in ("conversation", "prompt"):
            if extra.get(name) is not None:
                raise InvalidRequest(
                    f"'{name}' is not supported by this server; continue a conversation with "
                    "previous_response_id.",
                    param=name,
                )
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequest(
                f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}.", param="top_logprobs"
            )
        if self.top_logprobs is not None and not self.wants_logprobs:
            raise InvalidRequest(
                f"top_logprobs needs include: ['{LOGPROBS_INCLUDE}'].", param="top_logprobs"
            )
        if self.background:
            raise InvalidRequest("Background responses are not supported.", param="background")
        if self.input is None or self.input == []:
            raise InvalidRequest("'input' is required and must not be empty.", param="input")
        names = [name for name, _ in self.functions()]
        if len(set(names)) != len(names):
            raise InvalidRequest("Tool names must be unique.", param="tools")
        if (
            isinstance(self.tool_choice, FunctionChoice)
            and self.tool_choice.model_name() not in names
        ):
            raise InvalidRequest(
                f"tool_choice names '{self.tool_choice.name}', which is not in tools.",
                param="tool_choice",
            )
        labels = [t.server_label for t in self.tools or [] if isinstance(t, McpTool)]
        if len(set(labels)) != len(labels):
            raise InvalidRequest("MCP server labels must be unique.", param="tools")
        if isinstance(self.tool_choice, McpChoice) and self.tool_choice.server_label not in labels:
            raise InvalidRequest(
                f"tool_choice names MCP server '{self.tool_choice.server_label}', which is not "
                "in tools.",
                param="tool_choice",
            )
        if self.tool_choice == "required" and not self.tools:
            raise InvalidRequest(
                "tool_choice 'required' needs at least one tool in tools.", param="tool_choice"
            )
        return self

    @property
    def wants_logprobs(self) -> bool:
        return LOGPROBS_INCLUDE in (self.include or ())

    def functions(self) -> list[tuple[str, FunctionDef]]:
        """The function tools as the model sees them: ``(name, function)``, a namespace's
        functions flattened."""
        out: list[tuple[str, FunctionDef]] = []
        for tool in self.tools or []:
            if isinstance(tool, FunctionTool):
                out.append((tool.name, tool))
            elif isinstance(tool, NamespaceTool):
                out += tool.functions()
        return out

    def dropped_tools(self) -> list[str]:
        """The types of the tools the model does not see (hosted and custom tools)."""
        inner = [m for t in self.tools or [] if isinstance(t, NamespaceTool) for m in t.tools]
        return [t.type for t in [*(self.tools or []), *inner] if isinstance(t, OtherTool)]

    def namespaced(self) -> dict[str, tuple[str, str]]:
        """A namespace function's name for the model -> (namespace, name)."""
        return {
            f"{t.name}{NAMESPACE_SEPARATOR}{fn.name}": (t.name, fn.name)
            for t in self.tools or []
            if isinstance(t, NamespaceTool)
            for _, fn in t.functions()
        }

    def wants_encrypted_reasoning(self) -> bool:
        return "reasoning.encrypted_content" in (self.include or [])

    def input_messages(self, seal: ReasoningSeal | None = None) -> list[dict[str, Any]]:
        """The input as chat-template messages: function calls join the assistant message
        before them, reasoning items ride on the assistant message after them."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        out: list[dict[str, Any]] = []
        reasoning = ""
        for item in self.input or []:
            if isinstance(item, ReasoningItem):
                reasoning += item.text(seal)
                continue
            if isinstance(item, McpListToolsItem):
                continue
            if isinstance(item, McpCallItem):
                if not out or out[-1]["role"] != "assistant":
                    out.append({"role": "assistant", "content": ""})
                call = {
                    "id": item.id,
                    "type": "function",
                    "function": {"name": item.name, "arguments": _arguments(item.arguments)},
                }
                out[-1].setdefault("tool_calls", []).append(call)
                out.append({"role": "tool", "tool_call_id": item.id, "content": item.result_text()})
                continue
            if isinstance(item, FunctionCallOutputItem):
                out.append(
                    {"role": "tool", "tool_call_id": item.call_id, "content": _text_of(item.output)}
                )
                continue
            if isinstance(item, MessageItem):
                role = "system" if item.role == "developer" else item.role
                content = _user_content(item.content) if role == "user" else _text_of(item.content)
                out.append({"role": role, "content": content})
            elif isinstance(item, FunctionCallItem):
                if not out or out[-1]["role"] != "assistant":
                    out.append({"role": "assistant", "content": ""})
                call = {
                    "id": item.call_id,
                    "type": "function",
                    "function": {
                        "name": item.model_name(),
                        "arguments": _arguments(item.arguments),
                    },
                }
                out[-1].setdefault("tool_calls", []).append(call)
            if reasoning and out[-1]["role"] == "assistant":
                out[-1]["reasoning_content"] = reasoning
                reasoning = ""
        return out

    def _tool_choice(self) -> str | dict[str, str]:
        if isinstance(self.tool_choice, FunctionChoice):
            return {"name": self.tool_choice.model_name()}
        if isinstance(self.tool_choice, McpChoice):
            name = self.tool_choice.name
            return {"name": name} if name else "required"
        return self.tool_choice or "auto"

    def requested_servers(self) -> list[Requested]:
        """The MCP servers among the tools."""
        return [t.requested() for t in self.tools or [] if isinstance(t, McpTool)]

    def to_core(
        self,
        default_temperature: float,
        history: list[dict[str, Any]],
        seal: ReasoningSeal | None = None,
    ) -> CoreRequest:
        """The core request: ``instructions``, then the stored ``history`` of
        ``previous_response_id`` (instructions are not carried over, as OpenAI documents),
        then this input."""
        messages = list(history) + self.input_messages(seal)
        if self.instructions:
            messages.insert(0, {"role": "system", "content": self.instructions})
        effort = self.reasoning.effort if self.reasoning else None
        text_format = self.text.format if self.text else None
        dropped = self.dropped_tools()
        if dropped:
            log.info("tools dropped (nothing here runs them): %s", ", ".join(dropped))
        return CoreRequest(
            model=self.model,
            sampling=SamplingParams(
                temperature=default_temperature if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=self.top_k or 0,
                min_p=self.min_p or 0.0,
                repeat_penalty=self.repeat_penalty or 1.0,
                seed=self.seed,
            ),
            messages=tuple(messages),
            max_tokens=self.max_output_tokens,
            ignore_eos=self.ignore_eos,
            tools=tuple({**fn.to_core(), "name": name} for name, fn in self.functions()),
            tool_choice=self._tool_choice(),
            parallel_tool_calls=self.parallel_tool_calls is not False,
            json_schema=text_format.as_json_schema() if text_format else None,
            reasoning=REASONING_EFFORT.get(effort, "high") if effort else None,
            ttl=self.ttl,
            logprobs=(self.top_logprobs or 0) if self.wants_logprobs else None,
        )
