"""The app's shutdown closes every part even when one of them fails to close."""

from __future__ import annotations

import logging

from starlette.testclient import TestClient

from mlxserve.app import create_app
from mlxserve.settings import Settings


def test_shutdown_goes_on_past_a_failing_close(tmp_path, caplog):
    app = create_app(Settings(home=tmp_path, models_dir=tmp_path))
    state = app.state.mlxserve
    closed: list[str] = []

    async def broken() -> None:
        closed.append("mcp")
        raise RuntimeError("the MCP session broke")

    async def manager_close() -> None:
        closed.append("manager")

    def chats_close() -> None:
        closed.append("chats")

    state.mcp.close = broken
    state.manager.close = manager_close
    state.chats.close = chats_close
    with caplog.at_level(logging.ERROR), TestClient(app):
        pass
    assert closed == ["mcp", "manager", "chats"]
    assert "closing the MCP sessions failed" in caplog.text
