"""MCP servers for the tests, written with the official SDK's server class.

``python tests/mcp_servers.py http PORT LOG`` serves over streamable HTTP on 127.0.0.1:PORT
(``sse`` instead of ``http``: the older SSE transport); ``python tests/mcp_servers.py stdio
LOG`` serves over stdio. Every tool call is appended to LOG as one JSON line, so that a test
can see which calls reached the server.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path
from typing import Literal

import anyio
from mcp.server.mcpserver import MCPServer


def build(log: Path) -> MCPServer:
    server = MCPServer("mlxserve-test")

    def record(tool: str, **arguments: object) -> str:
        token = f"{tool}-{uuid.uuid4().hex[:12]}"
        with log.open("a") as f:
            record = {"tool": tool, "arguments": arguments, "result": token, "pid": os.getpid()}
            f.write(json.dumps(record) + "\n")
        return token

    @server.tool(description="Look up a code word for a colour.")
    def lookup(color: Literal["red", "green"]) -> str:
        return record("lookup", color=color)

    @server.tool(description="Roll a die.")
    def roll(sides: Literal[6, 20]) -> str:
        return record("roll", sides=sides)

    @server.tool(description="Return a very long text.")
    def huge(kind: Literal["text"]) -> str:
        record("huge", kind=kind)
        return "lorem ipsum dolor sit amet " * 10_000

    @server.tool(description="Takes its time.")
    async def sleepy(seconds: Literal[30]) -> str:
        await anyio.sleep(seconds)
        return record("sleepy", seconds=seconds)

    @server.tool(description="Always fails.")
    def broken(kind: Literal["now"]) -> str:
        record("broken", kind=kind)
        raise RuntimeError("the broken tool broke")

    return server


def main(argv: list[str]) -> None:
    transport = argv[0]
    if transport == "stdio":
        build(Path(argv[1])).run("stdio")
        return
    port, log = int(argv[1]), Path(argv[2])
    if transport == "sse":
        build(log).run("sse", host="127.0.0.1", port=port)
    else:
        build(log).run("streamable-http", host="127.0.0.1", port=port)


if __name__ == "__main__":
    main(sys.argv[1:])
