"""Spec for a Session (pqtunnel/session.py): handshake, data, keepalive, close and in-band rekey.

Sessions are sans-IO: bytes go in with ``receive_data(data, now_ms)``, come out of
``data_to_send()``, and time only moves when the test says so.
"""

from __future__ import annotations

import pytest

from pqtunnel.crypto.suites import CLASSICAL, HYBRID, Aead, Suite
from pqtunnel.errors import HandshakeRefusedError, ProtocolError, RecordAuthError, RecordError, RekeyError
from pqtunnel.handshake import InitiatorHandshake, ResponderHandshake
from pqtunnel.identity import Identity
from pqtunnel.records import ContentType, RecordLayer
from pqtunnel.session import (
    RecordDataReceived,
    Established,
    KeepaliveTimeout,
    PeerClosed,
    PongReceived,
    Rekeyed,
    Session,
    SessionTimers,
)
from pqtunnel.trust import TrustStore
from pqtunnel.wire import MAX_RECORD_PLAINTEXT, FrameDecoder, Kind
from tests.conftest import NOW_MS, PEER_ADDRESS, accept_as, establish, make_sessions, pump

SUITES = [CLASSICAL, HYBRID]
QUIET = SessionTimers(keepalive_ms=10**9, dead_after_ms=10**9, handshake_timeout_ms=10**9,
                      rekey_after_ms=10**9, rekey_after_bytes=10**12)


def deliver(src: Session, dst: Session, now_ms: int = NOW_MS) -> list:
    return dst.receive_data(src.data_to_send(), now_ms)


def received(events: list) -> list[bytes]:
    return [e.data for e in events if isinstance(e, RecordDataReceived)]


def of_type(events: list, cls: type) -> list:
    return [e for e in events if isinstance(e, cls)]


def original_receiver(session: Session) -> RecordLayer:
    """A record layer holding ``session``'s keys from the handshake (before any rekey)."""
    r = session.result
    return RecordLayer(r.aead, r.send_key, r.recv_key, r.session_id)


def record_bodies(data: bytes) -> list[bytes]:
    return [f.body for f in FrameDecoder().feed(data) if f.kind is Kind.RECORD]


# --- establishment ------------------------------------------------------------------------------------


def test_the_initiator_is_established_only_when_the_responder_confirms_the_keys(alice: Identity, bob: Identity) -> None:
    """docs/PROTOCOL.md 4.6: the responder's first record (a PING) confirms the keys."""
    a, b = make_sessions(alice, bob)
    a.start(NOW_MS)
    assert deliver(a, b) == []  # HELLO -> RESPONSE
    assert deliver(b, a) == []  # RESPONSE -> FINISH: nothing is confirmed yet
    events_b = deliver(a, b)
    assert of_type(events_b, Established) and events_b[0].result.peer.fingerprint == alice.fingerprint
    events_a = deliver(b, a)
    assert isinstance(events_a[0], Established), events_a
    assert events_a[0].result.peer.fingerprint == bob.fingerprint
    assert events_a[0].result.session_id == events_b[0].result.session_id


def test_an_initiator_refused_after_finish_learns_why(alice: Identity, bob: Identity, mallory: Identity) -> None:
    pins = TrustStore({"mallory": mallory.fingerprint})
    a = Session(InitiatorHandshake(alice, accept_as("bob")), now_ms=NOW_MS)
    b = Session(ResponderHandshake(bob, lambda peer: pins.require(peer.fingerprint, None), peer_address=PEER_ADDRESS),
                now_ms=NOW_MS)
    a.start(NOW_MS)
    deliver(a, b)
    deliver(b, a)
    with pytest.raises(ProtocolError, match="not pinned"):
        deliver(a, b)
    with pytest.raises(HandshakeRefusedError, match="untrusted"):
        deliver(b, a)


def test_a_handshake_frame_inside_an_established_session_is_refused(alice: Identity, bob: Identity) -> None:
    a, b = establish(alice, bob)
    hello = InitiatorHandshake(alice, accept_as("bob")).start(NOW_MS)
    with pytest.raises(ProtocolError):
        b.receive_data(hello, NOW_MS)


def test_a_record_before_the_handshake_is_refused(alice: Identity, bob: Identity) -> None:
    _, b = make_sessions(alice, bob)
    stray = RecordLayer(Aead.CHACHA20_POLY1305, bytes(32), bytes(32), bytes(8)).seal(ContentType.DATA, b"early")
    with pytest.raises(RecordError):
        b.receive_data(stray, NOW_MS)


# --- data -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.name)
def test_established_sessions_exchange_data_both_ways(suite: Suite, alice: Identity, bob: Identity) -> None:
    a, b = establish(alice, bob, suite=suite)
    a.send(b"hello bob", NOW_MS)
    b.send(b"hello alice", NOW_MS)
    events_a, events_b = pump(a, b, NOW_MS)
    assert received(events_b) == [b"hello bob"]
    assert received(events_a) == [b"hello alice"]
    assert a.bytes_sent == b.bytes_received == len(b"hello bob")


def test_large_data_is_split_into_records_and_arrives_intact(alice: Identity, bob: Identity) -> None:
    a, b = establish(alice, bob)
    data = bytes(i % 253 for i in range(3 * MAX_RECORD_PLAINTEXT + 123))
    a.send(data, NOW_MS)
    wire = a.data_to_send()
    assert len(record_bodies(wire)) == 4
    chunks = received(b.receive_data(wire, NOW_MS))
    assert [len(c) for c in chunks] == [MAX_RECORD_PLAINTEXT] * 3 + [123]
    assert b"".join(chunks) == data


def test_data_fed_one_byte_at_a_time_arrives(alice: Identity, bob: Identity) -> None:
    a, b = establish(alice, bob)
    a.send(b"first", NOW_MS)
    a.send(b"second", NOW_MS)
    events = []
    for byte in a.data_to_send():
        events += b.receive_data(bytes([byte]), NOW_MS)
    assert received(events) == [b"first", b"second"]


def test_sending_empty_data_sends_nothing(alice: Identity, bob: Identity) -> None:
    a, _ = establish(alice, bob)
    a.send(b"", NOW_MS)
    assert a.data_to_send() == b""


def test_ping_is_answered_with_a_matching_pong(alice: Identity, bob: Identity) -> None:
    a, b = establish(alice, bob)
    first = a.ping(NOW_MS + 5)
    second = a.ping(NOW_MS + 7)
    assert first != second
    events_a, events_b = pump(a, b, NOW_MS + 9)
    assert events_b == []
    assert of_type(events_a, PongReceived) == [PongReceived(first, NOW_MS + 5), PongReceived(second, NOW_MS + 7)]


def test_a_malformed_pong_is_refused(alice: Identity, bob: Identity) -> None:
    a, b = establish(alice, bob)
    with pytest.raises(RecordError, match="PONG"):
        a.receive_data(b.records.seal(ContentType.PONG, b"short"), NOW_MS)


# --- close ------------------------------------------------------------------------------------------------


def test_close_gives_the_peer_the_reason(alice: Identity, bob: Identity) -> None:
    a, b = establish(alice, bob)
    a.close("shutting down for maintenance")
    assert a.closed
    assert deliver(a, b) == [PeerClosed("shutting down for maintenance")]
    assert b.closed


def test_close_without_a_reason_says_so(alice: Identity, bob: Identity) -> None:
    a, b = establish(alice, bob)
    a.close("")
    assert deliver(a, b) == [PeerClosed("no reason given")]


def test_a_long_close_reason_is_truncated(alice: Identity, bob: Identity) -> None:
    a, b = establish(alice, bob)
    a.close("x" * 5_000)
    (closed,) = deliver(a, b)
    assert closed.reason == "x" * 512


def test_close_is_sent_once(alice: Identity, bob: Identity) -> None:
    a, _ = establish(alice, bob)
    a.close("bye")
    a.close("bye again")
    assert len(record_bodies(a.data_to_send())) == 1


def test_data_after_close_is_ignored(alice: Identity, bob: Identity) -> None:
    a, b = establish(alice, bob)
    a.send(b"before", NOW_MS)
    a.close("bye")
    late = a.records.seal(ContentType.DATA, b"after close")  # a misbehaving peer keeps talking
    events = b.receive_data(a.data_to_send() + late, NOW_MS)
    assert events == [RecordDataReceived(b"before"), PeerClosed("bye")]
    assert b.receive_data(a.records.seal(ContentType.DATA, b"later still"), NOW_MS) == []


def test_the_closing_side_ignores_what_arrives_after_its_close(alice: Identity, bob: Identity) -> None:
    a, b = establish(alice, bob)
    a.close("bye")
    b.send(b"too late", NOW_MS)
    assert deliver(b, a) == []


# --- rekey ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.name)
@pytest.mark.parametrize("rekeyer", ["initiator", "responder"])
def test_a_rekey_keeps_data_flowing_in_order(rekeyer: str, suite: Suite, alice: Identity, bob: Identity) -> None:
    """Data is interleaved before, between and after each rekey message, in both directions."""
    a, b = establish(alice, bob, suite=suite)
    x, y = (a, b) if rekeyer == "initiator" else (b, a)  # x starts the rekey
    got_x, got_y = [], []
    x.send(b"x0", NOW_MS)
    y.send(b"y0", NOW_MS)
    x.start_rekey(NOW_MS)  # REKEY_INIT under the old key
    x.send(b"x1", NOW_MS)
    y.send(b"y1", NOW_MS)  # y has not seen the INIT: old key
    got_y += deliver(x, y)  # x0, INIT, x1 -> y answers REKEY_RESP and sends under the new key
    y.send(b"y2", NOW_MS)
    x.send(b"x2", NOW_MS)  # x still sends under the old key until REKEY_RESP
    got_x += deliver(y, x)  # y0, y1, RESP, y2 -> x sends REKEY_DONE and switches
    x.send(b"x3", NOW_MS)
    y.send(b"y3", NOW_MS)
    got_y += deliver(x, y)  # x2, DONE, x3
    got_x += deliver(y, x)  # y3
    events_x, events_y = pump(x, y, NOW_MS)
    got_x += events_x
    got_y += events_y
    assert received(got_y) == [b"x0", b"x1", b"x2", b"x3"]
    assert received(got_x) == [b"y0", b"y1", b"y2", b"y3"]
    assert of_type(got_x, Rekeyed) == [Rekeyed(1)] and of_type(got_y, Rekeyed) == [Rekeyed(1)]
    assert a.epoch == b.epoch == 1


@pytest.mark.parametrize("first_delivered", ["initiator", "responder"])
@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.name)
def test_simultaneous_rekeys_settle_on_one_new_key(first_delivered: str, suite: Suite, alice: Identity,
                                                   bob: Identity) -> None:
    a, b = establish(alice, bob, suite=suite)
    a.send(b"a0", NOW_MS)
    b.send(b"b0", NOW_MS)
    a.start_rekey(NOW_MS)
    b.start_rekey(NOW_MS)
    a.send(b"a1", NOW_MS)
    b.send(b"b1", NOW_MS)
    got_a, got_b = [], []
    if first_delivered == "initiator":
        got_b += deliver(a, b)
        got_a += deliver(b, a)
    else:
        got_a += deliver(b, a)
        got_b += deliver(a, b)
    a.send(b"a2", NOW_MS)
    b.send(b"b2", NOW_MS)
    events_a, events_b = pump(a, b, NOW_MS)
    got_a += events_a
    got_b += events_b
    assert received(got_b) == [b"a0", b"a1", b"a2"]
    assert received(got_a) == [b"b0", b"b1", b"b2"]
    assert a.epoch == b.epoch == 1
    # The key chain is still in step: later rekeys from either side work.
    for rekeyer in (b, a):
        rekeyer.start_rekey(NOW_MS)
        a.send(b"after", NOW_MS)
        events_a, events_b = pump(a, b, NOW_MS)
        assert received(events_b) == [b"after"]
    assert a.epoch == b.epoch == 3


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.name)
def test_after_a_rekey_the_old_keys_no_longer_decrypt(suite: Suite, alice: Identity, bob: Identity) -> None:
    a, b = establish(alice, bob, suite=suite)
    a.send(b"before", NOW_MS)
    b.send(b"before", NOW_MS)
    # Control: records sealed before the rekey open with the handshake keys.
    assert original_receiver(b).open(record_bodies(a.data_to_send())[0])[1] == b"before"
    assert original_receiver(a).open(record_bodies(b.data_to_send())[0])[1] == b"before"
    a.start_rekey(NOW_MS)
    pump(a, b, NOW_MS)
    assert a.epoch == b.epoch == 1
    a.send(b"secret from a", NOW_MS)
    b.send(b"secret from b", NOW_MS)
    from_a, from_b = a.data_to_send(), b.data_to_send()
    with pytest.raises(RecordAuthError):
        original_receiver(b).open(record_bodies(from_a)[0])
    with pytest.raises(RecordAuthError):
        original_receiver(a).open(record_bodies(from_b)[0])
    assert received(b.receive_data(from_a, NOW_MS)) == [b"secret from a"]
    assert received(a.receive_data(from_b, NOW_MS)) == [b"secret from b"]


def test_a_second_rekey_request_while_one_is_in_flight_is_ignored(alice: Identity, bob: Identity) -> None:
    a, b = establish(alice, bob)
    a.start_rekey(NOW_MS)
    first = a.data_to_send()
    a.start_rekey(NOW_MS)
    assert a.data_to_send() == b""
    assert not a.rekey_due(NOW_MS + 10**9)
    b.receive_data(first, NOW_MS)
    pump(a, b, NOW_MS)
    assert a.epoch == b.epoch == 1


def test_rekey_messages_out_of_order_are_refused(alice: Identity, bob: Identity) -> None:
    a, b = establish(alice, bob)
    with pytest.raises(RekeyError):
        b.receive_data(a.records.seal(ContentType.REKEY_RESP, b"\x09" * (32 + 1088)), NOW_MS)
    a, b = establish(alice, bob)
    with pytest.raises(RekeyError):
        b.receive_data(a.records.seal(ContentType.REKEY_DONE), NOW_MS)


@pytest.mark.parametrize("size", [0, 31, 32, 32 + 1183, 32 + 1185])
def test_a_rekey_init_of_the_wrong_size_is_refused(size: int, alice: Identity, bob: Identity) -> None:
    a, b = establish(alice, bob)  # hybrid: X25519 (32) + ML-KEM-768 public key (1184)
    with pytest.raises(RekeyError):
        b.receive_data(a.records.seal(ContentType.REKEY_INIT, b"\x09" * size), NOW_MS)


def test_a_rekey_init_with_a_low_order_x25519_key_is_refused(alice: Identity, bob: Identity) -> None:
    a, b = establish(alice, bob, suite=CLASSICAL)
    with pytest.raises(RekeyError):
        b.receive_data(a.records.seal(ContentType.REKEY_INIT, bytes(32)), NOW_MS)


# --- timers -----------------------------------------------------------------------------------------------


def test_a_keepalive_ping_is_sent_after_the_idle_interval(alice: Identity, bob: Identity) -> None:
    timers = SessionTimers(keepalive_ms=10_000, dead_after_ms=35_000)
    a, b = establish(alice, bob, timers=timers)
    a.tick(NOW_MS + 9_999)
    assert a.data_to_send() == b""
    a.tick(NOW_MS + 10_000)
    ping = a.data_to_send()
    assert len(record_bodies(ping)) == 1
    b.receive_data(ping, NOW_MS + 10_000)
    (pong,) = of_type(deliver(b, a, NOW_MS + 10_000), PongReceived)
    assert pong.sent_ms == NOW_MS + 10_000


def test_traffic_in_both_directions_postpones_the_keepalive(alice: Identity, bob: Identity) -> None:
    a, b = establish(alice, bob, timers=SessionTimers(keepalive_ms=10_000))
    a.send(b"x", NOW_MS + 9_000)
    b.send(b"y", NOW_MS + 9_000)
    pump(a, b, NOW_MS + 9_000)
    a.tick(NOW_MS + 10_000)
    assert a.data_to_send() == b""


def test_a_silent_peer_times_out(alice: Identity, bob: Identity) -> None:
    a, _ = establish(alice, bob, timers=SessionTimers(keepalive_ms=10_000, dead_after_ms=35_000))
    a.tick(NOW_MS + 35_000)  # pings, but the peer never answers
    with pytest.raises(KeepaliveTimeout, match="silent"):
        a.tick(NOW_MS + 35_001)


def test_any_received_record_keeps_the_session_alive(alice: Identity, bob: Identity) -> None:
    a, b = establish(alice, bob, timers=SessionTimers(keepalive_ms=10_000, dead_after_ms=35_000))
    b.send(b"still here", NOW_MS + 30_000)
    deliver(b, a, NOW_MS + 30_000)
    a.tick(NOW_MS + 60_000)  # 30 s after the last record: fine


@pytest.mark.parametrize("stalled_at", ["before-response", "before-finish"])
def test_a_handshake_that_does_not_finish_times_out(stalled_at: str, alice: Identity, bob: Identity) -> None:
    timers = SessionTimers(handshake_timeout_ms=10_000)
    a, b = make_sessions(alice, bob, timers=timers)
    a.start(NOW_MS)
    stalled = a
    if stalled_at == "before-finish":
        deliver(a, b)  # the responder answers, the FINISH never comes
        stalled = b
    stalled.tick(NOW_MS + 10_000)
    with pytest.raises(KeepaliveTimeout, match="handshake"):
        stalled.tick(NOW_MS + 10_001)


def test_a_rekey_is_due_after_the_byte_budget(alice: Identity, bob: Identity) -> None:
    timers = SessionTimers(keepalive_ms=10**9, dead_after_ms=10**9, rekey_after_bytes=1_000)
    a, b = establish(alice, bob, timers=timers)
    a.send(b"x" * 999, NOW_MS)
    pump(a, b, NOW_MS)
    assert not a.rekey_due(NOW_MS) and not b.rekey_due(NOW_MS)
    a.send(b"x", NOW_MS)
    assert a.rekey_due(NOW_MS)
    a.tick(NOW_MS)  # starts the rekey
    events_a, events_b = pump(a, b, NOW_MS)
    assert of_type(events_a, Rekeyed) == [Rekeyed(1)] and of_type(events_b, Rekeyed) == [Rekeyed(1)]
    assert not a.rekey_due(NOW_MS) and not b.rekey_due(NOW_MS), "the budget restarts after a rekey"
    b.send(b"y" * 1_000, NOW_MS)
    assert b.rekey_due(NOW_MS)


def test_a_rekey_is_due_after_the_time_budget(alice: Identity, bob: Identity) -> None:
    timers = SessionTimers(keepalive_ms=10**9, dead_after_ms=10**9, rekey_after_ms=5_000)
    a, b = establish(alice, bob, timers=timers)
    assert not a.rekey_due(NOW_MS + 4_999)
    assert a.rekey_due(NOW_MS + 5_000)
    a.tick(NOW_MS + 5_000)
    assert not a.rekey_due(NOW_MS + 5_000), "not due again while one is in flight"
    events_a, events_b = pump(a, b, NOW_MS + 5_000)
    assert of_type(events_a, Rekeyed) == [Rekeyed(1)] and of_type(events_b, Rekeyed) == [Rekeyed(1)]
    assert not a.rekey_due(NOW_MS + 9_999)
    assert a.rekey_due(NOW_MS + 10_000)


def test_tick_does_nothing_when_nothing_is_due(alice: Identity, bob: Identity) -> None:
    a, b = establish(alice, bob, timers=QUIET)
    a.tick(NOW_MS + 60_000)
    b.tick(NOW_MS + 60_000)
    assert a.data_to_send() == b"" and b.data_to_send() == b""


def test_before_keys_exist_a_big_record_is_refused_from_its_header(alice: Identity, bob: Identity) -> None:
    """An unauthenticated peer cannot make the responder buffer a full-size record."""
    import struct

    from pqtunnel.errors import FramingError

    responder = Session(ResponderHandshake(bob, accept_as("alice"), peer_address=PEER_ADDRESS), now_ms=NOW_MS)
    with pytest.raises(FramingError, match="exceeds the limit of 32768"):
        responder.receive_data(struct.pack(">IB", 100_000, Kind.RECORD), NOW_MS)
    a, b = establish(alice, bob)
    big = a.records.seal(ContentType.DATA, bytes(200_000))  # after the handshake: fine
    assert [e.data == bytes(200_000) for e in b.receive_data(big, NOW_MS)] == [True]
