"""What a serving process imports: libraries that only some requests or commands need stay out
of the server's memory until one does (the MCP SDK ≈30 MB, httpx with its command line's
rich/click/pygments ≈5 MB, jsonschema ≈3 MB for MCP tool calls' arguments), and the first
request that needs one still gets it (the MCP tests check the calls themselves)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

LAZY = ("mcp", "mcp_types", "httpx", "httpx2", "rich", "pygments", "jsonschema")


def _run(tmp_path: Path, body: str) -> dict[str, list[str]]:
    """Runs ``body`` in a fresh interpreter; ``report(name)`` records the lazy modules loaded
    by then under ``name``."""
    script = textwrap.dedent(
        """
        import asyncio, json, sys
        from pathlib import Path

        seen = {}

        def report(name):
            seen[name] = sorted(m for m in LAZY if m in sys.modules)
        """
    )
    script += textwrap.dedent(body) + "\nprint(json.dumps(seen))\n"
    out = subprocess.run(
        [sys.executable, "-c", f"LAZY = {LAZY!r}\n" + script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MLXSERVE_HOME": str(tmp_path / "home")},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result: dict[str, list[str]] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_a_started_server_holds_neither_the_mcp_sdk_nor_httpx_until_a_request_needs_one(
    tmp_path,
):
    seen = _run(
        tmp_path,
        """
        from mlxserve.cli import build_parser, _settings
        from mlxserve.app import create_app
        from mlxserve.core.mcp import McpClients, ServerSpec

        settings = _settings(build_parser().parse_args(["serve", "--port", "0"]))
        app = create_app(settings)

        async def started():
            async with app.router.lifespan_context(app):
                report("serving")

        asyncio.run(started())
        # An image fetched by URL pins its connection without the MCP SDK.
        from mlxserve.core.pinning import PinnedTransport

        PinnedTransport("127.0.0.1")
        report("pinned transport")
        # The first MCP connection of a request is where the SDK is imported, in a thread (the
        # event loop runs on the main thread here).
        import importlib, threading

        real, on_main = importlib.import_module, []

        def spy(name, *args):
            if name == "mlxserve.core.mcp_session":
                on_main.append(threading.current_thread() is threading.main_thread())
            return real(name, *args)

        importlib.import_module = spy
        spec = ServerSpec("tools", (("type", "ephemeral_mcp"),), url="http://127.0.0.1:9/mcp")
        connection = asyncio.run(McpClients(settings)._new(spec))
        report("mcp connection")
        assert type(connection).__name__ == "Connection"
        assert on_main == [False], on_main
        """,
    )
    assert seen["serving"] == []
    assert "mcp" not in seen["pinned transport"] and "httpx2" in seen["pinned transport"]
    assert {"mcp", "mcp_types", "httpx2"} <= set(seen["mcp connection"])


def test_the_first_tool_call_check_imports_jsonschema_in_a_thread_not_on_the_loop(tmp_path):
    seen = _run(
        tmp_path,
        """
        import threading

        # Which thread first looks for jsonschema (a finder is asked only while it is not in
        # sys.modules); the event loop runs on the main thread here.
        on_main = []

        class Spy:
            def find_spec(self, name, path=None, target=None):
                if name == "jsonschema":
                    on_main.append(threading.current_thread() is threading.main_thread())
                return None

        sys.meta_path.insert(0, Spy())
        from mlxserve.core.toolloop import _argument_problem

        report("imported")
        schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
        problem = asyncio.run(_argument_problem({"n": "seven"}, schema))
        assert problem is not None and "integer" in problem, problem
        assert asyncio.run(_argument_problem({"n": 7}, schema)) is None
        report("checked")
        assert on_main == [False], on_main
        """,
    )
    assert "jsonschema" not in seen["imported"]
    assert "jsonschema" in seen["checked"]


def test_the_command_line_client_imports_httpx_when_it_talks_to_a_server(tmp_path):
    seen = _run(
        tmp_path,
        """
        from mlxserve.cli.http import Client

        report("imported")
        assert Client("http://127.0.0.1:9", None).is_up() is None
        report("asked")
        """,
    )
    assert "httpx" not in seen["imported"]
    assert "httpx" in seen["asked"]
