"""Spec for the composed tunnel core (pqtunnel/tunnel.py): session + records + streams as one
sans-IO state machine. Two tunnels are wired back to back; the monotonic clock and the wall
clock are fed separately, as the daemon does.
"""

from __future__ import annotations

import pytest

from pqtunnel.errors import LocalProtocolError, SessionStateError
from pqtunnel.handshake import InitiatorHandshake, ResponderHandshake
from pqtunnel.identity import Identity
from pqtunnel.mux import FrameType, encode_frame
from pqtunnel.records import ContentType
from pqtunnel.session import SessionState, SessionTimers
from pqtunnel.tunnel import (
    DataReceived,
    Established,
    Event,
    KeepaliveTimeout,
    PeerClosed,
    PeerNotReadingError,
    PongReceived,
    StreamAccepted,
    StreamClosed,
    StreamEnded,
    StreamOpenRequested,
    StreamProtocolError,
    Tunnel,
    TunnelLimits,
)
from pqtunnel.wire import MAX_RECORD_PLAINTEXT, FrameDecoder, Kind
from tests.conftest import NOW_MS, PEER_ADDRESS, accept_as

MONO = 5_000  # monotonic ms: unrelated to the wall clock on purpose


class Pair:
    """alice's tunnel dials bob's; ``pump`` shuttles bytes until both are quiet."""

    def __init__(self, alice: Identity, bob: Identity, *, timers: SessionTimers | None = None,
                 limits: TunnelLimits | None = None) -> None:
        self.a = Tunnel(InitiatorHandshake(alice, accept_as("bob")), now_ms=MONO, timers=timers, limits=limits)
        self.b = Tunnel(ResponderHandshake(bob, accept_as("alice"), peer_address=PEER_ADDRESS),
                        now_ms=MONO, timers=timers, limits=limits)
        self.events_a: list[Event] = []
        self.events_b: list[Event] = []
        self.wire_a: list[bytes] = []

    def pump(self, mono: int = MONO, wall: int = NOW_MS) -> None:
        for _ in range(50):
            from_a = b"".join(self.a.buffers_to_send())
            from_b = b"".join(self.b.buffers_to_send())
            if not from_a and not from_b:
                return
            if from_a:
                self.wire_a.append(from_a)
                self.events_b += self.b.receive_data(from_a, mono, wall)
            if from_b:
                self.events_a += self.a.receive_data(from_b, mono, wall)
        raise AssertionError("tunnels kept talking")

    def establish(self) -> None:
        self.a.start(MONO, NOW_MS)
        self.pump()
        assert any(isinstance(e, Established) for e in self.events_a)
        assert any(isinstance(e, Established) for e in self.events_b)
        self.take()

    def take(self) -> tuple[list[Event], list[Event]]:
        events = (self.events_a, self.events_b)
        self.events_a, self.events_b = [], []
        return events

    def open(self, target: dict) -> int:
        stream_id = self.a.open_stream(target)
        self.pump()
        _, at_b = self.take()
        assert at_b == [StreamOpenRequested(stream_id, target)]
        self.b.accept_stream(stream_id)
        self.pump()
        at_a, _ = self.take()
        assert at_a == [StreamAccepted(stream_id)]
        return stream_id


@pytest.fixture
def pair(alice: Identity, bob: Identity) -> Pair:
    p = Pair(alice, bob)
    p.establish()
    return p


def test_streams_carry_bytes_both_ways_inside_one_session(pair: Pair) -> None:
    stream_id = pair.open({"service": "web"})
    assert pair.a.send_data(stream_id, b"GET /") == 5
    pair.b.send_data(stream_id, b"200 OK")
    pair.b.send_fin(stream_id)
    pair.pump()
    at_a, at_b = pair.take()
    assert at_b == [DataReceived(stream_id, b"GET /")]
    assert at_a == [DataReceived(stream_id, b"200 OK"), StreamEnded(stream_id)]


def test_stream_frames_queued_before_key_confirmation_wait_and_then_flow(alice: Identity, bob: Identity) -> None:
    p = Pair(alice, bob)
    p.a.start(MONO, NOW_MS)
    stream_id = p.a.open_stream({"service": "early"})  # before the handshake even started moving
    assert p.a.state is SessionState.HANDSHAKING
    p.pump()
    _, at_b = p.take()
    assert StreamOpenRequested(stream_id, {"service": "early"}) in at_b


def test_each_record_holds_whole_mux_frames_and_bulk_uses_large_records(pair: Pair) -> None:
    stream_id = pair.open({"service": "bulk"})
    sent = pair.a.send_data(stream_id, bytes(1 << 20))
    assert sent == 1 << 20  # the default window takes it all
    wire = b"".join(pair.a.buffers_to_send())
    frames = FrameDecoder().feed(wire)
    assert all(f.kind is Kind.RECORD for f in frames)
    assert len(frames) == 6, "three whole 64 KiB frames per 256 KiB record: 16 frames make 6 records"
    got = pair.b.receive_data(wire, MONO, NOW_MS)
    assert sum(len(e.data) for e in got if isinstance(e, DataReceived)) == 1 << 20


def test_close_tells_the_peer_why_and_ends_every_stream(pair: Pair) -> None:
    pair.open({"service": "web"})
    pair.a.close("operator asked")
    pair.pump()
    _, at_b = pair.take()
    assert at_b == [PeerClosed("operator asked")]
    assert pair.a.closed and pair.b.closed
    assert pair.a.stream_count == 0 and pair.b.stream_count == 0


def test_sending_after_close_is_our_mistake_not_the_peers(pair: Pair) -> None:
    stream_id = pair.open({"service": "web"})
    pair.a.close("done")
    with pytest.raises(LocalProtocolError):
        pair.a.send_data(stream_id, b"late")
    with pytest.raises(SessionStateError):
        pair.a.ping(MONO)


def test_a_peer_that_breaks_stream_framing_gets_goaway_and_close_and_is_cut(pair: Pair) -> None:
    stream_id = pair.open({"service": "web"})
    records = pair.b.session.records
    assert records is not None
    bogus = records.seal(ContentType.DATA, encode_frame(0x08, 0, bytes(8)))  # a reserved frame type
    with pytest.raises(StreamProtocolError, match="unknown frame type 0x08"):
        pair.a.receive_data(bogus, MONO, NOW_MS)
    assert pair.a.closed
    answer = b"".join(pair.a.buffers_to_send())
    events = pair.b.receive_data(answer, MONO, NOW_MS)
    assert isinstance(events[-1], PeerClosed) and "unknown frame type" in events[-1].reason
    assert pair.b.stream_count == 0 and stream_id


def test_a_peer_that_never_reads_is_cut_once_answers_pile_up(alice: Identity, bob: Identity) -> None:
    p = Pair(alice, bob, limits=TunnelLimits(high_water=1024, max_queued=64 * 1024))
    p.establish()
    records = p.b.session.records
    assert records is not None
    pings = b"".join(records.seal(ContentType.PING, bytes(16)) for _ in range(2000))
    with pytest.raises(PeerNotReadingError):
        p.a.receive_data(pings, MONO, NOW_MS)  # we never drained a's answers: the socket is "full"


def test_writers_are_held_above_high_water(alice: Identity, bob: Identity) -> None:
    p = Pair(alice, bob, limits=TunnelLimits(high_water=100_000))
    p.establish()
    stream_id = p.open({"service": "bulk"})
    assert p.a.writable
    p.a.send_data(stream_id, bytes(200_000))
    assert not p.a.writable, "the shell must wait before sealing more"
    p.a.buffers_to_send()
    assert p.a.writable


def test_timers_run_on_the_monotonic_clock_not_the_wall_clock(alice: Identity, bob: Identity) -> None:
    timers = SessionTimers(keepalive_ms=10_000, dead_after_ms=35_000)
    p = Pair(alice, bob, timers=timers)
    p.establish()
    # The wall clock jumps a day ahead (NTP step); monotonic time moves one second.
    p.a.receive_data(b"", MONO + 1_000, NOW_MS + 86_400_000)
    p.a.tick(MONO + 1_000)  # no KeepaliveTimeout: nothing is silent on the monotonic clock
    assert not p.a.closed
    with pytest.raises(KeepaliveTimeout):
        p.a.tick(MONO + 1_000 + 35_001)


def test_ping_round_trip_reports_its_id(pair: Pair) -> None:
    ping_id = pair.a.ping(MONO + 10)
    pair.pump(mono=MONO + 20)
    at_a, _ = pair.take()
    assert at_a == [PongReceived(ping_id, MONO + 10)]


def test_closing_a_stream_frees_it_on_both_sides(pair: Pair) -> None:
    stream_id = pair.open({"service": "web"})
    pair.a.send_fin(stream_id)
    pair.b.send_fin(stream_id)
    pair.pump()
    at_a, at_b = pair.take()
    assert StreamClosed(stream_id) in at_a and StreamClosed(stream_id) in at_b
    assert pair.a.stream_count == pair.b.stream_count == 0


def test_record_batch_limit_is_the_record_plaintext_limit() -> None:
    from pqtunnel.mux import MAX_FRAME

    assert MAX_RECORD_PLAINTEXT >= MAX_FRAME, "a record must hold the largest mux frame"
    assert FrameType.GOAWAY == 0x0A
