"""The control socket: owner-only unix socket in the node home, one JSON request per line."""

from __future__ import annotations

import json
import os
import socket
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import trio

from pqtunnel.errors import PqtunnelError, UserError

from .accept import DescriptorReserve, serve_listeners
from .config import CONTROL_SOCKET
from .logs import LOG
from .streams import TunnelStream

MAX_REQUEST = 64 * 1024
SOCKET_CHECK_INTERVAL = 2.0
"""Seconds between checks that the control socket file is still ours."""


class DaemonNotRunningError(UserError):
    """No daemon answers on the control socket."""


class DaemonAlreadyRunningError(UserError):
    """A daemon already serves this home: two would share its keys, audit file and socket."""


class ControlApi(Protocol):
    """What the control socket asks of the node: reports, pings and streams."""

    def status(self) -> dict[str, Any]: ...

    def sessions_info(self) -> list[dict[str, Any]]: ...

    def peers_info(self) -> list[dict[str, Any]]: ...

    async def ping(self, peer: str, timeout: float) -> dict[str, Any]: ...

    async def open_stream(self, peer: str, target: dict[str, Any]) -> TunnelStream: ...

    async def reload(self) -> dict[str, Any]: ...

    def pin(self, name: str, fingerprint: str) -> bool: ...

    async def stop(self, reason: str) -> None: ...


async def serve_control(node: ControlApi, path: Path, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the owner's commands; a few descriptors are kept in reserve for them, so
    ``pqtunnel status`` still answers when strangers or peers hold every other descriptor."""
    listener = await _bind_owner_only(path)
    ours = _file_identity(path)
    reserve = DescriptorReserve()
    task_status.started()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_when_socket_removed, node, path, ours)
            await serve_listeners(partial(_serve_client, node), [listener], name="control socket", reserve=reserve)
    finally:
        reserve.close()
        with trio.CancelScope(shield=True):
            await listener.aclose()
        if _file_identity(path) == ours:  # never remove a socket a newer daemon bound there
            path.unlink(missing_ok=True)


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


async def _stop_when_socket_removed(node: ControlApi, path: Path, ours: tuple[int, int] | None) -> None:
    """A daemon whose control socket is gone (its home deleted, the file removed) can no
    longer be asked anything, not even to stop: rather than run on as an orphan, it stops."""
    while _file_identity(path) == ours:
        await trio.sleep(SOCKET_CHECK_INTERVAL)
    LOG.warning("control socket %s was removed (home deleted?): no command can reach this daemon, "
                "so it stops", path)
    await node.stop("control socket removed")


async def _bind_owner_only(path: Path) -> trio.SocketListener:
    if path.exists():
        if _socket_alive(path):
            raise DaemonAlreadyRunningError(f"another daemon is already running on {path}")
        path.unlink()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(64)
    return trio.SocketListener(sock)


def _socket_alive(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


async def _serve_client(node: ControlApi, stream: trio.SocketStream) -> None:
    async with stream:
        try:
            request, early = await _read_line(stream)
            if request.get("cmd") == "connect":
                await _serve_connect(node, stream, request, early)
                return
            response = await _dispatch(node, request)
        except PqtunnelError as exc:
            response = {"ok": False, "error": str(exc)}
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return  # the local client went away
        except Exception as exc:  # a bad request or a bug answers this client only
            LOG.warning("control request failed: %s: %s", type(exc).__name__, exc)
            response = {"ok": False, "error": f"internal error: {type(exc).__name__}"}
        try:
            await stream.send_all(json.dumps(response).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def _serve_connect(node: ControlApi, stream: trio.SocketStream, request: dict[str, Any], early: bytes) -> None:
    """``pqtunnel connect`` and ``forward``: answer one JSON line, then run the connect
    channel (daemon/pipe.py): raw bytes in, frames out, ending with how the stream ended."""
    from .pipe import serve_pipe

    peer, target = request.get("peer"), request.get("target")
    if not isinstance(peer, str) or not isinstance(target, dict):
        raise UserError("connect needs a peer and a target")
    tunnel = await node.open_stream(peer, target)
    try:
        await stream.send_all(json.dumps({"ok": True}).encode() + b"\n")
        await serve_pipe(stream, tunnel, early, f"{peer} {target}")
    finally:
        await tunnel.aclose()


async def _read_line(stream: trio.SocketStream) -> tuple[dict[str, Any], bytes]:
    """One JSON request line, plus any bytes the client sent after it."""
    buffer = bytearray()
    while b"\n" not in buffer:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        buffer += chunk
        if len(buffer) > MAX_REQUEST:
            raise UserError("control request too large")
    line, _, rest = bytes(buffer).partition(b"\n")
    try:
        request = json.loads(line or b"{}")
    except ValueError:
        raise UserError("control request is not JSON") from None
    if not isinstance(request, dict):
        raise UserError("control request must be a JSON object")
    return request, rest


async def _dispatch(node: ControlApi, request: dict[str, Any]) -> dict[str, Any]:
    command = request.get("cmd")
    if command == "status":
        return {"ok": True, **node.status()}
    if command == "sessions":
        return {"ok": True, "sessions": node.sessions_info()}
    if command == "peers":
        return {"ok": True, "peers": node.peers_info()}
    if command == "ping":
        peer = request.get("peer")
        timeout = request.get("timeout", 10)
        if not isinstance(peer, str):
            raise UserError("ping needs a peer name")
        if not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
            raise UserError("ping timeout must be a number of seconds between 0 and 3600")
        LOG.debug("control: ping %s", peer)
        return {"ok": True, **await node.ping(peer, float(timeout))}
    if command == "reload":
        return {"ok": True, **await node.reload()}
    if command == "trust":
        name, fingerprint = request.get("name"), request.get("fingerprint")
        if not isinstance(name, str) or not isinstance(fingerprint, str):
            raise UserError("trust needs a name and a fingerprint")
        return {"ok": True, "added": node.pin(name, fingerprint)}
    raise UserError(f"unknown control command {command!r}")


def socket_path(home: Path) -> Path:
    return home / CONTROL_SOCKET


def not_running(home: Path) -> DaemonNotRunningError:
    return DaemonNotRunningError(f"no daemon is running for {home} (start one with: pqtunnel up --home {home})")


def refuse_if_running(home: Path) -> None:
    """``pqtunnel up`` on a home whose daemon runs: refused before anything is touched
    (the audit file rotated, the nonce store opened)."""
    path = socket_path(home)
    if path.exists() and _socket_alive(path):
        raise DaemonAlreadyRunningError(f"another daemon is already running for {home} ({path} answers)")


def _connect_socket(home: Path, timeout: float | None) -> socket.socket:
    path = socket_path(home)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
        sock.close()
        raise not_running(home) from None
    except PermissionError:
        sock.close()
        raise UserError(f"permission denied on {path}: the control socket belongs to another user") from None
    return sock


def open_pipe(home: Path, peer: str, target: dict[str, Any], timeout: float = 30.0) -> tuple[socket.socket, bytes]:
    """Ask the daemon for a stream; returns the socket, now the connect channel
    (daemon/pipe.py), and the bytes of it that arrived with the answer."""
    from .pipe import check_reply

    sock = _connect_socket(home, timeout)
    try:
        sock.sendall(json.dumps({"cmd": "connect", "peer": peer, "target": target}).encode() + b"\n")
        buffer = bytearray()
        while b"\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buffer += chunk
        line, _, rest = bytes(buffer).partition(b"\n")
        check_reply(line)
    except socket.timeout:
        sock.close()
        raise UserError(f"the daemon did not answer within {timeout:.0f} s") from None
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    return sock, rest


def call(home: Path, request: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Blocking client used by the CLI; raises DaemonNotRunningError with a helpful hint."""
    sock = _connect_socket(home, timeout)
    try:
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = bytearray()
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        raise UserError(f"the daemon did not answer within {timeout:.0f} s") from None
    finally:
        sock.close()
    try:
        response = json.loads(data)
    except ValueError:
        raise UserError("the daemon sent an unreadable answer") from None
    if not response.get("ok"):
        raise UserError(response.get("error", "the daemon refused the request"))
    return response
