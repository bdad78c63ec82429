"""A small MCP tool server on stdio, meant to run as a pqtunnel exec service.

bob's daemon starts one of these per stream (``[services] tools = { exec = [...] }``) and
splices its stdin/stdout to the tunnel, so the server needs no networking or auth of its own:
only peers bob has pinned can reach it, over a hybrid post-quantum session.

Written against the MCP Python SDK 2.x, where v1's ``FastMCP`` is ``MCPServer``.
"""

from __future__ import annotations

import hashlib
import os
import socket
from typing import TypedDict

from mcp.server.mcpserver import MCPServer

server = MCPServer("pqtunnel-tools", instructions="Example tools served through a pqtunnel exec service.")


class Identity(TypedDict):
    """Where a call really ran: lets the caller check it was bob's process that answered."""

    host: str
    pid: int
    ppid: int


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def sha256(text: str) -> str:
    """Hex SHA-256 of the UTF-8 encoding of ``text``."""
    return hashlib.sha256(text.encode()).hexdigest()


@server.tool()
def whoami() -> Identity:
    """Hostname, pid and parent pid (the pqtunnel daemon that spawned us) of this server."""
    return Identity(host=socket.gethostname(), pid=os.getpid(), ppid=os.getppid())


if __name__ == "__main__":
    server.run("stdio")
