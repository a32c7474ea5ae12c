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
    # The most tokens one reply may generate, whatever the request asks (agents ask for 32000
    # on every turn); None: only the context bounds it.
    max_output_tokens: int | None = Field(default=None, ge=1)
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
    # Requests one loaded model decodes together in a batch (MLX continuous batching, GGUF
    # parallel sequences); more wait for a free place.
    max_batch_size: int = Field(default=8, ge=1, le=64)
    # Prompt tokens processed per step while other requests are decoding, so that a long
    # prompt never freezes running streams for more than one chunk.
    prefill_chunk: int = Field(default=512, ge=16)
    # Context windows of KV cache a GGUF model reserves for its parallel sequences (at most its
    # ``parallel``): 1 is one pool of context_length cells they share (a lone request may use
    # it all; a sequence that finds no room waits in host memory and resumes exactly).
    kv_windows: int = Field(default=1, ge=1, le=64)
    # Memory each loaded model may keep for the prompt cache (KV of earlier requests reused
    # by a request that shares their prefix); least recently used entries go first.
    prompt_cache_bytes: int = Field(default=1 << 30, ge=0)
    # Disk under <home>/prompt-cache that prompt-cache entries of every model may take
    # together: entries pushed out of memory, and all of them when a model unloads, are
    # written there and reloaded by a later prompt sharing their prefix, after an unload or a
    # restart too; least recently used files go first; 0 turns spilling off.
    prompt_cache_disk_bytes: int = Field(default=8 << 30, ge=0)
    # Reuse of cached KV past the first difference from a cached prompt (a changed line near
    # the top, a reordered tool list, an edited tool result): runs of at least this many tokens
    # that match the cached prompt are moved to their new positions instead of being computed
    # again (llama-server's ``--cache-reuse``). Approximate: the moved KV attended to the old
    # text before it. 0 keeps to exact prefix reuse only.
    cache_reuse: int = Field(default=256, ge=0)
    # GGUF models load with llama.cpp's flash attention unless a load says otherwise. Off by
    # default: its CPU kernel sums a sequence's values in f16 in cell order, so a request's
    # tokens at temperature 0 (and a seed's draws) then depend on which cells earlier
    # requests left free; on, the prompt cache's kept cells stop slowing every prompt chunk.
    flash_attention: bool = False
    # Interval between SSE keep-alive comments while a stream produces nothing; 0 turns them off.
    sse_ping_seconds: float = Field(default=15.0, ge=0.0)
    # Retention of stored chats (chats.sqlite3): chats not continued for this many days are
    # deleted, and while the stored turns take more than chat_store_max_bytes the least
    # recently continued chats are deleted; 0 turns either off.
    chat_store_max_age_days: float = Field(default=0.0, ge=0.0)
    chat_store_max_bytes: int = Field(default=1 << 30, ge=0)
    # Every API route requires ``Authorization: Bearer <token>`` (tokens: ``mlxserve token``).
    require_auth: bool = False
    # While bound to loopback, requests must name a loopback host (the DNS-rebinding guard):
    # these comma-separated names are answered too, besides localhost, *.localhost, loopback
    # addresses and this machine's name.
    allowed_hosts: str = ""
    # Browsers may call the API from other origins (CORS) only when this is on.
    cors: bool = False
    # The origins CORS answers, comma-separated, or ``*`` for any (never with credentials).
    cors_origins: str = "*"
    # The largest request body accepted, counted as it arrives (images travel as base64).
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)

    # Images (vision models): http(s) image URLs are fetched with this timeout (seconds) and
    # size limit, and refused on loopback/private/link-local addresses unless their host is
    # in image_allowed_hosts (comma-separated host or host:port); file:// URLs are read only
    # from the comma-separated image_file_roots folders (none by default). Larger images
    # than max_image_pixels are refused as decompression bombs; others are scaled down to the
    # model's largest resolution before preprocessing.
    image_fetch_timeout: float = Field(default=10.0, gt=0.0)
    max_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    max_images_per_request: int = Field(default=8, ge=1, le=256)
    image_allowed_hosts: str = ""
    image_file_roots: str = ""

    # MCP (LM Studio's API settings): requests may name MCP servers by URL ("ephemeral_mcp"
    # integrations, Responses "mcp" tools) / use the servers in <home>/mcp.json (only with
    # require_auth on). Both are off unless enabled.
    allow_ephemeral_mcp: bool = False
    allow_mcp_json: bool = False
    # Comma-separated hosts (or host:port) that ephemeral MCP URLs may reach although they are
    # loopback or private addresses (others are refused: the server would be a proxy into them).
    mcp_allowed_hosts: str = ""
    # Seconds to connect to an MCP server and list its tools / to wait for one tool call.
    mcp_connect_timeout: float = Field(default=10.0, gt=0.0)
    mcp_call_timeout: float = Field(default=60.0, gt=0.0)
    # Generation rounds per request when MCP tools are offered (the last one has no tools).
    mcp_max_rounds: int = Field(default=8, ge=1, le=64)
    # Also serve, read-only and where they lie, the models LM Studio downloaded (the folder its
    # settings name, else ~/.lmstudio/models) and MLX / GGUF repositories in the Hugging Face
    # cache (~/.cache/huggingface/hub); the models directory wins a key both hold.
    lmstudio_models: bool = True
    lmstudio_models_dir: Path | None = None
    hf_cache_models: bool = True
    hf_cache_dir: Path | None = None

    # Distributed serving (``serve --distributed``): the mx.distributed backend ("ring",
    # "jaccl", "mpi" or "any"), seconds one step may take on the slowest rank before the
    # group is declared failed, and the first port the ring backend listens on.
    distributed_backend: str = "ring"
    distributed_timeout: float = Field(default=30.0, gt=0.0)
    distributed_port: int = Field(default=32323, ge=1, le=65535)

    @model_validator(mode="after")
    def _resolve_paths(self) -> Settings:
        self.home = self.home.expanduser()
        if self.models_dir is None:
            self.models_dir = self.home / "models"
        self.models_dir = self.models_dir.expanduser()
        if self.lmstudio_models_dir is not None:
            self.lmstudio_models_dir = self.lmstudio_models_dir.expanduser()
        if self.hf_cache_dir is not None:
            self.hf_cache_dir = self.hf_cache_dir.expanduser()
        return self

    @property
    def models_root(self) -> Path:
        assert self.models_dir is not None
        return self.models_dir
