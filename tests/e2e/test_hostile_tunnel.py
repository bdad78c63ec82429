"""A hostile, authenticated peer against the composed tunnel core of a real daemon.

Mallory is pinned on bob, so she gets a session; then she drives the library by hand
(``Tunnel`` over a real socket) and breaks the rules of records, rekey, close and the
mux framing. Each time bob must blame her (a ``RemoteProtocolError``, never an internal
error or a traceback), bound his memory, and keep serving alice.
"""

from __future__ import annotations

import re
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

import msgpack
import pytest
import trio

from pqtunnel import mux
from pqtunnel.crypto import backend as prim
from pqtunnel.handshake import InitiatorHandshake
from pqtunnel.records import ContentType
from pqtunnel.tunnel import DataReceived, Established, GoAwayReceived, PeerClosed, Rekeyed, StreamAccepted, Tunnel
from tests.nodes import hostile_lab, pq

pytestmark = pytest.mark.e2e


def now_ms() -> int:
    return int(time.monotonic() * 1000)


def wall_ms() -> int:
    return int(time.time() * 1000)


BOB_CONFIG = (
    f'[services]\ncat = {{ exec = ["{sys.executable}", "-c", '
    '"import sys; sys.stdout.write(sys.stdin.readline()); sys.stdout.flush()"] }\n'
    "[timers]\nkeepalive = 1\nrekey_after = 2\n")  # every tick pings; bob starts rekeys on his own


@pytest.fixture
def bob(tmp_path: Path) -> Iterator[dict]:
    with hostile_lab(tmp_path, BOB_CONFIG) as lab:
        yield lab


async def session(port: int, identity, rcvbuf: int | None = None) -> tuple[trio.SocketStream, Tunnel]:  # type: ignore[no-untyped-def]
    """A real handshake; returns the socket and mallory's tunnel, established."""
    sock = trio.socket.socket()
    if rcvbuf is not None:  # a tiny receive buffer: bob's writes back up quickly when we stop reading
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    tunnel = Tunnel(InitiatorHandshake(identity, lambda peer: "bob"), now_ms=now_ms())
    tunnel.start(now_ms(), wall_ms())
    await stream.send_all(b"".join(tunnel.buffers_to_send()))
    while True:
        data = await stream.receive_some(65536)
        assert data, "bob closed the connection during the handshake"
        events = tunnel.receive_data(data, now_ms(), wall_ms())
        await stream.send_all(b"".join(tunnel.buffers_to_send()))
        if any(isinstance(e, Established) for e in events):
            return stream, tunnel


def seal(tunnel: Tunnel, content_type: ContentType, data: bytes = b"") -> bytes:
    assert tunnel.session.records is not None
    return tunnel.session.records.seal(content_type, data)


def frame(frame_type: int, stream_id: int, payload: bytes = b"") -> bytes:
    return mux.HEADER.pack(frame_type, 0, stream_id, len(payload)) + payload


async def read_events(stream: trio.SocketStream, tunnel: Tunnel, seconds: float = 2.0) -> list:
    """Mallory's view of bob's answer, until bob hangs up (or ``seconds`` pass)."""
    events: list = []
    with trio.move_on_after(seconds):
        while data := await stream.receive_some(1 << 20):
            events += tunnel.receive_data(data, now_ms(), wall_ms())
            if tunnel.closed:
                break
    return events


def assert_bob_healthy(bob: dict) -> None:
    assert bob["daemon"].process.poll() is None
    assert pq("ping", "bob", home=bob["alice_home"]).returncode == 0  # alice is unaffected
    logs = bob["daemon"].logs()
    assert "Traceback" not in logs and "internal error" not in logs, logs


# --- findings ---------------------------------------------------------------------------------


def test_a_closed_tunnel_ignores_ticks() -> None:
    """The shell keeps ticking while it flushes a CLOSE; a closed session must not PING."""
    from pqtunnel.handshake import ResponderHandshake
    from pqtunnel.identity import Identity

    a, b = Identity.generate("a"), Identity.generate("b")
    initiator = Tunnel(InitiatorHandshake(a, lambda peer: "b"), now_ms=0)
    responder = Tunnel(ResponderHandshake(b, lambda peer: "a", peer_address="192.0.2.1"), now_ms=0)
    initiator.start(0, wall_ms())
    while not (initiator.session.confirmed and responder.session.confirmed):
        responder.receive_data(b"".join(initiator.buffers_to_send()), 0, wall_ms())
        initiator.receive_data(b"".join(responder.buffers_to_send()), 0, wall_ms())
    responder.receive_data(b"".join(initiator.buffers_to_send()), 0, wall_ms())
    responder.close("bye")
    responder.buffers_to_send()
    responder.tick(20_000)  # keepalive due: used to raise SessionStateError (ours) from PING
    assert responder.buffers_to_send() == []


def test_a_close_flushed_to_a_peer_that_does_not_read_is_not_an_internal_error(bob: dict) -> None:
    """Found: bob's ticker kept ticking a closed session while the CLOSE drained; the keepalive
    PING then raised SessionStateError, logged with a traceback as *our* internal error."""

    async def attack() -> None:
        stream, tunnel = await session(bob["port"], bob["mallory"], rcvbuf=4096)
        never_opened = b"".join(frame(mux.FrameType.WINDOW, 2 * i + 1001, b"\0\0\0\1") for i in range(18000))
        for _ in range(5):  # each record makes bob queue ~1.5 MB of RSTs that we never read
            await stream.send_all(seal(tunnel, ContentType.DATA, never_opened))
        await trio.sleep(1.2)  # bob's socket stays full; its keepalive is due at every tick
        await stream.send_all(seal(tunnel, ContentType.CLOSE, b"bye"))
        await trio.to_thread.run_sync(bob["daemon"].wait_for_log, "peer closed the session: bye")
        await stream.aclose()

    trio.run(attack)
    assert_bob_healthy(bob)


def test_peer_text_cannot_forge_log_lines(bob: dict) -> None:
    """Found: CLOSE and GOAWAY reasons and stream targets went to the log verbatim, newlines
    and all (and a CLOSE reason of 256 KiB in full), so a peer could write fake log lines."""
    forged = "\n2099-01-01 00:00:00,000 pqtunneld[bob] WARNING FORGED"

    async def attack() -> None:
        stream, tunnel = await session(bob["port"], bob["mallory"])
        goaway = msgpack.packb({"code": 0, "reason": "bye" + forged})
        opens = frame(mux.FrameType.OPEN, 1, msgpack.packb({"service": "web" + forged}))
        await stream.send_all(seal(tunnel, ContentType.DATA, frame(mux.FrameType.GOAWAY, 0, goaway) + opens))
        await read_events(stream, tunnel, 0.5)
        await stream.send_all(seal(tunnel, ContentType.CLOSE, ("x" * 600 + forged).encode() + b"A" * 100_000))
        await read_events(stream, tunnel)

    trio.run(attack)
    logs = bob["daemon"].wait_for_log("peer closed the session")
    assert not [line for line in logs.splitlines() if line.startswith("2099-01-01")]
    assert "\\n2099-01-01" in logs  # shown, escaped, on the line it belongs to
    close_line = next(line for line in logs.splitlines() if "peer closed the session" in line)
    assert len(close_line) < 512 + 200 and "AAAA" not in close_line  # the reason is cut to 512 bytes
    assert_bob_healthy(bob)


def test_a_rekey_done_with_a_payload_is_refused(bob: dict) -> None:
    """Found: a non-empty REKEY_DONE (section 5: it is empty) was accepted."""

    async def attack() -> None:
        stream, tunnel = await session(bob["port"], bob["mallory"])
        records = tunnel.session.records
        assert records is not None
        plain_seal = records.seal
        records.seal = lambda ct, data=b"": plain_seal(ct, b"junk" if ct is ContentType.REKEY_DONE else data)  # type: ignore[method-assign]
        tunnel.session.start_rekey(now_ms())
        await stream.send_all(b"".join(tunnel.buffers_to_send()))
        with trio.move_on_after(3):
            while not tunnel.session.epoch:
                tunnel.receive_data(await stream.receive_some(65536), now_ms(), wall_ms())
            await stream.send_all(b"".join(tunnel.buffers_to_send()))  # the REKEY_DONE with "junk"
            await read_events(stream, tunnel)

    trio.run(attack)
    bob["daemon"].wait_for_log("REKEY_DONE must be empty, not 4 bytes")
    assert_bob_healthy(bob)


# --- regression guards: attacks that bob already withstands ---------------------------------------


@pytest.mark.parametrize("payload, reason", [
    (frame(mux.FrameType.DATA, 1, b"0123456789")[:-3], "record ended inside a DATA frame on stream 1 (7 of 10"),
    (b"\x01\x00\x00", "record ended inside a frame header (3 of 10 bytes)"),
    (frame(0x08, 0, b"12345678"), "unknown frame type 0x08"),  # the retired mux PING
    (frame(0x09, 1), "unknown frame type 0x09"),  # the retired mux PONG
], ids=["partial-frame", "partial-header", "mux-ping", "mux-pong"])
def test_an_unframeable_record_gets_goaway_then_close(bob: dict, payload: bytes, reason: str) -> None:
    async def attack() -> list:
        stream, tunnel = await session(bob["port"], bob["mallory"])
        for _ in range(3):  # empty DATA records are harmless
            await stream.send_all(seal(tunnel, ContentType.DATA))
        await stream.send_all(seal(tunnel, ContentType.DATA, payload))
        return await read_events(stream, tunnel)

    events = trio.run(attack)
    kinds = [type(e) for e in events]
    assert GoAwayReceived in kinds and PeerClosed in kinds and kinds.index(GoAwayReceived) < kinds.index(PeerClosed)
    assert all(reason in e.reason for e in events if isinstance(e, (GoAwayReceived, PeerClosed)))
    bob["daemon"].wait_for_log(reason)
    assert_bob_healthy(bob)


@pytest.mark.parametrize("attack_name, expected", [
    ("done-first", "REKEY_DONE without a rekey in progress"),
    ("resp-first", "REKEY_RESP without a rekey in progress"),
    ("init-twice", "REKEY_INIT while a previous rekey is unfinished"),
    ("low-order", "peer sent a low-order X25519 rekey key"),
])
def test_rekey_out_of_order_is_the_peers_fault(bob: dict, attack_name: str, expected: str) -> None:
    async def attack() -> None:
        stream, tunnel = await session(bob["port"], bob["mallory"])
        result = tunnel.session.result
        assert result is not None and result.suite.kem is not None
        sizes = prim.KEM_SIZES[result.suite.kem]
        kem_public = tunnel.session.backend.kem_keypair(result.suite.kem, b"\x01" * 64).public_bytes()
        init = prim.x25519_public(b"\x07" * 32) + kem_public
        records = {
            "done-first": [seal(tunnel, ContentType.REKEY_DONE)],
            "resp-first": [seal(tunnel, ContentType.REKEY_RESP, b"\x09" * (32 + sizes.ciphertext))],
            "init-twice": [seal(tunnel, ContentType.REKEY_INIT, init), seal(tunnel, ContentType.REKEY_INIT, init)],
            "low-order": [seal(tunnel, ContentType.REKEY_INIT, b"\0" * 32 + kem_public)],
        }[attack_name]
        await stream.send_all(b"".join(records))
        with trio.move_on_after(2):
            while await stream.receive_some(65536):
                pass

    trio.run(attack)
    bob["daemon"].wait_for_log(expected)
    assert_bob_healthy(bob)


def test_a_rekey_collision_is_won_by_the_initiator_and_streams_keep_flowing(bob: dict) -> None:
    async def attack() -> tuple[bytes, int]:
        stream, tunnel = await session(bob["port"], bob["mallory"])
        await trio.sleep(3)  # bob's rekey timer (2 s) fired: his REKEY_INIT waits unread
        tunnel.session.start_rekey(now_ms())  # ours crosses it; the session initiator's wins
        stream_id = tunnel.open_stream({"service": "cat"})
        await stream.send_all(b"".join(tunnel.buffers_to_send()))
        echoed, rekeys = b"", 0
        with trio.move_on_after(5):
            while echoed != b"through the rekey\n":
                data = await stream.receive_some(65536)
                assert data, "bob hung up"
                for event in tunnel.receive_data(data, now_ms(), wall_ms()):
                    if isinstance(event, StreamAccepted):
                        tunnel.send_data(stream_id, b"through the rekey\n")
                    elif isinstance(event, DataReceived):
                        echoed += event.data
                    elif isinstance(event, Rekeyed):
                        rekeys += 1
                await stream.send_all(b"".join(tunnel.buffers_to_send()))
        return echoed, rekeys

    echoed, rekeys = trio.run(attack)
    assert echoed == b"through the rekey\n" and rekeys >= 1
    assert_bob_healthy(bob)


def test_records_after_close_are_ignored(bob: dict) -> None:
    async def attack() -> None:
        stream, tunnel = await session(bob["port"], bob["mallory"])
        after = [seal(tunnel, ContentType.DATA, frame(mux.FrameType.OPEN, 1, msgpack.packb({"service": "cat"}))),
                 seal(tunnel, ContentType.PING, bytes(16)), seal(tunnel, ContentType.REKEY_DONE)]
        await stream.send_all(seal(tunnel, ContentType.CLOSE, b"bye") + b"".join(after))
        await read_events(stream, tunnel)

    trio.run(attack)
    logs = bob["daemon"].wait_for_log("peer closed the session: bye")
    assert "service cat" not in logs and not re.search(r"REKEY|PING", logs)
    assert_bob_healthy(bob)


def test_a_peer_that_provokes_answers_but_never_reads_is_cut(bob: dict) -> None:
    """WINDOW for never-opened streams costs 14 bytes and is answered by an ~80-byte RST."""

    async def attack() -> None:
        stream, tunnel = await session(bob["port"], bob["mallory"], rcvbuf=4096)
        never_opened = b"".join(frame(mux.FrameType.WINDOW, 2 * i + 1001, b"\0\0\0\1") for i in range(18000))
        with trio.move_on_after(8):
            try:
                while True:
                    await stream.send_all(seal(tunnel, ContentType.DATA, never_opened))
            except trio.BrokenResourceError:
                pass

    trio.run(attack)
    bob["daemon"].wait_for_log("peer is not reading")
    assert_bob_healthy(bob)
