"""Spec for the lab relay (pqlab/relay.py): it forwards and captures real tunnel bytes, and its
parser finds every RECORD header in them, including when a connection was cut mid-frame.

The bytes are made by the real library: alice's tunnel and replica r1's, then alice
resuming the same session on a new connection to replica r2 (RESUME first). The relay
tests run real loopback sockets: a stand-in replica that plays r1's side of the capture.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import pytest

from pqlab.relay import (C2R, R2C, CaptureParseError, InjectError, Relay, records_in, repeated_nonces, scan_frames,
                         serving)
from pqtunnel.handover import StateWrapper
from pqtunnel.handshake import InitiatorHandshake, ResponderHandshake
from pqtunnel.identity import Identity
from pqtunnel.leases import CounterLease, Granted, counter_key_id
from pqtunnel.session import Session
from pqtunnel.tunnel import CountersNeeded, Tunnel
from pqtunnel.wire import FrameDecoder, Kind
from tests.conftest import NOW_MS, PEER_ADDRESS, accept_as

MONO = 7_000


@dataclass
class Wire:
    """The bytes of one connection, per direction, as the peers wrote them."""

    c2r: bytearray
    r2c: bytearray


def pump(a: Tunnel, r: Tunnel, wire: Wire) -> list:
    events: list = []
    for _ in range(20):
        from_a, from_r = b"".join(a.buffers_to_send()), b"".join(r.buffers_to_send())
        if not from_a and not from_r:
            return events
        wire.c2r += from_a
        wire.r2c += from_r
        events += r.receive_data(from_a, MONO, NOW_MS) if from_a else []
        events += a.receive_data(from_r, MONO, NOW_MS) if from_r else []
    raise AssertionError("tunnels kept talking")


def granted(key_id: str, marks: dict[str, int], *, fresh: bool) -> CounterLease:
    lease = CounterLease(key_id, None, block_size=64) if fresh else CounterLease.takeover(key_id, marks[key_id],
                                                                                          block_size=64)
    request = lease.wants_reservation()
    assert request is not None
    marks[key_id] = request.new_mark
    lease.feed(request, Granted())
    return lease


@pytest.fixture(scope="module")
def capture(alice: Identity, bob: Identity) -> dict:
    """A session on r1 carrying a stream, then the same session resumed on r2 carrying more."""
    marks: dict[str, int] = {}
    first, second = Wire(bytearray(), bytearray()), Wire(bytearray(), bytearray())
    a = Tunnel(InitiatorHandshake(alice, accept_as("bob")), now_ms=MONO)
    r1 = Tunnel(ResponderHandshake(bob, accept_as("alice"), peer_address=PEER_ADDRESS), now_ms=MONO, shared_keys=True)
    a.start(MONO, NOW_MS)
    needed = [e for e in pump(a, r1, first) if isinstance(e, CountersNeeded)]
    session_id = needed[0].result.session_id
    r1.attach_counters(granted(counter_key_id(session_id, "r2i"), marks, fresh=True), MONO, "r1")
    pump(a, r1, first)
    stream = a.open_stream({"service": "web"})
    pump(a, r1, first)
    r1.accept_stream(stream)
    pump(a, r1, first)
    for size in (1, 1000, 70_000, 5):
        a.send_data(stream, b"a" * size)
        r1.send_data(stream, b"r" * size)
        pump(a, r1, first)
    wrapper = StateWrapper.for_identity(bob)
    snapshot = wrapper.unwrap(session_id, wrapper.wrap(r1.session.snapshot(NOW_MS)))
    r2 = Tunnel.around(Session.from_snapshot(snapshot, backend=r1.session.backend, entropy=r1.session.entropy,
                                             now_ms=MONO), now_ms=MONO)
    a2 = Tunnel.around(Session.resuming(a.session, MONO), now_ms=MONO)
    a2.start(MONO, NOW_MS)
    resume = b"".join(a2.buffers_to_send())
    second.c2r += resume
    r2.session.open_resume(FrameDecoder().feed(resume)[0].body)
    r2.attach_counters(granted(counter_key_id(session_id, "r2i"), marks, fresh=False), MONO, "r2")
    pump(a2, r2, second)
    again = a2.open_stream({"service": "web"})
    pump(a2, r2, second)
    r2.accept_stream(again)
    pump(a2, r2, second)
    r2.send_data(again, b"after the move")
    pump(a2, r2, second)
    return {"session_id": session_id.hex(), "first": first, "second": second}


def library_records(data: bytes) -> list[tuple[str, int]]:
    """What the library's own decoder finds: (session id, counter) of each RECORD frame."""
    return [(bytes(f.body[:8]).hex(), int.from_bytes(f.body[8:16], "big"))
            for f in FrameDecoder().feed(data) if f.kind is Kind.RECORD]


# --- the parser ------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", [C2R, R2C])
def test_every_record_header_is_found_as_the_library_decodes_it(capture: dict, direction: str) -> None:
    data = bytes(getattr(capture["first"], direction))
    found = list(records_in(data, connection=7, replica="r1", direction=direction))
    assert [(r.session_id, r.counter) for r in found] == library_records(data)
    assert len(found) >= 5 and all(r.complete and r.connection == 7 and r.replica == "r1" for r in found)
    assert {r.session_id for r in found} == {capture["session_id"]}
    assert [r.index for r in found] == list(range(len(found)))
    assert [r.counter for r in found] == sorted({r.counter for r in found})  # strictly increasing


def test_handshake_frames_are_skipped_and_the_frames_tile_the_stream(capture: dict) -> None:
    data = bytes(capture["first"].c2r)
    frames = list(scan_frames(data))
    assert frames[0].kind == Kind.HELLO and frames[0].offset == 0
    assert b"".join(f.data for f in frames) == data
    assert all(f.complete for f in frames)


def test_a_cut_at_any_byte_yields_the_whole_records_before_it_and_a_partial_one_once_its_header_arrived(
        capture: dict) -> None:
    data = bytes(capture["first"].r2c)
    whole = list(records_in(data, direction=R2C))
    step = max(1, len(data) // 1500)
    for cut in list(range(0, len(data), step)) + [len(data) - 1]:
        found = list(records_in(data[:cut], direction=R2C))
        header_arrived = [r for r in whole if data.find(r.frame) + 21 <= cut]
        assert [r.nonce_use for r in found] == [r.nonce_use for r in header_arrived], cut
        assert all(r.complete for r in found[:-1])
        if found and not found[-1].complete:
            assert whole[len(found) - 1].frame.startswith(found[-1].frame)


def test_the_resumed_connection_opens_with_a_resume_that_continues_the_session(capture: dict) -> None:
    before = list(records_in(bytes(capture["first"].c2r), connection=1, replica="r1"))
    after = list(records_in(bytes(capture["second"].c2r), connection=2, replica="r2"))
    back = list(records_in(bytes(capture["second"].r2c), connection=2, replica="r2", direction=R2C))
    assert after[0].index == 0 and after[0].session_id == capture["session_id"]
    assert after[0].counter > before[-1].counter  # counters continue, never restart
    assert next(scan_frames(capture["second"].c2r)).kind == Kind.RECORD  # no handshake on this connection
    assert len(back) >= 2 and back[0].session_id == capture["session_id"]
    assert repeated_nonces(before + after + back) == {}


def test_a_replayed_record_is_a_repeated_nonce_but_the_same_counter_in_the_other_direction_is_not(
        capture: dict) -> None:
    c2r = list(records_in(bytes(capture["first"].c2r), connection=1, replica="r1"))
    r2c = list(records_in(bytes(capture["first"].r2c), connection=1, replica="r1", direction=R2C))
    replayed = records_in(c2r[2].frame, connection=2, replica="r2")
    repeats = repeated_nonces(c2r + r2c + list(replayed))
    assert list(repeats) == [(capture["session_id"], C2R, c2r[2].counter)]
    assert [r.replica for r in repeats[c2r[2].nonce_use]] == ["r1", "r2"]
    assert {r.counter for r in c2r} & {r.counter for r in r2c}  # both directions count from their own start


@pytest.mark.parametrize("garbage, message", [
    (b"\x00\x00\x00\x05\x99hello", "unknown frame kind 0x99"),
    (b"\x00\x00\x00\x00\x10", "length 0"),
    (b"\x7f\x00\x00\x00\x10", "length 2130706432"),
])
def test_bytes_that_are_not_tunnel_framing_are_refused(garbage: bytes, message: str) -> None:
    with pytest.raises(CaptureParseError, match=message):
        list(records_in(garbage))


# --- the relay, on real sockets ----------------------------------------------------------------------


class StandInReplica:
    """A TCP server that answers each connection with ``reply`` and keeps what it received."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.received: list[bytearray] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            into = bytearray()
            self.received.append(into)
            threading.Thread(target=self._talk, args=(conn, into), daemon=True).start()

    def _talk(self, conn: socket.socket, into: bytearray) -> None:
        with conn:
            conn.sendall(self.reply)
            while chunk := conn.recv(65536):
                into += chunk

    def close(self) -> None:
        self.server.close()


def send_slowly(sock: socket.socket, data: bytes, piece: int, pause: float) -> None:
    for start in range(0, len(data), piece):
        sock.sendall(data[start:start + piece])
        time.sleep(pause)


def recv_all(sock: socket.socket, size: int, timeout: float = 10) -> bytes:
    sock.settimeout(timeout)
    out = bytearray()
    while len(out) < size and (chunk := sock.recv(65536)):
        out += chunk
    return bytes(out)


def wait_until(condition, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_the_relay_forwards_both_directions_unchanged_and_captures_every_byte(capture: dict) -> None:
    wire = capture["first"]
    replica = StandInReplica(bytes(wire.r2c))
    with Relay("r1", ("127.0.0.1", replica.port)) as relay:
        with socket.create_connection(("127.0.0.1", relay.port)) as client:
            send_slowly(client, bytes(wire.c2r), 4099, 0)
            assert recv_all(client, len(wire.r2c)) == wire.r2c
        wait_until(lambda: not relay.live())
        [connection] = relay.connections()
        assert connection.captured(C2R) == wire.c2r and connection.captured(R2C) == wire.r2c
        assert bytes(replica.received[0]) == wire.c2r
        expected = [(C2R, *r) for r in library_records(bytes(wire.c2r))] + \
                   [(R2C, *r) for r in library_records(bytes(wire.r2c))]
        assert [(r.direction, r.session_id, r.counter) for r in relay.records()] == expected
    replica.close()


def test_an_injected_frame_goes_in_between_two_frames_and_stays_out_of_the_capture(capture: dict) -> None:
    wire = capture["first"]
    records = list(records_in(bytes(wire.c2r)))
    replay = records[1].frame
    replica = StandInReplica(b"")
    with Relay("r2", ("127.0.0.1", replica.port)) as relay:
        with socket.create_connection(("127.0.0.1", relay.port)) as client:
            sender = threading.Thread(target=send_slowly, args=(client, bytes(wire.c2r), 333, 0.001))
            sender.start()
            wait_until(lambda: relay.connections() and len(relay.connections()[0].captured(C2R)) > 2000)
            relay.connections()[0].inject(replay)
            sender.join()
        wait_until(lambda: not relay.live())
        connection = relay.connections()[0]
        assert connection.captured(C2R) == wire.c2r and connection.injected(C2R) == [replay]
        with pytest.raises(InjectError, match="closed"):
            connection.inject(replay)
    received = bytes(replica.received[0])
    frames = [f.data for f in scan_frames(received)]
    assert all(f.complete for f in scan_frames(received))
    assert frames.count(replay) == 2  # the original and the injected copy, each whole
    frames.remove(replay)
    assert b"".join(frames) == wire.c2r
    assert set(repeated_nonces(list(records_in(received)))) == {records[1].nonce_use}
    replica.close()


def test_a_connection_to_a_dead_replica_is_closed_at_once_and_marked_refused() -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        dead_port = placeholder.getsockname()[1]
    with Relay("r3", ("127.0.0.1", dead_port)) as relay:
        with socket.create_connection(("127.0.0.1", relay.port)) as client:
            client.settimeout(5)
            try:
                assert client.recv(1) == b""
            except ConnectionResetError:
                pass
        wait_until(lambda: len(relay.connections()) == 1)
        assert relay.connections()[0].refused and relay.live() == []


def test_the_serving_replica_is_the_one_whose_live_connection_carried_data_last(capture: dict) -> None:
    replicas = [StandInReplica(b"") for _ in range(2)]
    relays = [Relay(f"r{i}", ("127.0.0.1", r.port)).start() for i, r in enumerate(replicas, 1)]
    try:
        clients = [socket.create_connection(("127.0.0.1", relay.port)) for relay in relays]
        assert serving(relays) is None  # connected, nothing sent yet
        frames = [f.data for f in scan_frames(bytes(capture["first"].c2r))]
        clients[1].sendall(frames[0])
        wait_until(lambda: serving(relays) is not None)
        clients[0].sendall(frames[0])
        wait_until(lambda: serving(relays)[0] is relays[0])  # type: ignore[index]
        clients[0].close()
        wait_until(lambda: serving(relays)[0] is relays[1])  # type: ignore[index]
        clients[1].close()
    finally:
        for relay, replica in zip(relays, replicas):
            relay.close()
            replica.close()

