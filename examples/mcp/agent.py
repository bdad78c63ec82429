"""An MCP agent that reaches a tool server on another node through pqtunnel.

The MCP SDK's stdio client normally launches the server itself. Here it launches
``pqtunnel connect PEER/SERVICE`` instead. That splices stdin/stdout through the encrypted
tunnel to a server process the peer's daemon starts, so nothing in this file is
tunnel-specific.

    python3 agent.py --peer bob --service tools --home ~/.alice [--pqtunnel "pqtunnel"] [--json]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any

import anyio
from mcp import Client, MCPError, StdioServerParameters

#: What the agent asks for: (tool, arguments). The sha256 input is fixed so callers can check it.
CALLS: list[tuple[str, dict[str, Any]]] = [
    ("add", {"a": 2, "b": 40}),
    ("sha256", {"text": "post-quantum hello"}),
    ("whoami", {}),
]
TIMEOUT = 60.0


def connect_command(peer: str, service: str, home: str | None, pqtunnel: str = "pqtunnel") -> list[str]:
    """The transport: ``pqtunnel connect`` as the stdio "server" command."""
    return [*shlex.split(pqtunnel), "connect", f"{peer}/{service}", *(["--home", home] if home else [])]


async def use_tools(command: list[str]) -> dict[str, Any]:
    """List the remote tools and make each call in CALLS; returns a JSON-able report."""
    params = StdioServerParameters(command=command[0], args=command[1:])
    with anyio.fail_after(TIMEOUT):
        async with Client(params, read_timeout_seconds=TIMEOUT) as client:
            listing = await client.list_tools()
            calls = []
            for name, arguments in CALLS:
                result = await client.call_tool(name, arguments)
                structured = result.structured_content or {}  # plain returns come wrapped as {"result": x}
                calls.append({"tool": name, "arguments": arguments, "is_error": result.is_error,
                              "result": structured.get("result", structured)})
            server, version = client.server_info, client.protocol_version
    return {"command": command, "protocol_version": version, "server": server.name if server else None,
            "tools": {tool.name: tool.description for tool in listing.tools}, "calls": calls}


def print_report(report: dict[str, Any]) -> None:
    """Human-readable version of the report from use_tools."""
    print(f"server {report['server']!r}, MCP {report['protocol_version']}, via: {shlex.join(report['command'])}")
    print(f"tools: {', '.join(sorted(report['tools']))}")
    for call in report["calls"]:
        args = ", ".join(f"{key}={value!r}" for key, value in call["arguments"].items())
        status = " (error)" if call["is_error"] else ""
        print(f"  {call['tool']}({args}) -> {call['result']!r}{status}")


def _leaves(error: BaseException) -> list[BaseException]:
    """The SDK's task groups nest failures in exception groups; the leaves say what went wrong."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Call MCP tools on a pqtunnel peer's stdio service.")
    parser.add_argument("--peer", default="bob", help="peer node name (default bob)")
    parser.add_argument("--service", default="tools", help="the peer's exec service (default tools)")
    parser.add_argument("--home", help="this node's pqtunnel home (default: pqtunnel's own default)")
    parser.add_argument("--pqtunnel", default="pqtunnel",
                        help='command that runs pqtunnel, split like a shell would (default "pqtunnel")')
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    failure: str | None = None
    try:
        report = anyio.run(use_tools, connect_command(args.peer, args.service, args.home, args.pqtunnel))
    except* (MCPError, OSError, TimeoutError) as group:  # e.g. unknown service, peer down, no pqtunnel
        failure = "; ".join(sorted({str(leaf) or type(leaf).__name__ for leaf in _leaves(group)}))
    if failure is not None:
        print(f"agent: no MCP session with {args.peer}/{args.service}: {failure} (pqtunnel's reason, if any, is above)",
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 1 if any(call["is_error"] for call in report["calls"]) else 0


if __name__ == "__main__":
    sys.exit(main())
