"""Settings: environment variables use the ``MLXSERVE_`` prefix; CLI flags mirror it."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_home() -> Path:
    return Path.home() / ".mlxserve"


class Settings(BaseSettings):
    """Server settings. ``home`` holds all state; ``models_dir`` defaults to ``<home>/models``."""

    model_config = SettingsConfigDict(env_prefix="MLXSERVE_", extra="ignore")

    home: Path = Field(default_factory=default_home)
    models_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=1234, ge=0, le=65535)
    log_level: str = "info"
    # Context length a model is loaded with unless the model's own maximum is smaller.
    default_context_length: int = Field(default=4096, ge=64)
    # Default sampling temperature when a request gives none (LM Studio's default).
    default_temperature: float = Field(default=0.8, ge=0.0, le=2.0)
    # Whether an inference request may load a model that is not loaded yet.
    jit_loading: bool = True
    # Idle seconds after which a just-in-time loaded model is unloaded (LM Studio's default
    # is 60 minutes); a request's ``ttl`` overrides it; 0 keeps JIT loads until evicted.
    ttl_seconds: float = Field(default=3600.0, ge=0.0)
    # Loading a model just in time first unloads the models loaded just in time before it
    # (explicitly loaded models are never evicted).
    auto_evict: bool = True
    # Refuse a load whose estimated memory (weights + KV cache) exceeds what is free.
    load_guardrail: bool = True
    # A fixed memory budget for loaded models (GB) in place of the machine's free memory.
    guardrail_memory_gb: float | None = Field(default=None, gt=0.0)
    # How many requests may wait for one loaded model before new ones get 503.
    max_queue_per_model: int = Field(default=64, ge=1)
    # Interval between SSE keep-alive comments while a stream produces nothing; 0 turns them off.
    sse_ping_seconds: float = Field(default=15.0, ge=0.0)
    # Every API route requires ``Authorization: Bearer <token>`` (tokens: ``mlxserve token``).
    require_auth: bool = False

    @model_validator(mode="after")
    def _resolve_paths(self) -> Settings:
        self.home = self.home.expanduser()
        if self.models_dir is None:
            self.models_dir = self.home / "models"
        self.models_dir = self.models_dir.expanduser()
        return self

    @property
    def models_root(self) -> Path:
        assert self.models_dir is not None
        return self.models_dir
