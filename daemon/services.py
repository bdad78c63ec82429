"""The serving side of streams: a peer asks for a named service or a port; we connect it.

TCP services are spliced to a fresh connection; exec services (stdio, e.g. an MCP tool
server) get one process per stream, with stdin/stdout spliced to the stream, stderr logged,
and the process killed and reaped when the stream ends.
"""

from __future__ import annotations

import ipaddress
import socket
import subprocess
from typing import Any, Protocol

import trio

from pqtunnel import mux
from pqtunnel.errors import PqtunnelError

from pqtunnel.identity import Identity

from .config import Address, ExecService, NodeConfig
from .logs import LOG
from .splice import EXPECTED_ERRORS, Duplex, bridge
from .netio import os_reason as _os_reason
from .streams import TunnelStream



class ServiceHost(Protocol):
    """What serving a stream needs from the node: its name and its service table."""

    config: NodeConfig
    identity: Identity

CONNECT_TIMEOUT = 10.0
KILL_GRACE = 2.0


class Refusal(PqtunnelError):
    def __init__(self, code: mux.ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def describe(target: dict[str, Any]) -> str:
    if "service" in target:
        return f"service {target['service']}"
    return f"port {target.get('port')}"


def resolve(node: ServiceHost, target: dict[str, Any]) -> Address | ExecService:
    """Map a stream target to what this node serves, or refuse with the reason."""
    service, port = target.get("service"), target.get("port")
    if isinstance(service, str):
        found = node.config.services.get(service)
        if found is None:
            raise Refusal(mux.ErrorCode.UNKNOWN_SERVICE, f"{node.identity.name} has no service {service!r}")
        return found
    if isinstance(port, int) and not isinstance(port, bool):
        if port not in node.config.allowed_ports:
            raise Refusal(mux.ErrorCode.NOT_ALLOWED, f"port {port} on {node.identity.name} is not allowed")
        return Address("127.0.0.1", port)
    raise Refusal(mux.ErrorCode.PROTOCOL_ERROR, "stream target names neither a service nor a port")


async def serve_stream(node: ServiceHost, stream: TunnelStream) -> None:
    """Own one inbound stream from accept to close; never lets an error escape."""
    what = describe(stream.target)
    try:
        backend = resolve(node, stream.target)
        if isinstance(backend, ExecService):
            await _serve_exec(stream, backend, what)
        else:
            await _serve_tcp(stream, backend, what)
    except Refusal as refusal:
        LOG.info("refused stream %d from %s to %s: %s", stream.stream_id, stream.peer, what, refusal)
        stream.refuse(refusal.code, str(refusal))
    except (PqtunnelError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        LOG.info("stream %d from %s to %s ended: %s", stream.stream_id, stream.peer, what, _os_reason(exc) if isinstance(exc, OSError) else exc)
        await stream.aclose()
    except Exception as exc:  # a bug costs one stream, never the session
        LOG.warning("stream %d from %s to %s failed: %s: %s", stream.stream_id, stream.peer, what, type(exc).__name__, exc)
        await stream.aclose()


async def _serve_tcp(stream: TunnelStream, address: Address, what: str) -> None:
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            target = await connect_tcp(address.host, address.port)
    except (OSError, trio.TooSlowError) as exc:
        reason = "timed out" if isinstance(exc, trio.TooSlowError) else _os_reason(exc)
        raise Refusal(mux.ErrorCode.REFUSED, f"{what} ({address}): {reason}") from None
    async with target:
        stream.accept()
        LOG.debug("stream %d: %s -> %s (%s)", stream.stream_id, stream.peer, what, address)
        await bridge(stream, target)
    LOG.info("stream %d: %s -> %s closed (%d B in, %d B out)", stream.stream_id, stream.peer, what,
             stream.bytes_in, stream.bytes_out)


async def connect_tcp(host: str, port: int) -> trio.SocketStream:
    """Connect; an IP literal (the usual service target) skips trio's resolver machinery."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return await trio.open_tcp_stream(host, port)
    sock = trio.socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def _serve_exec(stream: TunnelStream, service: ExecService, what: str) -> None:
    try:
        process = await trio.lowlevel.open_process(list(service.argv), stdin=subprocess.PIPE,
                                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as exc:
        raise Refusal(mux.ErrorCode.UNREACHABLE, f"{what} failed to start {service.argv[0]!r}: {_os_reason(exc)}") from None
    error: BaseException | None = None
    try:  # from here on, whatever happens, the process is killed and reaped
        stream.accept()
        LOG.info("stream %d: %s -> %s (pid %d)", stream.stream_id, stream.peer, what, process.pid)
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_log_stderr, process.stderr, what, process.pid)
            try:
                await bridge(stream, Duplex(process.stdout, process.stdin))
            except EXPECTED_ERRORS as exc:
                error = exc
            else:
                with trio.move_on_after(KILL_GRACE):  # both directions ended: let it exit by itself
                    await process.wait()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await _reap(process)
    if error is not None:
        raise error
    LOG.info("stream %d: %s -> %s closed, exit status %s", stream.stream_id, stream.peer, what, process.returncode)


async def _log_stderr(stderr: trio.abc.ReceiveStream, what: str, pid: int) -> None:
    buffer = b""
    while True:
        try:
            chunk = await stderr.receive_some(65536)
        except EXPECTED_ERRORS:
            chunk = b""
        if not chunk:
            break
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            LOG.info("%s[%d] stderr: %s", what, pid, line.decode(errors="replace")[:500])
        buffer = buffer[-4096:]
    if buffer:
        LOG.info("%s[%d] stderr: %s", what, pid, buffer.decode(errors="replace")[:500])


async def _reap(process: trio.Process) -> None:
    """Terminate, then kill, and always wait: no zombies, no orphans."""
    if process.returncode is None:
        process.terminate()
        with trio.move_on_after(KILL_GRACE):
            await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()
    for pipe in (process.stdin, process.stdout, process.stderr):
        if pipe is not None:
            await trio.aclose_forcefully(pipe)
