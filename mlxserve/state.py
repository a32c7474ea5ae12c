"""What the app holds: built once by :func:`mlxserve.app.create_app`, no module globals."""

from __future__ import annotations

from dataclasses import dataclass

from mlxserve.auth import TokenStore
from mlxserve.core.chatstore import ChatStore
from mlxserve.core.downloads import DownloadManager
from mlxserve.core.logbus import LogBus
from mlxserve.core.manager import ModelManager
from mlxserve.core.mcp import McpClients
from mlxserve.core.metrics import Metrics
from mlxserve.core.registry import Registry
from mlxserve.core.sealed import ReasoningSeal
from mlxserve.core.sources import external_sources
from mlxserve.sdk.quota import SdkQuota
from mlxserve.settings import Settings


@dataclass
class AppState:
    settings: Settings
    registry: Registry
    manager: ModelManager
    # Stored responses of stateful chats (/api/v1/chat, /v1/responses).
    chats: ChatStore
    # API tokens (checked only when ``settings.require_auth``).
    tokens: TokenStore
    # Model downloads (/api/v1/models/download).
    downloads: DownloadManager
    # Live request log (/api/v1/logs/stream).
    logbus: LogBus
    # MCP servers: the kept-alive sessions to mcp.json servers.
    mcp: McpClients
    # The metrics registry (GET /metrics), fed by the manager and the generation path.
    metrics: Metrics
    # Seals the reasoning that stateless agents carry between turns (Codex, Claude Code).
    seal: ReasoningSeal
    # In-flight SDK websocket calls and channels per token (or client), across connections.
    sdk_quota: SdkQuota

    @classmethod
    def build(cls, settings: Settings) -> AppState:
        registry = Registry(settings.models_root, external_sources(settings))
        metrics = Metrics()
        return cls(
            settings=settings,
            registry=registry,
            manager=ModelManager(settings, registry, observer=metrics),
            chats=ChatStore(
                settings.home / "chats.sqlite3",
                max_age_days=settings.chat_store_max_age_days,
                max_bytes=settings.chat_store_max_bytes,
            ),
            tokens=TokenStore(settings.home / "tokens.json"),
            downloads=DownloadManager(settings.models_root, registry),
            logbus=LogBus(),
            mcp=McpClients(settings),
            metrics=metrics,
            seal=ReasoningSeal.from_home(settings.home),
            sdk_quota=SdkQuota(),
        )
