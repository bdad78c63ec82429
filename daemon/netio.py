"""Socket helpers shared by the shell: scatter-gather writes, TCP_NODELAY, clocks, OS reasons."""

from __future__ import annotations

import errno
import os
import socket
import time
from typing import Any

import trio

IOV_BATCH = 512  # below the kernel's IOV_MAX (1024)
RECEIVE_SIZE = 64 * 1024  # what trio reads when asked for "some"
YIELD_EVERY = 256 * 1024
"""A ``DirectStream`` lets other tasks run at least once per this many bytes it moved
without waiting, so a bulk copy never starves the session's reader or other streams."""
_CLOSED_ERRNOS = frozenset({errno.EBADF, errno.ENOTSOCK})


def monotonic_ms() -> int:
    """Every timer runs on this: a wall-clock step (NTP) can neither fake a dead peer nor skip a rekey."""
    return int(time.monotonic() * 1000)


def wall_ms() -> int:
    """Wall-clock time, only for timestamps on the wire (HELLO) and in logs."""
    return int(time.time() * 1000)


def _consume(views: list[memoryview], index: int, sent: int) -> int:
    """Drop ``sent`` bytes from the front of ``views[index:]``; returns the new index."""
    while sent and index < len(views):
        size = len(views[index])
        if sent >= size:
            sent -= size
            index += 1
        else:
            views[index] = views[index][sent:]
            sent = 0
    return index


async def send_buffers(sock: trio.socket.SocketType, buffers: list[bytes | memoryview]) -> None:
    """Scatter-gather send: record headers and ciphertexts go out without being joined."""
    views = [memoryview(b) for b in buffers]
    index = 0
    while index < len(views):
        index = _consume(views, index, await sock.sendmsg(views[index : index + IOV_BATCH]))


def write_now(fd: int, buffers: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """Non-blocking scatter write; returns what the socket did not take. On an error it
    returns everything, so the writer task meets the error and closes with its reason."""
    views = [memoryview(b) for b in buffers]
    index = 0
    while index < len(views):
        try:
            sent = os.writev(fd, views[index : index + IOV_BATCH])
        except OSError:  # EAGAIN included: the writer task waits for writability
            break
        index = _consume(views, index, sent)
    return list(views[index:])


class DirectStream:
    """A local TCP socket (SOCKS client, service) with trio's stream interface, minus the
    trip through the scheduler after every read and write that did not have to wait.

    trio yields to the scheduler on every socket call, ready or not: a new stream's few
    small messages cost a pass of the run loop (and an epoll_wait) each. Here a call that
    the socket answers at once returns at once; only a call that would block waits (for
    readability or writability, a checkpoint). Fairness is kept by yielding once per
    ``YIELD_EVERY`` bytes moved without waiting. Errors are trio's (BrokenResourceError
    with the OSError as cause, ClosedResourceError), so callers see no difference.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.socket = stream.socket
        self._unyielded = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        size = RECEIVE_SIZE if max_bytes is None else max_bytes
        if size < 1:
            raise ValueError("max_bytes must be >= 1")
        while True:
            try:
                data = os.read(self.socket.fileno(), size)  # -1 once closed: EBADF
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.socket)
                self._unyielded = 0
                continue
            except OSError as exc:
                raise _stream_error(exc) from (None if exc.errno in _CLOSED_ERRNOS else exc)
            await self._moved(len(data))
            return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with memoryview(data) as view:
            sent = 0
            while sent < len(view):
                try:
                    sent += os.write(self.socket.fileno(), view[sent:])
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self.socket)
                    self._unyielded = 0
                except OSError as exc:
                    raise _stream_error(exc) from (None if exc.errno in _CLOSED_ERRNOS else exc)
            await self._moved(sent)

    async def _moved(self, size: int) -> None:
        self._unyielded += size
        if self._unyielded >= YIELD_EVERY:
            self._unyielded = 0
            await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()

    def setsockopt(self, level: int, option: int, value: Any) -> None:
        self.stream.setsockopt(level, option, value)


def _stream_error(exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    """The error trio's SocketStream raises for ``exc``."""
    if exc.errno in _CLOSED_ERRNOS:
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


def set_nodelay(stream: trio.SocketStream) -> None:
    """No Nagle: a small frame must never wait for a delayed ACK (ssh -D's p99 problem)."""
    try:
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


def os_reason(exc: BaseException) -> str:
    """The most specific OS reason in an exception chain (trio wraps connect errors)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        if isinstance(seen, BaseExceptionGroup) and seen.exceptions:
            seen = seen.exceptions[-1]
        else:
            seen = seen.__cause__ or seen.__context__
    return str(exc) or type(exc).__name__


def remote_of(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "unknown"
    return f"{host}:{port}"
