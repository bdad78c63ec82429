"""``pqtunnel forward LOCAL_PORT PEER/SERVICE`` (like ``ssh -L``).

The CLI process listens on 127.0.0.1:LOCAL_PORT and, for each connection it accepts, asks
the daemon for a new stream over the control socket, exactly as ``pqtunnel connect`` does,
then splices the two through the connect channel (daemon/pipe.py).

Why here and not a listener inside the daemon: the forward lives exactly as long as the
command (Ctrl-C ends it, nothing is left behind in the daemon), it needs no new daemon state
that a reload or restart would have to keep, each connection is an ordinary connect request
the daemon already serves and audits, and a daemon restart only fails the connections made
while it is down: the forward itself keeps running.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import sys
from functools import partial
from pathlib import Path
from typing import Any

import trio

from pqtunnel.errors import ConfigError, UserError

from . import control
from .pipe import RECEIVE_SIZE, FrameDecoder, FrameKind, check_reply
from .splice import EXPECTED_ERRORS, half_close, pump
from .targets import describe

LOCAL_HOST = "127.0.0.1"
ANSWER_TIMEOUT = 30.0


def run_forward(home: Path, local_port: int, peer: str, target: dict[str, Any]) -> int:
    """Forward until Ctrl-C (then exit 0); refuses at once if the port is taken or no daemon runs."""
    if not 0 <= local_port <= 65535:
        raise ConfigError(f"local port {local_port}: expected 0-65535 (0: any free port)")
    control.call(home, {"cmd": "status"}, timeout=10)  # no daemon: say so now, not at the first connection
    try:
        trio.run(_forward, home, local_port, peer, target)
    except KeyboardInterrupt:  # Ctrl-C before the signal watcher started
        pass
    print(f"stopped forwarding to {describe(peer, target)}", file=sys.stderr)
    return 0


async def _forward(home: Path, local_port: int, peer: str, target: dict[str, Any]) -> None:
    try:
        listeners = await trio.open_tcp_listeners(local_port, host=LOCAL_HOST)
    except OSError as exc:
        raise UserError(f"cannot listen on {LOCAL_HOST}:{local_port}: {exc.strerror or exc}") from None
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(_stop_on_signal, nursery.cancel_scope)  # before we say we are ready
        nursery.start_soon(partial(trio.serve_listeners, partial(_serve_one, home, peer, target), listeners))
        print(f"forwarding {LOCAL_HOST}:{port} to {describe(peer, target)} (Ctrl-C to stop)", flush=True)


async def _stop_on_signal(scope: trio.CancelScope, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Ctrl-C or SIGTERM: stop accepting and end every forwarded connection, then exit 0."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for _ in signals:
            scope.cancel()
            return


async def _serve_one(home: Path, peer: str, target: dict[str, Any], local: trio.SocketStream) -> None:
    """One accepted connection: one stream. Its failure is one line on stderr, never the end
    of the forward; the local application sees a reset, not a clean end."""
    async with local:
        try:
            error = await _relay_through_daemon(home, peer, target, local)
        except UserError as exc:
            error = str(exc)
        except EXPECTED_ERRORS:
            return  # the local application went away: closing the control socket resets the stream
        if error is not None:
            print(f"pqtunnel: {describe(peer, target)}: {error}", file=sys.stderr, flush=True)
            _reset(local)


async def _relay_through_daemon(home: Path, peer: str, target: dict[str, Any],
                                local: trio.SocketStream) -> str | None:
    daemon, early = await open_connect(home, peer, target)
    async with daemon:
        return await relay(local, daemon, early)


async def open_connect(home: Path, peer: str, target: dict[str, Any]) -> tuple[trio.SocketStream, bytes]:
    """The trio twin of ``control.open_pipe``: a connect request, and the channel once open."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(str(control.socket_path(home)))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise control.not_running(home) from None
    stream = trio.SocketStream(sock)
    try:
        await stream.send_all(json.dumps({"cmd": "connect", "peer": peer, "target": target}).encode() + b"\n")
        buffer = bytearray()
        with trio.fail_after(ANSWER_TIMEOUT):
            while b"\n" not in buffer and (chunk := await stream.receive_some(65536)):
                buffer += chunk
        line, _, early = bytes(buffer).partition(b"\n")
        check_reply(line)
    except trio.TooSlowError:
        await stream.aclose()
        raise UserError(f"the daemon did not answer within {ANSWER_TIMEOUT:.0f} s") from None
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream, early


async def relay(local: trio.SocketStream, daemon: trio.SocketStream, early: bytes) -> str | None:
    """Splice ``local`` and the connect channel; None after a clean end, else the reason.
    If ``local`` fails either way, the splice stops and closing the channel resets the stream."""
    outcome: str | None = None
    async with trio.open_nursery() as nursery:
        async def upload() -> None:
            try:
                await pump(local, daemon)
            except EXPECTED_ERRORS:
                nursery.cancel_scope.cancel()

        nursery.start_soon(upload)
        outcome = await _download(daemon, local, early)
        nursery.cancel_scope.cancel()
    return outcome


async def _download(daemon: trio.SocketStream, local: trio.SocketStream, early: bytes) -> str | None:
    decoder = FrameDecoder()
    data = early
    while True:
        for kind, payload in decoder.feed(data):
            if kind is FrameKind.DATA:
                await local.send_all(payload)
            elif kind is FrameKind.EOF:
                await half_close(local)
            elif kind is FrameKind.DONE:
                return None
            else:
                return payload.decode(errors="replace")
        try:
            data = await daemon.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, OSError) as exc:
            return f"the connection to the daemon broke ({exc})"
        if not data:
            return "the daemon closed the stream without saying how it ended (did it stop?)"


def _reset(local: trio.SocketStream) -> None:
    """Close with a TCP reset (SO_LINGER 0), so the application sees an error, not a clean end."""
    try:
        local.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
