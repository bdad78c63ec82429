"""The connect channel: how ``pqtunnel connect`` and ``pqtunnel forward`` talk to the daemon
once the daemon has answered their ``connect`` request on the control socket.

Client -> daemon: raw bytes for the remote service. ``shutdown(SHUT_WR)`` means "I am done
sending" (the remote side reads EOF); closing the socket outright means "abort" (the daemon
resets the stream).

Daemon -> client: frames ``kind u8 | length u32 (big endian) | payload``:

* ``DATA``: bytes from the remote service;
* ``EOF``: the remote side finished sending (it may still be reading);
* ``DONE``: the stream ended cleanly in both directions (the client exits 0);
* ``ERROR``: the stream ended abnormally (reset by the peer, session lost); the payload is
  the reason in UTF-8 (the client prints it and exits non-zero).

Why frames in one direction only: the client has nothing to say besides its bytes and its
EOF, and a socket says both. The daemon must tell three endings apart (a clean end, a reset,
a lost session) and a raw socket cannot: its EOF looks the same after each. A frame costs
five bytes and no extra system call (header and payload go out in one send), so bulk data
stays as fast as the raw splice it replaces.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
from enum import IntEnum
from typing import Any

import trio

from pqtunnel.errors import PqtunnelError, UserError

from .logs import LOG
from .splice import EXPECTED_ERRORS, bridge, wait_for_hangup
from .streams import TunnelStream

HEADER = struct.Struct(">BI")
MAX_PAYLOAD = 1024 * 1024
"""Frames the daemon sends are at most ``splice.CHUNK`` bytes; anything over this is corruption."""
RECEIVE_SIZE = 256 * 1024
UPLOAD_SIZE = 128 * 1024


class FrameKind(IntEnum):
    DATA = 1
    EOF = 2
    DONE = 3
    ERROR = 4


class PipeProtocolError(UserError):
    """The daemon sent something that is not a connect-channel frame (a version mismatch?)."""


class RemoteStreamError(UserError):
    """The stream ended abnormally: reset by the peer or its session lost. ``str`` is the reason."""


class DaemonGoneError(UserError):
    """The daemon closed the channel without saying how the stream ended (it stopped or crashed)."""


def encode(kind: FrameKind, payload: bytes | bytearray | memoryview = b"") -> bytes:
    """One frame: header and payload in one buffer, so one send carries both."""
    return HEADER.pack(kind, len(payload)) + payload


class FrameDecoder:
    """Cuts frames out of the daemon's byte stream, however the reads split them."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray) -> list[tuple[FrameKind, bytes]]:
        buffer = self._buffer
        buffer += data
        frames: list[tuple[FrameKind, bytes]] = []
        offset = 0
        while len(buffer) - offset >= HEADER.size:
            kind, length = HEADER.unpack_from(buffer, offset)
            if kind not in FrameKind._value2member_map_ or length > MAX_PAYLOAD:
                raise PipeProtocolError(f"the daemon sent an unreadable stream frame (kind {kind}, {length} bytes)")
            end = offset + HEADER.size + length
            if len(buffer) < end:
                break
            frames.append((FrameKind(kind), bytes(buffer[offset + HEADER.size:end])))
            offset = end
        del buffer[:offset]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame still held."""
        return len(self._buffer)


def check_reply(line: bytes) -> None:
    """The daemon's answer to a ``connect`` request: returns if the stream is open, else
    raises a UserError with the daemon's one-line reason."""
    try:
        response: Any = json.loads(line)
    except ValueError:
        raise DaemonGoneError("the daemon closed the connection without answering") from None
    if not isinstance(response, dict) or not response.get("ok"):
        error = response.get("error") if isinstance(response, dict) else None
        raise UserError(error or "the daemon refused the request")


# --- the daemon's side --------------------------------------------------------------------------------


class FramedClient:
    """The local client as a trio stream: what it sends arrives raw, what we send it is framed."""

    def __init__(self, stream: trio.SocketStream, early: bytes) -> None:
        self.stream = stream
        self._early = early

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._early:
            data, self._early = self._early, b""
            return data
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(encode(FrameKind.DATA, data))

    async def send_eof(self) -> None:
        await self.stream.send_all(encode(FrameKind.EOF))

    async def finish(self, error: str | None) -> None:
        """Say how the stream ended; the client may already be gone."""
        frame = encode(FrameKind.DONE) if error is None else encode(FrameKind.ERROR, error.encode())
        try:
            await self.stream.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


async def serve_pipe(client: trio.SocketStream, tunnel: TunnelStream, early: bytes, label: str) -> None:
    """Splice a ``connect`` client to its tunnel stream, then tell it how the stream ended.

    A client that goes away completely (not a half-close) cancels the splice; the caller's
    ``aclose`` of the tunnel stream then resets it, so the remote service sees the abort.
    """
    framed = FramedClient(client, early)
    error: str | None = None
    client_gone = False
    async with trio.open_nursery() as nursery:
        async def cancel_on_hangup() -> None:
            nonlocal client_gone
            await wait_for_hangup(client.socket)
            client_gone = True
            LOG.info("connect to %s: the local client went away", label)
            nursery.cancel_scope.cancel()

        nursery.start_soon(cancel_on_hangup)
        try:
            await bridge(framed, tunnel)
        except PqtunnelError as exc:  # the stream: reset, refused, session lost
            error = str(exc)
            LOG.info("connect to %s ended: %s", label, error)
        except EXPECTED_ERRORS as exc:  # the local socket
            client_gone = True
            LOG.info("connect to %s: the local client went away (%s)", label, exc)
        nursery.cancel_scope.cancel()
    if not client_gone:
        await framed.finish(error)


# --- the client's side (``pqtunnel connect``: blocking sockets, stdin and stdout) ----------------------


class _Output:
    """stdout as a file descriptor: every byte written, and closed (for the reader) at EOF."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.open = True

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view and self.open:
            view = view[os.write(self.fd, view):]

    def close(self) -> None:
        """The remote side is done: the reader of our stdout must see EOF now. The descriptor
        is pointed at /dev/null rather than closed, so Python's exit flush finds it valid."""
        if not self.open:
            return
        self.open = False
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, self.fd)
        finally:
            os.close(null)


def _upload(sock: socket.socket, stdin_fd: int) -> None:
    """stdin -> the daemon, then a half-close, so the remote service reads EOF."""
    try:
        while chunk := os.read(stdin_fd, UPLOAD_SIZE):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the stream ended or the daemon went away: the download side says why


def relay_stdio(sock: socket.socket, early: bytes, stdin_fd: int = 0, stdout_fd: int = 1) -> None:
    """Run ``pqtunnel connect``'s two directions until the daemon says how the stream ended.

    Returns on a clean end; raises RemoteStreamError with the reason after a reset or a lost
    session (after writing every byte that arrived before it), DaemonGoneError if the daemon
    vanished without a word.
    """
    threading.Thread(target=_upload, args=(sock, stdin_fd), daemon=True).start()
    decoder, out = FrameDecoder(), _Output(stdout_fd)
    data = early
    while True:
        for kind, payload in decoder.feed(data):
            if kind is FrameKind.DATA:
                out.write(payload)
            elif kind is FrameKind.EOF:
                out.close()
            elif kind is FrameKind.DONE:
                return
            else:
                raise RemoteStreamError(payload.decode(errors="replace"))
        data = sock.recv(RECEIVE_SIZE)
        if not data:
            raise DaemonGoneError("the daemon closed the stream without saying how it ended (did it stop?)")
