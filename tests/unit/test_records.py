"""Spec for the record layer (pqtunnel/records.py) and the outer framing (pqtunnel/wire.py).

    length u32 | kind u8 (0x10) | session_id [8] | counter u64 | AEAD(content_type u8 | data)

The 21-byte header is the AEAD's associated data, the nonce is the explicit counter, and
counters strictly increase per direction for the life of a session, across rekeys.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pqtunnel.crypto.suites import CLASSICAL, HYBRID, Aead
from pqtunnel.errors import (
    CounterReplayError,
    FramingError,
    OversizedRecordError,
    RecordAuthError,
    RecordError,
    SessionIdMismatchError,
)
from pqtunnel.identity import Identity
from pqtunnel.records import MAX_COUNTER, RECORD_HEADER, RECORD_PREFIX, ContentType, RecordLayer
from pqtunnel.wire import (
    FRAME_HEADER,
    MAX_HANDSHAKE_FRAME,
    MAX_RECORD_FRAME,
    MAX_RECORD_PLAINTEXT,
    FrameDecoder,
    Kind,
    encode_frame,
)
from tests.conftest import NOW_MS, establish, flip_bit, one_frame, pump

KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))
SESSION_ID = b"\x5e\x55\x10\x4e\x1d\x00\x00\x01"
AEADS = [Aead.CHACHA20_POLY1305, Aead.AES_256_GCM]


def layers(aead: Aead = Aead.CHACHA20_POLY1305, session_id: bytes = SESSION_ID) -> tuple[RecordLayer, RecordLayer]:
    """A sender and the matching receiver (keys mirrored, as after a handshake)."""
    return (RecordLayer(aead, KEY_A, KEY_B, session_id), RecordLayer(aead, KEY_B, KEY_A, session_id))


def body_of(record: bytes) -> bytes:
    frame = one_frame(record)
    assert frame.kind is Kind.RECORD
    return frame.body


# --- seal / open -------------------------------------------------------------------------------------


@pytest.mark.parametrize("aead", AEADS, ids=lambda a: a.label)
@pytest.mark.parametrize("size", [0, 1, 1_000, MAX_RECORD_PLAINTEXT], ids=["empty", "1", "1000", "max"])
def test_a_sealed_record_opens_to_the_same_content(aead: Aead, size: int) -> None:
    sender, receiver = layers(aead)
    data = bytes(i % 251 for i in range(size))
    record = sender.seal(ContentType.DATA, data)
    assert len(record) == RECORD_HEADER.size + 1 + size + 16
    assert receiver.open(body_of(record)) == (ContentType.DATA, data)


@pytest.mark.parametrize("aead", AEADS, ids=lambda a: a.label)
@pytest.mark.parametrize("size", [0, 1, 1_000, MAX_RECORD_PLAINTEXT], ids=["empty", "1", "1000", "max"])
def test_a_record_prepared_in_place_is_the_same_record_byte_for_byte(aead: Aead, size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    copied, in_place = layers(aead)[0], layers(aead)[0]
    buffer = bytearray(1) + data  # the content type's byte is free, as in a mux batch
    assert b"".join(in_place.seal_prepared(ContentType.DATA, buffer)) == copied.seal(ContentType.DATA, data)
    assert in_place.next_send_counter == copied.next_send_counter == 1


def test_a_prepared_record_over_the_limit_or_without_its_free_byte_is_refused_unsealed() -> None:
    sender, _ = layers()
    with pytest.raises(OversizedRecordError):
        sender.seal_prepared(ContentType.DATA, bytearray(MAX_RECORD_PLAINTEXT + 2))
    with pytest.raises(RecordError):
        sender.seal_prepared(ContentType.DATA, bytearray())
    assert sender.next_send_counter == 0, "no counter is spent on a refused record"


@pytest.mark.parametrize("content_type", list(ContentType), ids=lambda c: c.name)
def test_every_content_type_survives_the_roundtrip(content_type: ContentType) -> None:
    sender, receiver = layers()
    assert receiver.open(body_of(sender.seal(content_type, b"x"))) == (content_type, b"x")


def test_the_header_is_in_clear_and_the_data_is_not() -> None:
    sender, _ = layers()
    sender.next_send_counter = 0x0102030405060708
    record = sender.seal(ContentType.DATA, b"attack at dawn")
    length, kind, session_id, counter = RECORD_HEADER.unpack_from(record)
    assert (length, kind, session_id, counter) == (len(record) - 4, Kind.RECORD, SESSION_ID, 0x0102030405060708)
    assert b"attack at dawn" not in record


def test_the_two_aeads_do_not_open_each_others_records() -> None:
    chacha, _ = layers(Aead.CHACHA20_POLY1305)
    _, aes = layers(Aead.AES_256_GCM)
    with pytest.raises(RecordAuthError):
        aes.open(body_of(chacha.seal(ContentType.DATA, b"hello")))


def test_a_record_under_another_key_is_refused() -> None:
    sender = RecordLayer(Aead.CHACHA20_POLY1305, KEY_A, KEY_B, SESSION_ID)
    stranger = RecordLayer(Aead.CHACHA20_POLY1305, KEY_B, KEY_B, SESSION_ID)
    with pytest.raises(RecordAuthError):
        stranger.open(body_of(sender.seal(ContentType.DATA, b"hello")))


# --- tampering -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("aead", AEADS, ids=lambda a: a.label)
def test_a_flipped_bit_anywhere_in_a_record_is_refused_and_not_accepted(aead: Aead) -> None:
    """Every bit of session id, counter, ciphertext and tag. A refused record must leave the
    receiver untouched: the genuine record still opens afterwards."""
    sender, receiver = layers(aead)
    body = body_of(sender.seal(ContentType.DATA, b"forty bytes of perfectly ordinary data.."))
    refusals: dict[type, int] = {}
    for position in range(len(body)):
        for bit in range(8):
            with pytest.raises(RecordError) as refused:
                receiver.open(flip_bit(body, position, bit))
            refusals[type(refused.value)] = refusals.get(type(refused.value), 0) + 1
            assert receiver.last_recv_counter == -1
    assert refusals[SessionIdMismatchError] == 8 * 8
    assert refusals[RecordAuthError] == 8 * (len(body) - 8)  # counter flips fail authentication, not replay
    assert receiver.open(body) == (ContentType.DATA, b"forty bytes of perfectly ordinary data..")


def test_a_flipped_counter_bit_below_the_last_counter_is_a_replay() -> None:
    sender, receiver = layers()
    sender.next_send_counter = 0b1000
    body = body_of(sender.seal(ContentType.DATA, b"x"))
    receiver.open(body)
    lowered = flip_bit(body, 8 + 7, 3)  # counter 8 -> 0
    with pytest.raises(CounterReplayError):
        receiver.open(lowered)


def test_a_flipped_bit_in_the_frame_header_never_yields_an_accepted_record() -> None:
    """length and kind are outside the frame body but inside the AEAD's associated data: a
    flip is a framing error, a stall (more bytes expected), or a refused record."""
    sender, receiver = layers()
    record = sender.seal(ContentType.DATA, b"some data")
    trailer = sender.seal(ContentType.DATA, b"next record")
    for position in range(FRAME_HEADER.size):
        for bit in range(8):
            decoder = FrameDecoder()
            try:
                frames = decoder.feed(flip_bit(record, position, bit) + trailer)
            except FramingError:
                continue
            for frame in frames[:1]:
                if frame.kind is Kind.RECORD:
                    with pytest.raises(RecordError):
                        receiver.open(frame.body)
            assert receiver.last_recv_counter == -1


def test_a_record_too_short_to_hold_a_tag_is_refused() -> None:
    _, receiver = layers()
    with pytest.raises(RecordError, match="too short"):
        receiver.open(RECORD_PREFIX.pack(SESSION_ID, 0) + b"\x00" * 16)


def test_an_authenticated_record_with_an_unknown_content_type_is_refused() -> None:
    sender, receiver = layers()
    with pytest.raises(RecordError, match="content type"):
        receiver.open(body_of(sender.seal(0x7F, b"")))  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200))
def test_arbitrary_record_bodies_are_refused_with_a_record_error(body: bytes) -> None:
    _, receiver = layers()
    with pytest.raises(RecordError):
        receiver.open(body)


# --- counters -------------------------------------------------------------------------------------------


def test_a_replayed_record_is_refused() -> None:
    sender, receiver = layers()
    body = body_of(sender.seal(ContentType.DATA, b"once"))
    receiver.open(body)
    with pytest.raises(CounterReplayError):
        receiver.open(body)


def test_records_out_of_order_are_refused() -> None:
    sender, receiver = layers()
    first = body_of(sender.seal(ContentType.DATA, b"1"))
    second = body_of(sender.seal(ContentType.DATA, b"2"))
    receiver.open(second)
    with pytest.raises(CounterReplayError):
        receiver.open(first)


def test_gaps_in_the_counter_are_allowed() -> None:
    """A replica taking over a session jumps its counter ahead; the receiver follows."""
    sender, receiver = layers()
    first = body_of(sender.seal(ContentType.DATA, b"1"))
    sender.seal(ContentType.DATA, b"lost")
    third = body_of(sender.seal(ContentType.DATA, b"3"))
    jumped = RecordLayer(Aead.CHACHA20_POLY1305, KEY_A, KEY_B, SESSION_ID, first_send_counter=1_000_000)
    far = body_of(jumped.seal(ContentType.DATA, b"far"))
    assert [receiver.open(b)[1] for b in (first, third, far)] == [b"1", b"3", b"far"]
    assert receiver.last_recv_counter == 1_000_000
    with pytest.raises(CounterReplayError):
        receiver.open(third)


def test_the_counter_increases_by_one_per_record_and_refused_seals_do_not_consume_one() -> None:
    sender, _ = layers()
    counters = [RECORD_HEADER.unpack_from(sender.seal(ContentType.DATA, b"x"))[3] for _ in range(5)]
    assert counters == [0, 1, 2, 3, 4]
    with pytest.raises(OversizedRecordError):
        sender.seal(ContentType.DATA, b"\x00" * (MAX_RECORD_PLAINTEXT + 1))
    assert sender.next_send_counter == 5


def test_the_last_counter_is_usable_and_then_the_sender_refuses_to_wrap() -> None:
    sender, receiver = layers()
    sender.next_send_counter = MAX_COUNTER
    assert receiver.open(body_of(sender.seal(ContentType.DATA, b"last")))[1] == b"last"
    with pytest.raises(RecordError, match="exhausted"):
        sender.seal(ContentType.DATA, b"one too many")


def test_a_record_for_another_session_is_refused() -> None:
    sender = RecordLayer(Aead.CHACHA20_POLY1305, KEY_A, KEY_B, b"\x00" * 8)
    _, receiver = layers()
    with pytest.raises(SessionIdMismatchError):
        receiver.open(body_of(sender.seal(ContentType.DATA, b"wrong session")))
    assert receiver.last_recv_counter == -1


def test_a_session_id_must_be_eight_bytes() -> None:
    with pytest.raises(ValueError):
        RecordLayer(Aead.CHACHA20_POLY1305, KEY_A, KEY_B, b"short")


def test_an_oversized_plaintext_is_refused() -> None:
    sender, _ = layers()
    with pytest.raises(OversizedRecordError):
        sender.seal(ContentType.DATA, b"\x00" * (MAX_RECORD_PLAINTEXT + 1))


def test_a_maximum_record_fits_the_frame_limit() -> None:
    sender, _ = layers()
    record = sender.seal(ContentType.DATA, b"\x00" * MAX_RECORD_PLAINTEXT)
    assert FRAME_HEADER.unpack_from(record)[0] == MAX_RECORD_FRAME
    assert one_frame(record).kind is Kind.RECORD


# --- framing -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "limit"), [(Kind.RECORD, MAX_RECORD_FRAME), (Kind.HELLO, MAX_HANDSHAKE_FRAME),
                                             (Kind.ALERT, MAX_HANDSHAKE_FRAME)], ids=lambda v: getattr(v, "name", str(v)))
def test_an_oversized_length_is_refused_from_the_header_alone(kind: Kind, limit: int) -> None:
    """The decoder must not buffer a body it is going to refuse."""
    with pytest.raises(FramingError, match="exceeds"):
        FrameDecoder().feed(FRAME_HEADER.pack(limit + 1, kind))
    decoder = FrameDecoder()
    assert decoder.feed(FRAME_HEADER.pack(limit, kind)) == []  # at the limit: wait for the body
    assert decoder.buffered == FRAME_HEADER.size


@pytest.mark.parametrize("kind", [0x00, 0x08, 0x0F, 0x11, 0xFF])
def test_an_unknown_frame_kind_is_refused(kind: int) -> None:
    with pytest.raises(FramingError, match="unknown frame kind"):
        FrameDecoder().feed(FRAME_HEADER.pack(5, kind) + b"hello")


def test_a_zero_length_frame_is_refused() -> None:
    with pytest.raises(FramingError):
        FrameDecoder().feed(FRAME_HEADER.pack(0, Kind.RECORD))


def test_frames_can_arrive_one_byte_at_a_time() -> None:
    sender, _ = layers()
    stream = (encode_frame(Kind.HELLO, b"hello body") + sender.seal(ContentType.DATA, b"data")
              + encode_frame(Kind.ALERT, b"") + sender.seal(ContentType.PING, b"p" * 16))
    expected = FrameDecoder().feed(stream)
    assert [f.kind for f in expected] == [Kind.HELLO, Kind.RECORD, Kind.ALERT, Kind.RECORD]
    decoder = FrameDecoder()
    got = []
    for i in range(len(stream)):
        got += decoder.feed(stream[i : i + 1])
        assert decoder.buffered <= max(len(encode_frame(f.kind, f.body)) for f in expected)
    assert got == expected and decoder.buffered == 0


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(0, 200), max_size=10))
def test_frames_split_at_arbitrary_points_decode_identically(cuts: list[int]) -> None:
    stream = b"".join(encode_frame(Kind.HELLO, bytes([i]) * (i * 7)) for i in range(1, 6))
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    decoder = FrameDecoder()
    got = []
    for start, end in zip(points, points[1:]):
        got += decoder.feed(stream[start:end])
    assert got == FrameDecoder().feed(stream)


# --- nonce uniqueness across rekeys -----------------------------------------------------------------------


def _record_counters(chunks: list[bytes]) -> list[int]:
    frames = FrameDecoder().feed(b"".join(chunks))
    return [RECORD_PREFIX.unpack_from(f.body)[1] for f in frames if f.kind is Kind.RECORD]


@pytest.mark.parametrize("suite", [CLASSICAL, HYBRID], ids=lambda s: s.name)
def test_counters_never_repeat_and_keys_never_repeat_across_rekeys(suite, alice: Identity, bob: Identity,
                                                                   monkeypatch) -> None:
    """A (key, nonce) pair must never repeat. Counters run on across rekeys (never reset by
    start_rekey or set_send_key), every epoch gets fresh keys, and the two directions never
    share a key (they would otherwise both use counters 0, 1, 2, ...)."""
    keys_set: list[tuple[int, str, bytes, int]] = []  # (layer id, "send"/"recv", key, next_send_counter)
    real_send, real_recv = RecordLayer.set_send_key, RecordLayer.set_recv_key

    def set_send_key(self, key):
        keys_set.append((id(self), "send", key, self.next_send_counter))
        real_send(self, key)

    def set_recv_key(self, key):
        keys_set.append((id(self), "recv", key, self.next_send_counter))
        real_recv(self, key)

    monkeypatch.setattr(RecordLayer, "set_send_key", set_send_key)
    monkeypatch.setattr(RecordLayer, "set_recv_key", set_recv_key)
    a, b = establish(alice, bob, suite=suite)
    send_keys = {id(a.records): [a.result.send_key], id(b.records): [b.result.send_key]}
    wire: list[tuple[str, bytes]] = []
    counters_before_rekey: list[int] = []
    for epoch in range(1, 7):
        rekeyer = a if epoch % 2 else b
        a.send(b"a" * 100, NOW_MS)
        b.send(b"b" * 100, NOW_MS)
        counters_before_rekey.append(rekeyer.records.next_send_counter)
        rekeyer.start_rekey(NOW_MS)
        assert rekeyer.records.next_send_counter == counters_before_rekey[-1] + 1  # REKEY_INIT took one
        a.send(b"during", NOW_MS)
        b.send(b"during", NOW_MS)
        pump(a, b, NOW_MS, wire=wire)
        assert a.epoch == b.epoch == epoch
    for layer_id, direction, key, counter in keys_set:
        if direction == "send":
            send_keys[layer_id].append(key)
    counters_a = _record_counters([data for who, data in wire if who == "a"])
    counters_b = _record_counters([data for who, data in wire if who == "b"])
    for counters in (counters_a, counters_b):
        assert counters == sorted(set(counters)), "counters must strictly increase, across every rekey"
        assert len(counters) > 6 * 3
    all_a, all_b = send_keys[id(a.records)], send_keys[id(b.records)]
    assert len(all_a) == len(all_b) == 7
    assert len(set(all_a)) == 7 and len(set(all_b)) == 7, "a key was reused across epochs"
    assert not set(all_a) & set(all_b), "the two directions shared a key"
    per_layer_counters = [c for lid, d, k, c in keys_set if d == "send" and lid == id(a.records)]
    assert per_layer_counters == sorted(per_layer_counters) and per_layer_counters[0] > 0


def test_set_send_key_does_not_reset_the_counter() -> None:
    sender, _ = layers()
    for _ in range(3):
        sender.seal(ContentType.DATA, b"x")
    sender.set_send_key(bytes(32))
    assert RECORD_HEADER.unpack_from(sender.seal(ContentType.DATA, b"y"))[3] == 3
