"""Typed errors, raised anywhere and rendered once per dialect at the HTTP edge."""

from __future__ import annotations

import re

_PLAIN_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}(/[A-Za-z0-9][A-Za-z0-9._:-]{0,127})?$")


class MlxServeError(Exception):
    """Base class. ``status`` is the HTTP status; ``kind`` the OpenAI error ``type``."""

    status = 500
    kind = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(MlxServeError):
    status = 400
    kind = "invalid_request_error"
    code = "invalid_request"


class InvalidJSON(InvalidRequest):
    code = "invalid_json"


class ModelNotFound(MlxServeError):
    status = 404
    kind = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        # Echo the name only when it is a plain model key, never anything path-like.
        shown = f"'{model}'" if _PLAIN_KEY.match(model) else "requested"
        super().__init__(
            f"Model {shown} was not found. GET /v1/models lists the available models.",
            param="model",
        )


class InstanceNotFound(MlxServeError):
    """No loaded model instance has this id (``/api/v1/models/unload``)."""

    status = 404
    kind = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, instance_id: str) -> None:
        shown = f"'{instance_id}'" if _PLAIN_KEY.match(instance_id) else "given"
        super().__init__(
            f"No loaded model instance with id {shown}. GET /api/v1/models lists the loaded "
            "instances of each model.",
            param="instance_id",
        )


class ModelNotLoaded(MlxServeError):
    status = 400
    kind = "invalid_request_error"
    code = "model_not_loaded"


class ModelLoadFailed(MlxServeError):
    status = 500
    kind = "server_error"
    code = "model_load_failed"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"

    def __init__(self, n_prompt_tokens: int, n_ctx: int) -> None:
        super().__init__(
            f"This model's maximum context length is {n_ctx} tokens, however you requested "
            f"{n_prompt_tokens} tokens in the prompt. Please reduce the length of the messages "
            "or load the model with a larger context length.",
            param="messages",
        )
        self.n_prompt_tokens = n_prompt_tokens
        self.n_ctx = n_ctx


class InputTooLong(InvalidRequest):
    """An embedding input longer than the model's window, and truncation was not asked for."""

    code = "context_length_exceeded"


class Overloaded(MlxServeError):
    status = 503
    kind = "overloaded_error"
    code = "server_busy"
    retry_after_seconds = 1


class Unauthorized(MlxServeError):
    """No API token, or one that is not live, while the server requires authentication."""

    status = 401
    kind = "authentication_error"
    code = "invalid_api_key"


class Forbidden(MlxServeError):
    """Refused whoever asks: a Host or Origin this server does not answer (DNS rebinding)."""

    status = 403
    kind = "permission_error"
    code = "forbidden"


class PayloadTooLarge(MlxServeError):
    status = 413
    kind = "invalid_request_error"
    code = "request_too_large"


class NotFoundRoute(MlxServeError):
    status = 404
    kind = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(MlxServeError):
    status = 405
    kind = "invalid_request_error"
    code = "method_not_allowed"


class EngineFailure(MlxServeError):
    """The backend failed while generating; not the client's fault."""

    status = 500
    kind = "server_error"
    code = "engine_error"


class GenerationCancelled(MlxServeError):
    """The server stopped a generation before it ended (its model unloaded, or shutting
    down): the reply is cut short, which is neither a stop nor the length limit."""

    status = 503
    kind = "server_error"
    code = "generation_cancelled"


class PermissionDenied(MlxServeError):
    """A feature this server's settings switch off (per-request MCP servers, mcp.json)."""

    status = 403
    kind = "permission_error"
    code = "permission_denied"


class McpConnectionError(MlxServeError):
    """An MCP server could not be reached, or broke off or timed out while in use (OpenAI
    answers these with 424 Failed Dependency)."""

    status = 424
    kind = "external_connector_error"
    code = "mcp_connection_error"
