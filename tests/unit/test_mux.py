"""Spec for the sans-IO stream multiplexer (pqtunnel/mux.py, docs/PROTOCOL.md section 7).

Two Multiplexer instances are wired back to back by ``pump``; hand-written frames play a
misbehaving peer. Caller mistakes are exceptions, peer mistakes are events, and only an
unframeable byte stream ends the session.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections import defaultdict
from dataclasses import dataclass, field

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pqtunnel.errors import PqtunnelError
from pqtunnel.wire import MAX_RECORD_PLAINTEXT
from pqtunnel.mux import (
    BATCH_RESERVED,
    DEFAULT_INITIAL_WINDOW,
    HEADER_SIZE,
    MAX_FRAME,
    MAX_CONTROL_PAYLOAD,
    MAX_DATA_PAYLOAD,
    ConsumedTooMuchError,
    CreditAvailable,
    DataReceived,
    ErrorCode,
    Event,
    FrameType,
    GoAwayReceived,
    GoingAwayError,
    InvalidErrorCodeError,
    InvalidStreamIdError,
    InvalidTargetError,
    Multiplexer,
    MuxConfigError,
    MuxError,
    ProtocolViolation,
    SessionClosedError,
    StreamAccepted,
    StreamClosed,
    StreamEnded,
    StreamFinishedError,
    StreamNotOpenError,
    StreamNotRequestedError,
    StreamOpenRequested,
    StreamRefused,
    StreamReset,
    StreamState,
    UnknownStreamError,
    encode_frame,
)

# --- harness ------------------------------------------------------------------------------------


@dataclass
class Peer:
    """A Multiplexer plus a well-behaved application: it records events and received bytes,
    and consumes everything it receives except on streams listed in ``stalled``."""

    mux: Multiplexer
    events: list[Event] = field(default_factory=list)
    received: dict[int, bytearray] = field(default_factory=lambda: defaultdict(bytearray))
    held: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    stalled: set[int] = field(default_factory=set)

    def feed(self, data: bytes) -> None:
        for event in self.mux.receive_data(data):
            self.events.append(event)
            if isinstance(event, DataReceived):
                self.received[event.stream_id] += event.data
                if event.stream_id in self.stalled:
                    self.held[event.stream_id] += len(event.data)
                else:
                    self.mux.consumed(event.stream_id, len(event.data))

    def take(self) -> list[Event]:
        """Events since the last take(), so each test step asserts only its own effects."""
        events, self.events = self.events, []
        return events


def make_pair(**settings_: int) -> tuple[Peer, Peer]:
    return Peer(Multiplexer(is_initiator=True, **settings_)), Peer(Multiplexer(is_initiator=False, **settings_))


def pump(a: Peer, b: Peer) -> int:
    """Exchange data_to_send() both ways until both are quiet; return the largest batch seen."""
    largest = 0
    while True:
        from_a, from_b = a.mux.data_to_send(), b.mux.data_to_send()
        if not from_a and not from_b:
            return largest
        largest = max(largest, len(from_a), len(from_b))
        b.feed(from_a)
        a.feed(from_b)


def open_accepted(opener: Peer, acceptor: Peer, target: dict | None = None) -> int:
    stream_id = opener.mux.open_stream(target or {"service": "web"})
    pump(opener, acceptor)
    acceptor.mux.accept_stream(stream_id)
    pump(opener, acceptor)
    opener.take()
    acceptor.take()
    return stream_id


def frames(data: bytes) -> list[tuple[FrameType, int, bytes]]:
    """Split well-formed mux bytes into (type, stream_id, payload), to assert on the wire."""
    out = []
    pos = 0
    while pos < len(data):
        frame_type, flags, stream_id, length = struct.unpack_from(">BBII", data, pos)
        assert flags == 0
        out.append((FrameType(frame_type), stream_id, data[pos + HEADER_SIZE : pos + HEADER_SIZE + length]))
        pos += HEADER_SIZE + length
    assert pos == len(data)
    return out


def error_payload(code: int, reason: str) -> bytes:
    return msgpack.packb({"code": code, "reason": reason})


def open_frame(stream_id: int, target: object) -> bytes:
    return encode_frame(FrameType.OPEN, stream_id, msgpack.packb(target))


def raw_responder(**settings_: int) -> Multiplexer:
    """A responder for tests that play a hand-written (possibly misbehaving) initiator."""
    return Multiplexer(is_initiator=False, **settings_)


def raw_accepted(mux: Multiplexer, *stream_ids: int) -> None:
    for stream_id in stream_ids:
        assert mux.receive_data(open_frame(stream_id, {"port": 80})) == [StreamOpenRequested(stream_id, {"port": 80})]
        mux.accept_stream(stream_id)
    mux.data_to_send()


# --- opening streams ----------------------------------------------------------------------------


def test_initiator_opens_odd_ids_and_responder_even_ids() -> None:
    a, b = make_pair()
    assert [a.mux.open_stream({"n": i}) for i in range(3)] == [1, 3, 5]
    assert [b.mux.open_stream({"n": i}) for i in range(3)] == [2, 4, 6]


def test_open_delivers_the_target_and_accept_opens_the_stream_both_ways() -> None:
    a, b = make_pair()
    stream_id = a.mux.open_stream({"service": "web", "hint": [1, 2]})
    assert a.mux.stream_state(stream_id) is StreamState.OPENING
    pump(a, b)
    assert b.take() == [StreamOpenRequested(stream_id, {"service": "web", "hint": [1, 2]})]
    assert b.mux.stream_state(stream_id) is StreamState.REQUESTED
    b.mux.accept_stream(stream_id)
    pump(a, b)
    assert a.take() == [StreamAccepted(stream_id)]
    assert a.mux.stream_state(stream_id) is b.mux.stream_state(stream_id) is StreamState.OPEN
    assert a.mux.credit(stream_id) == b.mux.credit(stream_id) == DEFAULT_INITIAL_WINDOW


def test_refusal_reports_code_and_reason_and_frees_both_sides() -> None:
    a, b = make_pair()
    stream_id = a.mux.open_stream({"service": "nope"})
    pump(a, b)
    b.mux.refuse_stream(stream_id, ErrorCode.UNKNOWN_SERVICE, "no service 'nope'")
    pump(a, b)
    assert a.take() == [
        StreamRefused(stream_id, ErrorCode.UNKNOWN_SERVICE, "no service 'nope'"),
        StreamClosed(stream_id),
    ]
    assert a.mux.stream_state(stream_id) is b.mux.stream_state(stream_id) is StreamState.CLOSED
    assert a.mux.stream_count == b.mux.stream_count == 0


@pytest.mark.parametrize(
    "target",
    [["service", "web"], {1: "x"}, {"blob": b"x" * 5000}, {"obj": object()}],
    ids=["list", "int-key", "too-big", "unencodable"],
)
def test_open_stream_rejects_targets_that_are_not_small_str_keyed_maps(target: object) -> None:
    mux = Multiplexer(is_initiator=True)
    with pytest.raises(InvalidTargetError):
        mux.open_stream(target)  # type: ignore[arg-type]
    assert mux.data_to_send() == b""


@pytest.mark.parametrize(
    "payload",
    [msgpack.packb(["web"]), msgpack.packb({1: "web"}), b"\xc1", msgpack.packb({"a": 1}) + b"\x00", b""],
    ids=["list", "int-key", "invalid-msgpack", "trailing-bytes", "empty"],
)
def test_peer_open_with_a_bad_target_is_refused_with_protocol_error(payload: bytes) -> None:
    mux = raw_responder()
    assert mux.receive_data(encode_frame(FrameType.OPEN, 1, payload)) == []
    reason = "OPEN target must be a msgpack map with str keys"
    assert frames(mux.data_to_send()) == [(FrameType.OPEN_ERR, 1, error_payload(ErrorCode.PROTOCOL_ERROR, reason))]
    assert mux.stream_state(1) is StreamState.CLOSED


def test_peer_streams_beyond_max_streams_are_refused_until_one_closes() -> None:
    a, b = make_pair(max_streams=2)
    first, second, third = (a.mux.open_stream({"n": i}) for i in range(3))
    pump(a, b)
    assert [e.stream_id for e in b.take()] == [first, second]
    assert a.take() == [
        StreamRefused(third, ErrorCode.TOO_MANY_STREAMS, "limit of 2 concurrent streams"),
        StreamClosed(third),
    ]
    b.mux.refuse_stream(first, ErrorCode.REFUSED, "")
    fourth = a.mux.open_stream({"n": 4})
    pump(a, b)
    assert b.take() == [StreamOpenRequested(fourth, {"n": 4})]


def test_stream_ids_must_have_the_peer_parity_and_increase_per_stream_only() -> None:
    mux = raw_responder()
    raw_accepted(mux, 5)
    wrong_parity = "OPEN for stream 2: the peer must use odd ids"
    backwards = "OPEN reuses stream id 3; ids must increase (highest so far 5)"
    assert mux.receive_data(open_frame(2, {}) + open_frame(3, {})) == []
    assert frames(mux.data_to_send()) == [
        (FrameType.RST, 2, error_payload(ErrorCode.PROTOCOL_ERROR, wrong_parity)),
        (FrameType.RST, 3, error_payload(ErrorCode.PROTOCOL_ERROR, backwards)),
    ]
    assert mux.stream_state(5) is StreamState.OPEN
    assert mux.receive_data(open_frame(7, {"ok": True})) == [StreamOpenRequested(7, {"ok": True})]


def test_reusing_a_live_stream_id_resets_that_stream() -> None:
    mux = raw_responder()
    raw_accepted(mux, 1)
    reason = "OPEN reuses stream id 1; ids must increase (highest so far 1)"
    assert mux.receive_data(open_frame(1, {})) == [
        StreamReset(1, ErrorCode.PROTOCOL_ERROR, reason, by_peer=False),
        StreamClosed(1),
    ]
    assert frames(mux.data_to_send()) == [(FrameType.RST, 1, error_payload(ErrorCode.PROTOCOL_ERROR, reason))]


# --- data ---------------------------------------------------------------------------------------


def test_data_flows_both_ways_and_arrives_as_bytes() -> None:
    a, b = make_pair()
    stream_id = open_accepted(a, b)
    assert a.mux.send_data(stream_id, b"ping from a") == 11
    assert b.mux.send_data(stream_id, bytearray(b"pong from b")) == 11
    pump(a, b)
    at_b, at_a = b.take(), a.take()
    assert at_b == [DataReceived(stream_id, b"ping from a")]
    assert at_a == [DataReceived(stream_id, b"pong from b")]
    assert type(at_b[0].data) is type(at_a[0].data) is bytes


def test_large_writes_are_split_into_frames_of_at_most_64_kib() -> None:
    a, b = make_pair()
    stream_id = open_accepted(a, b)
    payload = random.Random(1).randbytes(200_000)
    assert a.mux.send_data(stream_id, memoryview(payload)) == 200_000
    wire = frames(a.mux.data_to_send())
    assert [len(body) for _, _, body in wire] == [65536, 65536, 65536, 3392]
    assert {(frame_type, sid) for frame_type, sid, _ in wire} == {(FrameType.DATA, stream_id)}
    assert b"".join(body for _, _, body in wire) == payload


def test_empty_write_sends_nothing() -> None:
    a, b = make_pair()
    stream_id = open_accepted(a, b)
    assert a.mux.send_data(stream_id, b"") == 0
    assert a.mux.data_to_send() == b""


def test_caller_mistakes_raise_specific_mux_errors_and_queue_nothing() -> None:
    a, b = make_pair()
    pending = a.mux.open_stream({"service": "web"})
    with pytest.raises(StreamNotOpenError):
        a.mux.send_data(pending, b"too early")
    with pytest.raises(StreamNotOpenError):
        a.mux.send_fin(pending)
    with pytest.raises(StreamNotRequestedError):
        a.mux.accept_stream(pending)
    with pytest.raises(UnknownStreamError, match="never opened"):
        a.mux.send_data(99, b"x")
    with pytest.raises(InvalidStreamIdError):
        a.mux.send_data(0, b"x")
    with pytest.raises(InvalidErrorCodeError):
        a.mux.reset_stream(pending, -1, "negative code")
    with pytest.raises(MuxConfigError):
        Multiplexer(is_initiator=True, initial_window=0)
    pump(a, b)
    b.mux.accept_stream(pending)
    pump(a, b)
    a.mux.send_fin(pending)
    with pytest.raises(StreamFinishedError):
        a.mux.send_data(pending, b"after fin")
    with pytest.raises(StreamFinishedError):
        a.mux.send_fin(pending)
    with pytest.raises(ConsumedTooMuchError):
        a.mux.consumed(pending, 1)
    assert issubclass(MuxError, PqtunnelError)


# --- closing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("first_to_finish", ["opener", "acceptor"])
def test_half_close_keeps_the_other_direction_open_until_its_fin(first_to_finish: str) -> None:
    a, b = make_pair()
    stream_id = open_accepted(a, b)
    first, second = (a, b) if first_to_finish == "opener" else (b, a)
    first.mux.send_data(stream_id, b"request")
    first.mux.send_fin(stream_id)
    pump(a, b)
    assert second.take() == [DataReceived(stream_id, b"request"), StreamEnded(stream_id)]
    assert first.mux.stream_state(stream_id) is StreamState.HALF_CLOSED_LOCAL
    assert second.mux.stream_state(stream_id) is StreamState.HALF_CLOSED_REMOTE
    second.mux.send_data(stream_id, b"response")
    second.mux.send_fin(stream_id)
    assert second.mux.stream_state(stream_id) is StreamState.CLOSED
    pump(a, b)
    assert first.take() == [DataReceived(stream_id, b"response"), StreamEnded(stream_id), StreamClosed(stream_id)]
    assert a.mux.stream_count == b.mux.stream_count == 0


def test_reset_aborts_both_ways_and_frames_already_in_flight_are_dropped() -> None:
    a, b = make_pair()
    stream_id = open_accepted(a, b)
    b.mux.send_data(stream_id, b"crossing the reset")
    b.mux.send_fin(stream_id)
    a.mux.reset_stream(stream_id, ErrorCode.CANCELLED, "user hit ^C")
    assert a.mux.stream_state(stream_id) is StreamState.CLOSED
    pump(a, b)
    assert a.take() == []
    assert b.take() == [StreamReset(stream_id, ErrorCode.CANCELLED, "user hit ^C"), StreamClosed(stream_id)]
    assert a.mux.data_to_send() == b.mux.data_to_send() == b""


def test_reset_and_consumed_are_no_ops_on_streams_that_are_gone() -> None:
    a, b = make_pair()
    stream_id = open_accepted(a, b)
    b.mux.reset_stream(stream_id)
    pump(a, b)
    a.mux.reset_stream(stream_id, ErrorCode.INTERNAL, "cleanup after the peer's reset")
    a.mux.consumed(stream_id, 10)
    assert a.mux.data_to_send() == b""
    with pytest.raises(UnknownStreamError, match="closed"):
        a.mux.send_data(stream_id, b"x")


def test_opener_can_cancel_a_pending_open_and_the_late_answer_is_ignored() -> None:
    a, b = make_pair()
    stream_id = a.mux.open_stream({"service": "slow"})
    pump(a, b)
    assert b.take() == [StreamOpenRequested(stream_id, {"service": "slow"})]
    b.mux.accept_stream(stream_id)
    a.mux.reset_stream(stream_id, ErrorCode.TIMED_OUT, "connect took too long")
    pump(a, b)
    assert a.take() == []
    assert b.take() == [StreamReset(stream_id, ErrorCode.TIMED_OUT, "connect took too long"), StreamClosed(stream_id)]


def test_memory_does_not_grow_with_the_number_of_past_streams() -> None:
    a, b = make_pair()
    for _ in range(2000):
        stream_id = a.mux.open_stream({"p": 1})
        pump(a, b)
        b.mux.accept_stream(stream_id)
        b.mux.send_fin(stream_id)
        pump(a, b)
        a.mux.send_fin(stream_id)
        pump(a, b)
    assert a.mux.stream_count == b.mux.stream_count == 0
    assert b.mux.stream_state(1) is b.mux.stream_state(stream_id) is StreamState.CLOSED
    assert b.mux.stream_state(stream_id + 2) is StreamState.IDLE


def test_late_frames_for_past_streams_are_ignored_and_never_opened_ids_get_rst() -> None:
    mux = raw_responder()
    raw_accepted(mux, 1)
    mux.receive_data(encode_frame(FrameType.RST, 1, error_payload(ErrorCode.CANCELLED, "")))
    late = (
        encode_frame(FrameType.DATA, 1, b"late")
        + encode_frame(FrameType.WINDOW, 1, b"\0\0\0\1")
        + encode_frame(FrameType.FIN, 1)
    )
    assert mux.receive_data(late) == []
    assert mux.data_to_send() == b""
    assert mux.receive_data(encode_frame(FrameType.DATA, 9, b"who?")) == []
    reason = "DATA for stream 9, which was never opened"
    assert frames(mux.data_to_send()) == [(FrameType.RST, 9, error_payload(ErrorCode.PROTOCOL_ERROR, reason))]
    assert mux.receive_data(encode_frame(FrameType.RST, 11, error_payload(1, "x"))) == []
    assert mux.data_to_send() == b"", "an RST is never answered with an RST"


def test_peer_frames_out_of_state_reset_only_that_stream() -> None:
    mux = raw_responder()
    raw_accepted(mux, 3)
    assert mux.receive_data(open_frame(5, {}) + encode_frame(FrameType.DATA, 5, b"before OPEN_OK")) == [
        StreamOpenRequested(5, {}),
        StreamReset(5, ErrorCode.PROTOCOL_ERROR, "DATA (length 14) on stream 5 while it is requested", by_peer=False),
        StreamClosed(5),
    ]
    events = mux.receive_data(encode_frame(FrameType.FIN, 3, b"") + encode_frame(FrameType.DATA, 3, b"after FIN"))
    assert events == [
        StreamEnded(3),
        StreamReset(3, ErrorCode.PROTOCOL_ERROR, "DATA (length 9) on stream 3 while it is half-closed (remote)", False),
        StreamClosed(3),
    ]


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (encode_frame(FrameType.OPEN_OK, 1), "OPEN_OK (length 0) on stream 1 while it is open"),
        (
            encode_frame(FrameType.OPEN_ERR, 1, error_payload(3, "")),
            "OPEN_ERR (length 15) on stream 1 while it is open",
        ),
        (encode_frame(FrameType.FIN, 1, b"x"), "FIN (length 1) on stream 1 while it is open"),
    ],
    ids=["second-open-ok", "open-err-after-accept", "fin-with-payload"],
)
def test_control_frames_that_do_not_fit_the_stream_state_reset_it(frame: bytes, reason: str) -> None:
    mux = raw_responder()
    raw_accepted(mux, 1, 3)
    assert mux.receive_data(frame) == [StreamReset(1, ErrorCode.PROTOCOL_ERROR, reason, False), StreamClosed(1)]
    assert mux.stream_state(3) is StreamState.OPEN


def test_peer_reset_codes_are_kept_even_when_unknown_or_malformed() -> None:
    mux = raw_responder()
    raw_accepted(mux, 1, 3)
    unknown = encode_frame(FrameType.RST, 1, msgpack.packb({"code": 4711, "reason": "custom", "extra": 1}))
    malformed = encode_frame(FrameType.RST, 3, b"\x93\x01\x02\x03")
    assert mux.receive_data(unknown + malformed) == [
        StreamReset(1, 4711, "custom"),
        StreamClosed(1),
        StreamReset(3, ErrorCode.PROTOCOL_ERROR, "malformed RST payload"),
        StreamClosed(3),
    ]
    assert mux.data_to_send() == b""


def test_credit_that_crosses_our_fin_is_ignored() -> None:
    mux = raw_responder()
    raw_accepted(mux, 1)
    mux.send_fin(1)
    assert mux.receive_data(encode_frame(FrameType.WINDOW, 1, (1000).to_bytes(4, "big"))) == []
    assert mux.stream_state(1) is StreamState.HALF_CLOSED_LOCAL
    assert mux.credit(1) == 0


# --- connection-level frames --------------------------------------------------------------------


def test_the_mux_has_no_ping_of_its_own_keepalive_is_the_sessions() -> None:
    assert not hasattr(Multiplexer(is_initiator=True), "ping")
    assert {0x08, 0x09}.isdisjoint(int(t) for t in FrameType), "0x08/0x09 stay reserved"


def test_goaway_stops_new_streams_while_existing_streams_finish() -> None:
    a, b = make_pair()
    stream_id = open_accepted(a, b)
    b.mux.go_away(ErrorCode.NO_ERROR, "restarting")
    pump(a, b)
    assert a.take() == [GoAwayReceived(ErrorCode.NO_ERROR, "restarting")]
    with pytest.raises(GoingAwayError):
        a.mux.open_stream({"service": "web"})
    with pytest.raises(GoingAwayError):
        b.mux.open_stream({"service": "web"})
    a.mux.send_data(stream_id, b"still flowing")
    a.mux.send_fin(stream_id)
    b.mux.send_fin(stream_id)
    pump(a, b)
    assert bytes(b.received[stream_id]) == b"still flowing"
    assert a.mux.stream_count == b.mux.stream_count == 0


def test_an_open_that_crosses_our_goaway_is_refused_with_going_away() -> None:
    a, b = make_pair()
    stream_id = a.mux.open_stream({"service": "web"})
    b.mux.go_away(ErrorCode.NO_ERROR, "bye")
    pump(a, b)
    assert a.take() == [
        GoAwayReceived(ErrorCode.NO_ERROR, "bye"),
        StreamRefused(stream_id, ErrorCode.GOING_AWAY, "GOAWAY sent; no new streams"),
        StreamClosed(stream_id),
    ]


# --- flow control -------------------------------------------------------------------------------


def test_sender_stops_at_the_window_and_resumes_when_the_reader_consumes() -> None:
    a, b = make_pair(initial_window=1000)
    stream_id = open_accepted(a, b)
    b.stalled.add(stream_id)
    assert a.mux.send_data(stream_id, b"x" * 5000) == 1000
    assert a.mux.credit(stream_id) == 0
    assert a.mux.send_data(stream_id, b"x") == 0
    pump(a, b)
    assert b.held[stream_id] == 1000
    b.mux.consumed(stream_id, 499)
    pump(a, b)
    assert a.take() == [] and a.mux.credit(stream_id) == 0, "WINDOW waits for half the window"
    b.mux.consumed(stream_id, 1)
    assert frames(b.mux.data_to_send()) == [(FrameType.WINDOW, stream_id, (500).to_bytes(4, "big"))]
    b.mux.consumed(stream_id, 500)
    pump(a, b)
    assert a.take() == [CreditAvailable(stream_id)]
    assert a.mux.credit(stream_id) == 500
    assert a.mux.send_data(stream_id, b"y" * 5000) == 500


def test_a_stalled_reader_bounds_memory_on_both_sides_while_other_streams_flow() -> None:
    window = DEFAULT_INITIAL_WINDOW
    a, b = make_pair()
    stalled, flowing = open_accepted(a, b), open_accepted(a, b)
    b.stalled.add(stalled)
    chunk = bytes(1 << 20)
    accepted_on_stalled = 0
    flowing_payload = random.Random(2).randbytes(8 << 20)
    sent_on_flowing = 0
    largest_batch = 0
    while sent_on_flowing < len(flowing_payload):
        accepted_on_stalled += a.mux.send_data(stalled, chunk)
        sent_on_flowing += a.mux.send_data(flowing, memoryview(flowing_payload)[sent_on_flowing:])
        largest_batch = max(largest_batch, pump(a, b))
    assert accepted_on_stalled == window
    assert b.held[stalled] == len(b.received[stalled]) == window
    assert a.mux.credit(stalled) == 0
    assert bytes(b.received[flowing]) == flowing_payload
    frame_overhead = HEADER_SIZE * (2 * window // MAX_DATA_PAYLOAD + 2)
    assert largest_batch <= 2 * window + frame_overhead, "at most one window per stream is ever queued"
    b.mux.consumed(stalled, window)
    pump(a, b)
    assert a.mux.credit(stalled) == window


def test_a_peer_overrunning_its_credit_gets_flow_control_reset_and_other_streams_continue() -> None:
    mux = raw_responder(initial_window=1000)
    raw_accepted(mux, 1, 3)
    assert mux.receive_data(encode_frame(FrameType.DATA, 1, b"a" * 1000)) == [DataReceived(1, b"a" * 1000)]
    reason = "stream 1: 1 bytes of DATA with only 0 bytes of credit"
    assert mux.receive_data(encode_frame(FrameType.DATA, 1, b"!")) == [
        StreamReset(1, ErrorCode.FLOW_CONTROL, reason, by_peer=False),
        StreamClosed(1),
    ]
    assert frames(mux.data_to_send()) == [(FrameType.RST, 1, error_payload(ErrorCode.FLOW_CONTROL, reason))]
    assert mux.receive_data(encode_frame(FrameType.DATA, 1, b"more")) == [], "late DATA after our RST is dropped"
    assert mux.receive_data(encode_frame(FrameType.DATA, 3, b"b" * 1000)) == [DataReceived(3, b"b" * 1000)]
    assert mux.send_data(3, b"reply") == 5


@pytest.mark.parametrize(
    ("increment", "code", "reason"),
    [
        (b"\0\0\0\0", ErrorCode.PROTOCOL_ERROR, "WINDOW with a zero increment on stream 1"),
        (b"\0\0\1", ErrorCode.PROTOCOL_ERROR, "WINDOW (length 3) on stream 1 while it is open"),
        (
            b"\xff\xff\xff\xff",
            ErrorCode.FLOW_CONTROL,
            "WINDOW increment 4294967295 on stream 1 raises its credit above 2**32-1",
        ),
    ],
    ids=["zero", "short", "overflow"],
)
def test_bad_window_updates_reset_the_stream(increment: bytes, code: ErrorCode, reason: str) -> None:
    mux = raw_responder()
    raw_accepted(mux, 1)
    assert mux.receive_data(encode_frame(FrameType.WINDOW, 1, increment)) == [
        StreamReset(1, code, reason, by_peer=False),
        StreamClosed(1),
    ]


# --- many streams -------------------------------------------------------------------------------


def test_200_parallel_streams_carry_their_bytes_intact_in_both_directions() -> None:
    rng = random.Random(200)
    a, b = make_pair(initial_window=64 * 1024)
    ids = [a.mux.open_stream({"n": n}) for n in range(200)]
    pump(a, b)
    for stream_id in ids:
        b.mux.accept_stream(stream_id)
    pump(a, b)
    upload = {sid: rng.randbytes(rng.choice([0, 1, 70_000, rng.randrange(300_000)])) for sid in ids}
    download = {sid: rng.randbytes(rng.randrange(100_000)) for sid in ids}
    peers = {"a": a, "b": b}
    pending = {("a", sid): memoryview(data) for sid, data in upload.items()}
    pending.update({("b", sid): memoryview(data) for sid, data in download.items()})
    while pending:
        for (name, sid), rest in list(pending.items()):
            mux = peers[name].mux
            rest = rest[mux.send_data(sid, rest) :]
            pending[(name, sid)] = rest
            if not rest:
                mux.send_fin(sid)
                del pending[(name, sid)]
        pump(a, b)
    def digests(streams: dict) -> dict[int, str]:
        return {sid: hashlib.sha256(streams[sid]).hexdigest() for sid in ids}

    assert digests(b.received) == digests(upload)
    assert digests(a.received) == digests(download)
    assert a.mux.stream_count == b.mux.stream_count == 0


# --- session-fatal errors -----------------------------------------------------------------------

FATAL_CASES = {
    "unknown-type": (
        b"\x0b\x00" + bytes(8),
        "unknown frame type 0x0b (stream 0, length 0)",
    ),
    "type-zero": (
        bytes(10),
        "unknown frame type 0x00 (stream 0, length 0)",
    ),
    "nonzero-flags": (
        b"\x04\x80\x00\x00\x00\x01\x00\x00\x00\x00",
        "DATA frame on stream 1 has flags 0x80; flags are reserved and must be 0",
    ),
    "oversized-data": (
        struct.pack(">BBII", 4, 0, 1, MAX_DATA_PAYLOAD + 1),
        "DATA frame on stream 1 has length 65537, above the 65536-byte limit",
    ),
    "oversized-control": (
        struct.pack(">BBII", 1, 0, 3, MAX_CONTROL_PAYLOAD + 1),
        "OPEN frame on stream 3 has length 4097, above the 4096-byte limit",
    ),
    "data-on-stream-0": (
        encode_frame(FrameType.DATA, 0, b"x"),
        "DATA frame on stream 0; stream frames need a nonzero stream id",
    ),
    "reserved-former-ping": (
        encode_frame(0x08, 0, bytes(8)),
        "unknown frame type 0x08 (stream 0, length 8)",
    ),
    "goaway-on-a-stream": (
        encode_frame(FrameType.GOAWAY, 5, msgpack.packb({"code": 0, "reason": ""})),
        "GOAWAY frame on stream 5; connection frames must use stream 0",
    ),
    "malformed-goaway": (
        encode_frame(FrameType.GOAWAY, 0, msgpack.packb({"code": "x"})),
        "malformed GOAWAY payload: expected a msgpack map with int code and str reason",
    ),
}


@pytest.mark.parametrize(("garbage", "reason"), FATAL_CASES.values(), ids=FATAL_CASES.keys())
def test_unframeable_input_is_a_protocol_violation_event_never_an_exception(garbage: bytes, reason: str) -> None:
    a, b = make_pair()
    stream_id = open_accepted(a, b)
    harmless = encode_frame(FrameType.GOAWAY, 0, error_payload(ErrorCode.NO_ERROR, ""))
    assert b.mux.receive_data(garbage + harmless) == [ProtocolViolation(reason)]
    assert b.mux.closed and b.mux.stream_count == 0
    assert b.mux.stream_state(stream_id) is StreamState.CLOSED
    goaway = b.mux.data_to_send()
    assert frames(goaway) == [(FrameType.GOAWAY, 0, error_payload(ErrorCode.PROTOCOL_ERROR, reason))]
    assert a.mux.receive_data(goaway) == [GoAwayReceived(ErrorCode.PROTOCOL_ERROR, reason)]
    assert b.mux.receive_data(harmless) == [], "input after the error is ignored"
    with pytest.raises(SessionClosedError):
        b.mux.open_stream({"service": "web"})
    b.mux.go_away()
    b.mux.reset_stream(stream_id)
    assert b.mux.data_to_send() == b""


def test_an_oversized_header_is_refused_before_its_payload_arrives() -> None:
    mux = raw_responder()
    events = mux.receive_data(struct.pack(">BBII", 4, 0, 1, 0xFFFF_FFFF))
    assert events == [ProtocolViolation("DATA frame on stream 1 has length 4294967295, above the 65536-byte limit")]


@pytest.mark.parametrize(
    ("tail", "reason"),
    [
        (b"\x04\x00\x00", "record ended inside a frame header (3 of 10 bytes)"),
        (
            encode_frame(FrameType.DATA, 1, b"hello")[:-2],
            "record ended inside a DATA frame on stream 1 (3 of 5 payload bytes)",
        ),
    ],
    ids=["header", "payload"],
)
def test_a_record_that_ends_inside_a_frame_is_a_protocol_violation(tail: bytes, reason: str) -> None:
    """Senders never split a frame across records, so the mux keeps no partial-frame buffer."""
    mux = raw_responder()
    raw_accepted(mux, 1)
    assert mux.receive_data(encode_frame(FrameType.DATA, 1, b"ok") + tail) == [
        DataReceived(1, b"ok"), ProtocolViolation(reason)]
    assert mux.closed


def test_a_clean_end_of_session_closes_the_mux_without_an_error() -> None:
    mux = raw_responder()
    raw_accepted(mux, 1)
    assert mux.receive_eof() == []
    assert mux.closed and mux.stream_count == 0
    with pytest.raises(SessionClosedError):
        mux.send_data(1, b"x")


# --- properties ---------------------------------------------------------------------------------

frame_soup = st.lists(
    st.tuples(
        st.integers(0, 12),
        st.sampled_from([0, 0, 0, 0, 1]),
        st.sampled_from([0, 1, 2, 3, 5, 7, 9, 0xFFFF_FFFF]),
        st.one_of(
            st.binary(max_size=40),
            st.builds(
                msgpack.packb,
                st.dictionaries(st.sampled_from(["code", "reason", "port"]), st.integers(-2, 5) | st.text(max_size=5)),
            ),
        ),
    ),
    max_size=12,
).map(lambda parts: b"".join(struct.pack(">BBII", t, f, s, len(p)) + p for t, f, s, p in parts))


@settings(max_examples=300, deadline=None)
@given(data=st.one_of(st.binary(max_size=300), frame_soup), accepted=st.booleans(), cut=st.integers(0, 300))
def test_arbitrary_input_never_raises_and_only_returns_events(data: bytes, accepted: bool, cut: int) -> None:
    mux = raw_responder(initial_window=16, max_streams=3)
    if accepted:
        raw_accepted(mux, 1)
    mux.open_stream({"mine": True})
    mux.data_to_send()
    events = mux.receive_data(data[:cut]) + mux.receive_data(data[cut:]) + mux.receive_eof()
    assert all(isinstance(event, Event) for event in events)
    assert mux.closed
    assert sum(isinstance(event, ProtocolViolation) for event in events) <= 1


def _script_pair(ops: list[tuple], **settings_: int) -> tuple[bytes, Multiplexer, Multiplexer]:
    """Replay the same setup on fresh muxes, then turn ``ops`` into the initiator's bytes."""
    sender, receiver, receiver_copy = _scripted(ops, **settings_)
    return sender.data_to_send(), receiver, receiver_copy


def _scripted(ops: list[tuple], **settings_: int) -> tuple[Multiplexer, Multiplexer, Multiplexer]:
    """The initiator with ``ops`` queued (not drained), its peer, and a fresh copy of the peer."""
    a, b = make_pair(initial_window=3000, **settings_)
    ids = [open_accepted(a, b, {"n": n}) for n in range(3)]
    receiver_copy = make_pair(initial_window=3000)
    for n in range(3):
        open_accepted(*receiver_copy, {"n": n})
    for op, index, arg in ops:
        stream_id = ids[index]
        try:
            if op == "data":
                a.mux.send_data(stream_id, bytes([index]) * arg)
            elif op == "fin":
                a.mux.send_fin(stream_id)
            elif op == "reset":
                a.mux.reset_stream(stream_id, ErrorCode.CANCELLED, "x" * arg)
            elif op == "open":
                ids.append(a.mux.open_stream({"arg": arg}))
        except MuxError:
            pass
    return a.mux, b.mux, receiver_copy[1].mux


ops_strategy = st.lists(
    st.tuples(
        st.sampled_from(["data", "data", "data", "fin", "reset", "open"]),
        st.integers(0, 2),
        st.integers(0, 2500),
    ),
    max_size=25,
)


def _frame_boundaries(wire: bytes) -> list[int]:
    """Offsets where a frame starts or the stream ends (the only places a record may be cut)."""
    points, pos = [0], 0
    while pos + HEADER_SIZE <= len(wire):
        pos += HEADER_SIZE + struct.unpack_from(">BBII", wire, pos)[3]
        points.append(min(pos, len(wire)))
    return points


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops_strategy, garbage=st.binary(max_size=20), cuts=st.lists(st.integers(0, 20_000), max_size=30))
def test_how_frames_are_grouped_into_records_never_changes_the_events(
    ops: list[tuple], garbage: bytes, cuts: list[int]
) -> None:
    wire, whole, chunked = _script_pair(ops)
    boundaries = _frame_boundaries(wire)
    wire += garbage
    expected = whole.receive_data(wire)
    got: list[Event] = []
    points = sorted({boundaries[c % len(boundaries)] for c in cuts} | {0, len(wire)})
    for start, stop in zip(points, points[1:]):
        got += chunked.receive_data(wire[start:stop])
    assert got == expected
    assert chunked.data_to_send() == whole.data_to_send()
    assert chunked.receive_eof() == whole.receive_eof()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops_strategy, extra=st.integers(0, 3 * MAX_FRAME))
def test_batches_for_records_hold_whole_frames_within_the_limit_and_keep_the_order(ops: list[tuple], extra: int) -> None:
    expected_wire, _, _ = _script_pair(ops)
    limit = MAX_FRAME + extra
    sender, _, _ = _scripted(ops, batch_limit=limit)
    batches = sender.batches_to_send()
    assert b"".join(bytes(b[BATCH_RESERVED:]) for b in batches) == expected_wire
    for batch in batches:
        frames_ = bytes(batch[BATCH_RESERVED:])
        assert 0 < len(frames_) <= limit
        assert _frame_boundaries(frames_)[-1] == len(frames_), "a batch ends on a frame boundary"
    assert sender.batches_to_send() == [], "draining hands the batches over once"


def test_bulk_data_is_batched_as_it_is_queued_with_a_free_byte_for_the_record_layer() -> None:
    a, b = make_pair()
    stream_id = open_accepted(a, b)
    data = random.Random(7).randbytes(DEFAULT_INITIAL_WINDOW)
    assert a.mux.send_data(stream_id, data) == len(data)
    batches = a.mux.batches_to_send()
    per_batch = MAX_RECORD_PLAINTEXT // MAX_FRAME  # whole 64 KiB frames that fit one record: 3
    assert [len(batch) for batch in batches] == [BATCH_RESERVED + per_batch * MAX_FRAME] * 5 + [BATCH_RESERVED + MAX_FRAME]
    for batch in batches:
        assert isinstance(batch, bytearray), "the record layer writes its content type into the free byte"
        b.feed(bytes(batch[BATCH_RESERVED:]))  # one record each: the peer parses it on its own
    assert b.received[stream_id] == data


def test_a_batch_limit_below_the_largest_frame_is_refused() -> None:
    with pytest.raises(MuxConfigError):
        Multiplexer(is_initiator=True, batch_limit=MAX_FRAME - 1)


# --- test vectors (docs/PROTOCOL.md section 7, "Test vectors") ------------------------------------------

VECTOR_STREAM_LIFECYCLE = [
    ("I", "0100000000010000000d81a773657276696365a3776562"),
    ("R", "02000000000100000000"),
    ("I", "0400000000010000000568656c6c6f" "06000000000100000000"),
    ("R", "04000000000100000002" "6869" "06000000000100000000"),
]

VECTOR_CONTROL_FRAMES = {
    "open_port": "0100000000030000000981a4706f7274cd1f90",
    "open_err": "0300000000030000001e82a4636f646504a6726561736f6eaf6e6f20737563682073657276696365",
    "window": "0500000000050000000400020000",
    "rst": "0700000000050000001282a4636f646508a6726561736f6ea3627965",
    "goaway": "0a00000000000000001782a4636f646500a6726561736f6ea873687574646f776e",
}


def test_vector_stream_lifecycle_is_reproduced_byte_for_byte() -> None:
    a, b = make_pair()
    stream_id = a.mux.open_stream({"service": "web"})
    produced = [("I", a.mux.data_to_send().hex())]
    b.feed(bytes.fromhex(produced[0][1]))
    b.mux.accept_stream(stream_id)
    produced.append(("R", b.mux.data_to_send().hex()))
    a.feed(bytes.fromhex(produced[1][1]))
    a.mux.send_data(stream_id, b"hello")
    a.mux.send_fin(stream_id)
    produced.append(("I", a.mux.data_to_send().hex()))
    b.feed(bytes.fromhex(produced[2][1]))
    b.mux.send_data(stream_id, b"hi")
    b.mux.send_fin(stream_id)
    produced.append(("R", b.mux.data_to_send().hex()))
    a.feed(bytes.fromhex(produced[3][1]))
    assert produced == VECTOR_STREAM_LIFECYCLE
    assert a.take()[-3:] == [DataReceived(1, b"hi"), StreamEnded(1), StreamClosed(1)]
    assert b.take() == [StreamOpenRequested(1, {"service": "web"}), DataReceived(1, b"hello"), StreamEnded(1)]


def test_vector_control_frames_are_reproduced_byte_for_byte() -> None:
    window = 262144  # the vector's W (docs/PROTOCOL.md), not the current default
    a, b = make_pair(initial_window=window)
    open_accepted(a, b)
    produced: dict[str, str] = {}
    a.mux.open_stream({"port": 8080})
    produced["open_port"] = a.mux.data_to_send().hex()
    b.feed(bytes.fromhex(produced["open_port"]))
    b.mux.refuse_stream(3, ErrorCode.UNKNOWN_SERVICE, "no such service")
    produced["open_err"] = b.mux.data_to_send().hex()
    a.feed(bytes.fromhex(produced["open_err"]))
    stream_id = open_accepted(a, b)
    b.stalled.add(stream_id)
    a.mux.send_data(stream_id, bytes(window))
    pump(a, b)
    b.mux.consumed(stream_id, window // 2)
    produced["window"] = b.mux.data_to_send().hex()
    a.mux.reset_stream(stream_id, ErrorCode.CANCELLED, "bye")
    produced["rst"] = a.mux.data_to_send().hex()
    b.mux.go_away(ErrorCode.NO_ERROR, "shutdown")
    produced["goaway"] = b.mux.data_to_send().hex()
    assert produced == VECTOR_CONTROL_FRAMES
    assert a.mux.receive_data(bytes.fromhex(produced["goaway"])) == [GoAwayReceived(ErrorCode.NO_ERROR, "shutdown")]
