"""Socket helpers shared by the shell: scatter-gather writes, TCP_NODELAY, clocks, OS reasons."""

from __future__ import annotations

import errno
import os
import select
import socket
import time

import trio

IOV_BATCH = 512  # below the kernel's IOV_MAX (1024)


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


async def connect_stream(family: int, address: tuple[str, int]) -> trio.SocketStream:
    """Connect a TCP stream, looking before waiting: a connect to this host is complete (or
    refused) by the time ``connect()`` reports EINPROGRESS, so a new stream to a local service
    skips the event loop's wait (an epoll registration and a scheduler pass) in the usual
    case. Raises OSError with the kernel's reason (e.g. ECONNREFUSED)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        error = sock.connect_ex(address)
        if error == errno.EINPROGRESS:
            if not _writable_now(sock):
                await trio.lowlevel.wait_writable(sock)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error))
        return trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    except BaseException:
        sock.close()
        raise


def _writable_now(sock: socket.socket) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    return bool(poller.poll(0))


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
