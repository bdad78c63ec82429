"""Spec for the connect channel (daemon/pipe.py) and connect/forward targets (daemon/targets.py).

The channel runs over a real socketpair here: the daemon's side (``serve_pipe``, under trio)
against the client's side (``relay_stdio``, blocking, with real pipes for stdin and stdout),
with a fake tunnel stream that ends cleanly, by reset, or by session loss on command.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any, Callable

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from pqtunnel.errors import UserError
from pqtunneld.pipe import (HEADER, MAX_PAYLOAD, DaemonGoneError, FrameDecoder, FrameKind, PipeProtocolError,
                            RemoteStreamError, check_reply, encode, relay_stdio, serve_pipe)
from pqtunneld.streams import StreamError
from pqtunneld.targets import TargetError, describe, parse_host_port, parse_target

# --- frames -------------------------------------------------------------------------------------------


def test_a_frame_is_kind_length_payload() -> None:
    assert encode(FrameKind.DATA, b"hi") == b"\x01\x00\x00\x00\x02hi"
    assert encode(FrameKind.EOF) == b"\x02\x00\x00\x00\x00"
    assert encode(FrameKind.DONE) == b"\x03\x00\x00\x00\x00"
    assert encode(FrameKind.ERROR, b"stream reset by bob") == b"\x04\x00\x00\x00\x13stream reset by bob"


@given(st.lists(st.tuples(st.sampled_from(list(FrameKind)), st.binary(max_size=300)), max_size=12),
       st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=8))
def test_frames_survive_any_split_of_the_byte_stream(frames: list[tuple[FrameKind, bytes]], cuts: list[int]) -> None:
    wire = b"".join(encode(kind, payload) for kind, payload in frames)
    decoder, got, offset, i = FrameDecoder(), [], 0, 0
    while offset < len(wire):
        size = cuts[i % len(cuts)]
        got += decoder.feed(wire[offset:offset + size])
        offset, i = offset + size, i + 1
    assert got == frames and decoder.pending == 0


def test_an_unknown_kind_or_an_oversized_frame_is_refused() -> None:
    with pytest.raises(PipeProtocolError, match="kind 9"):
        FrameDecoder().feed(HEADER.pack(9, 0))
    with pytest.raises(PipeProtocolError, match="unreadable"):
        FrameDecoder().feed(HEADER.pack(FrameKind.DATA, MAX_PAYLOAD + 1))


def test_the_daemons_reply_line_opens_the_channel_or_says_why_not() -> None:
    check_reply(b'{"ok": true}')
    with pytest.raises(UserError, match="bob has no service 'nosuch'"):
        check_reply(b'{"ok": false, "error": "bob has no service \'nosuch\'"}')
    with pytest.raises(DaemonGoneError):
        check_reply(b"")


# --- both sides over a real socket ------------------------------------------------------------------------


class FakeTunnelStream:
    """A tunnel stream that sends ``chunks`` and then ends as ``ending`` says; records what it got."""

    def __init__(self, chunks: list[bytes], ending: str) -> None:
        self.chunks = list(chunks)
        self.ending = ending
        self.received = bytearray()
        self.eof = trio.Event()
        self.closed = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.chunks:
            return self.chunks.pop(0)
        if self.ending == "reset":
            raise StreamError("stream reset by bob: service web: connection reset by peer")
        if self.ending == "lost":
            raise StreamError("session with bob ended: peer closed the connection")
        await self.eof.wait()  # a service that answers after our EOF, then ends cleanly
        return b""

    async def send_all(self, data: Any) -> None:
        self.received += data

    async def send_eof(self) -> None:
        self.eof.set()

    async def aclose(self) -> None:
        self.closed = True


def run_channel(tunnel: FakeTunnelStream, stdin: bytes) -> tuple[bytes, BaseException | None]:
    """Daemon side in a trio thread, client side here with real pipes; returns (stdout, error)."""
    daemon_end, client_end = socket.socketpair()
    daemon_thread = threading.Thread(target=trio.run, args=(_daemon, daemon_end, tunnel))
    daemon_thread.start()
    in_read, in_write = os.pipe()
    out_read, out_write = os.pipe()
    os.write(in_write, stdin)
    os.close(in_write)
    output = bytearray()
    reader = threading.Thread(target=_drain, args=(out_read, output))
    reader.start()
    error: BaseException | None = None
    try:
        relay_stdio(client_end, b"", stdin_fd=in_read, stdout_fd=out_write)
    except Exception as exc:
        error = exc
    finally:
        os.close(out_write)
        client_end.close()
        reader.join(10)
        daemon_thread.join(10)
        os.close(in_read)
        os.close(out_read)
    return bytes(output), error


async def _daemon(sock: socket.socket, tunnel: FakeTunnelStream) -> None:
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    async with stream:
        await serve_pipe(stream, tunnel, b"", "bob {'service': 'web'}")


def _drain(fd: int, into: bytearray) -> None:
    while chunk := os.read(fd, 65536):
        into += chunk


def test_a_clean_end_returns_after_every_byte_both_ways() -> None:
    tunnel = FakeTunnelStream([b"hello ", b"world\n"], ending="clean")
    stdout, error = run_channel(tunnel, b"question\n")
    assert error is None
    assert stdout == b"hello world\n" and bytes(tunnel.received) == b"question\n"


@pytest.mark.parametrize(("ending", "reason"), [
    ("reset", "stream reset by bob: service web: connection reset by peer"),
    ("lost", "session with bob ended: peer closed the connection"),
])
def test_a_reset_or_a_lost_session_raises_the_reason_after_the_bytes_before_it(ending: str, reason: str) -> None:
    stdout, error = run_channel(FakeTunnelStream([b"line 1\n", b"line 2\n"], ending=ending), b"")
    assert stdout == b"line 1\nline 2\n"
    assert isinstance(error, RemoteStreamError) and str(error) == reason


def test_a_daemon_that_vanishes_without_a_word_is_an_error() -> None:
    daemon_end, client_end = socket.socketpair()
    daemon_end.sendall(encode(FrameKind.DATA, b"partial"))
    daemon_end.close()
    out_read, out_write = os.pipe()
    in_read, in_write = os.pipe()
    os.close(in_write)
    try:
        with pytest.raises(DaemonGoneError, match="without saying how it ended"):
            relay_stdio(client_end, b"", stdin_fd=in_read, stdout_fd=out_write)
        assert os.read(out_read, 100) == b"partial"
    finally:
        for fd in (out_read, out_write, in_read):
            os.close(fd)
        client_end.close()


# --- targets -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("bob/web", ("bob", {"service": "web"})),
    ("bob.pq/web", ("bob", {"service": "web"})),
    ("Bob:8080", ("bob", {"port": 8080})),
])
def test_one_argument_targets(text: str, expected: tuple[str, dict[str, Any]]) -> None:
    assert parse_target(text) == expected


@pytest.mark.parametrize(("host", "port", "expected"), [
    ("web.bob.pq", "9418", ("bob", {"service": "web"})),  # the port is ignored, as through SOCKS
    ("WEB.Bob.PQ.", "1", ("bob", {"service": "web"})),
    ("bob.pq", "22", ("bob", {"port": 22})),
    ("bob", "22", ("bob", {"port": 22})),
])
def test_host_port_targets_mean_what_socks_names_mean(host: str, port: str, expected: tuple[str, dict[str, Any]]) -> None:
    assert parse_host_port(host, port) == expected


@pytest.mark.parametrize(("call", "message"), [
    (lambda: parse_target("bob"), "expected PEER/SERVICE or PEER:PORT"),
    (lambda: parse_target("bob:0"), "expected PEER/SERVICE or PEER:PORT"),
    (lambda: parse_target("-bob/web"), "invalid peer name"),
    (lambda: parse_host_port("bob.example.com", "22"), "is not a .pq name"),
    (lambda: parse_host_port("a.b.bob.pq", "22"), "expected SERVICE.PEER.pq or PEER.pq"),
    (lambda: parse_host_port("bob", "ssh"), "expected a number from 1 to 65535"),
    (lambda: parse_host_port("bob", "65536"), "expected a number from 1 to 65535"),
])
def test_target_mistakes_are_user_errors(call: Callable[[], object], message: str) -> None:
    with pytest.raises(TargetError, match=message):
        call()


def test_targets_are_described_as_the_user_writes_them() -> None:
    assert describe("bob", {"service": "web"}) == "bob/web"
    assert describe("bob", {"port": 22}) == "bob:22"
