"""Spec for session handover between replicas (pqtunnel/handover.py, Session/Tunnel):
wrapped snapshots, reserved counters, and the RESUME exchange, driven without I/O.

alice dials replica r1 of bob; r1 seals only with counters of reserved blocks; its session
snapshot, wrapped, lets replica r2 continue the same session when alice comes back over a
new connection with RESUME. A dict stands in for the shared store's marks here; the
real stores are specified in tests/e2e/test_noncestore.py.
"""

from __future__ import annotations

import pytest

from pqtunnel.errors import CounterReplayError, NoCounterError, RecordAuthError, RecordError, StoreDataError
from pqtunnel.handover import SessionSnapshot, StateWrapper, resume_key_id
from pqtunnel.handshake import InitiatorHandshake, ResponderHandshake
from pqtunnel.identity import Identity
from pqtunnel.leases import CounterLease, Granted, counter_key_id
from pqtunnel.records import ContentType
from pqtunnel.session import Session, SessionState
from pqtunnel.tunnel import CountersNeeded, DataReceived, Established, Event, Resumed, StreamOpenRequested, Tunnel
from pqtunnel.wire import FrameDecoder, Kind
from tests.conftest import NOW_MS, PEER_ADDRESS, accept_as

MONO = 7_000
BLOCK = 64


class Marks:
    """The store's high-water marks, with compare-and-swap: what replicas share."""

    def __init__(self) -> None:
        self.marks: dict[str, int] = {}

    def lease(self, key_id: str, *, fresh: bool) -> CounterLease:
        """A lease with its first block granted (as the daemon's keeper would get it)."""
        lease = CounterLease(key_id, None, block_size=BLOCK) if fresh else \
            CounterLease.takeover(key_id, self.marks[key_id], block_size=BLOCK)
        self.grant(lease)
        return lease

    def grant(self, lease: CounterLease) -> None:
        request = lease.wants_reservation()
        assert request is not None and self.marks.get(request.key_id) == request.expected_mark
        self.marks[request.key_id] = request.new_mark
        lease.feed(request, Granted())


def pump(a: Tunnel, b: Tunnel) -> tuple[list[Event], list[Event]]:
    at_a: list[Event] = []
    at_b: list[Event] = []
    for _ in range(20):
        from_a, from_b = b"".join(a.buffers_to_send()), b"".join(b.buffers_to_send())
        if not from_a and not from_b:
            return at_a, at_b
        at_b += b.receive_data(from_a, MONO, NOW_MS) if from_a else []
        at_a += a.receive_data(from_b, MONO, NOW_MS) if from_b else []
    raise AssertionError("tunnels kept talking")


def records_in(data: bytes) -> list[tuple[bytes, int]]:
    """(session id, counter) of every RECORD frame in ``data``."""
    return [(bytes(f.body[:8]), int.from_bytes(f.body[8:16], "big"))
            for f in FrameDecoder().feed(data) if f.kind is Kind.RECORD]


@pytest.fixture
def marks() -> Marks:
    return Marks()


@pytest.fixture
def r1_session(alice: Identity, bob: Identity, marks: Marks) -> tuple[Tunnel, Tunnel, CounterLease]:
    """alice's tunnel and replica r1's, established, r1 sealing from a reserved block."""
    a = Tunnel(InitiatorHandshake(alice, accept_as("bob")), now_ms=MONO)
    r1 = Tunnel(ResponderHandshake(bob, accept_as("alice"), peer_address=PEER_ADDRESS), now_ms=MONO, shared_keys=True)
    a.start(MONO, NOW_MS)
    at_a, at_r1 = pump(a, r1)
    needed = [e for e in at_r1 if isinstance(e, CountersNeeded)]
    assert len(needed) == 1 and r1.state is SessionState.RESERVING and at_a == []
    lease = marks.lease(counter_key_id(needed[0].result.session_id, "r2i"), fresh=True)
    assert [type(e) for e in r1.attach_counters(lease, MONO, "r1")] == [Established]
    at_a, _ = pump(a, r1)
    assert [type(e) for e in at_a] == [Established]
    return a, r1, lease


def take_over(bob: Identity, marks: Marks, r1: Tunnel, a: Tunnel) -> tuple[Tunnel, Tunnel, bytes]:
    """r1's snapshot is wrapped into the store; alice resumes on a new connection to r2."""
    blob = StateWrapper.for_identity(bob).wrap(r1.session.snapshot(NOW_MS))
    assert a.result is not None
    snapshot = StateWrapper.for_identity(bob).unwrap(a.result.session_id, blob)
    r2 = Tunnel.around(Session.from_snapshot(snapshot, backend=r1.session.backend, entropy=r1.session.entropy,
                                             now_ms=MONO), now_ms=MONO)
    a2 = Tunnel.around(Session.resuming(a.session, MONO), now_ms=MONO)
    a2.start(MONO, NOW_MS)
    resume = b"".join(a2.buffers_to_send())
    return a2, r2, resume


def resume_at(r2: Tunnel, resume: bytes, marks: Marks) -> list[Event]:
    """What the daemon does with a RESUME: open it, check its counter in the store, take over."""
    frame = FrameDecoder().feed(resume)[0]
    counter, _ = r2.session.open_resume(frame.body)
    key = resume_key_id(r2.session.result.session_id)
    if marks.marks.get(key, 0) > counter:
        raise CounterReplayError("RESUME replayed")
    marks.marks[key] = counter + 1
    lease = marks.lease(counter_key_id(r2.session.result.session_id, "r2i"), fresh=False)
    return r2.attach_counters(lease, MONO, "r2")


class TestReservedCounters:
    def test_a_replica_sends_nothing_before_its_first_block_is_reserved(self, alice: Identity, bob: Identity) -> None:
        a = Tunnel(InitiatorHandshake(alice, accept_as("bob")), now_ms=MONO)
        r1 = Tunnel(ResponderHandshake(bob, accept_as("alice"), peer_address=PEER_ADDRESS),
                    now_ms=MONO, shared_keys=True)
        a.start(MONO, NOW_MS)
        pump(a, r1)
        assert r1.state is SessionState.RESERVING
        r1.tick(MONO + 9_999)  # no keepalive ping either (the handshake timeout still runs)
        r1.close("going away")
        assert records_in(b"".join(r1.buffers_to_send())) == []

    def test_every_record_of_a_replica_carries_a_counter_of_its_reserved_blocks(
            self, r1_session: tuple[Tunnel, Tunnel, CounterLease], marks: Marks) -> None:
        a, r1, lease = r1_session
        sid = a.open_stream({"service": "x"})
        pump(a, r1)
        r1.accept_stream(sid)
        for _ in range(BLOCK // 4):
            r1.send_data(sid, b"y" * 10)
            r1.ping(MONO)
        sent = records_in(b"".join(r1.buffers_to_send()))
        assert all(counter < marks.marks[lease.key_id] for _, counter in sent)

    def test_a_replica_without_counters_refuses_to_seal_and_stops_taking_stream_data(
            self, r1_session: tuple[Tunnel, Tunnel, CounterLease]) -> None:
        a, r1, lease = r1_session
        while lease.available:
            r1.ping(MONO)
        assert not r1.writable
        with pytest.raises(NoCounterError):
            r1.ping(MONO)


class TestWrappedSnapshot:
    def test_a_snapshot_survives_wrapping_and_names_the_same_session_and_peer(
            self, r1_session: tuple[Tunnel, Tunnel, CounterLease], bob: Identity) -> None:
        _, r1, _ = r1_session
        snapshot = r1.session.snapshot(NOW_MS)
        again = StateWrapper.for_identity(bob).unwrap(snapshot.session_id, StateWrapper.for_identity(bob).wrap(snapshot))
        assert again == snapshot
        assert again.result().peer.fingerprint == r1.result.peer.fingerprint

    def test_the_wrapped_blob_holds_no_key_in_plain_text(self, r1_session: tuple[Tunnel, Tunnel, CounterLease],
                                                        bob: Identity) -> None:
        snapshot = r1_session[1].session.snapshot(NOW_MS)
        blob = StateWrapper.for_identity(bob).wrap(snapshot)
        for secret in (snapshot.send_key, snapshot.recv_key, snapshot.rekey_chain):
            assert secret not in blob

    @pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
    def test_a_damaged_blob_is_refused(self, r1_session: tuple[Tunnel, Tunnel, CounterLease], bob: Identity,
                                       damage: str) -> None:
        snapshot = r1_session[1].session.snapshot(NOW_MS)
        blob = bytearray(StateWrapper.for_identity(bob).wrap(snapshot))
        if damage == "flip":
            blob[-5] ^= 1
        elif damage == "truncate":
            del blob[40:]
        else:
            blob = bytearray(b"{\"keys\": \"please\"}")
        with pytest.raises(StoreDataError):
            StateWrapper.for_identity(bob).unwrap(snapshot.session_id, bytes(blob))

    def test_another_nodes_blob_and_a_blob_moved_to_another_session_are_refused(
            self, r1_session: tuple[Tunnel, Tunnel, CounterLease], alice: Identity, bob: Identity) -> None:
        snapshot = r1_session[1].session.snapshot(NOW_MS)
        foreign = StateWrapper.for_identity(alice).wrap(snapshot)
        with pytest.raises(StoreDataError, match="fails authentication"):
            StateWrapper.for_identity(bob).unwrap(snapshot.session_id, foreign)
        ours = StateWrapper.for_identity(bob).wrap(snapshot)
        with pytest.raises(StoreDataError):
            StateWrapper.for_identity(bob).unwrap(b"\x01" * 8, ours)

    def test_a_well_wrapped_but_malformed_snapshot_is_refused(self, bob: Identity) -> None:
        wrapper = StateWrapper.for_identity(bob)
        bad = SessionSnapshot(b"\x02" * 8, "no-such-suite", r_aead(), {}, "x", b"", b"", b"k" * 32, b"k" * 32, b"", 0, 0, 1)
        with pytest.raises(StoreDataError, match="malformed"):
            wrapper.unwrap(bad.session_id, wrapper.wrap(bad))


def r_aead():  # noqa: ANN201 - a tiny helper for the malformed snapshot above
    from pqtunnel.crypto.suites import Aead
    return Aead.CHACHA20_POLY1305


class TestResume:
    def test_alice_continues_the_same_session_on_another_replica(
            self, r1_session: tuple[Tunnel, Tunnel, CounterLease], bob: Identity, marks: Marks) -> None:
        a, r1, _ = r1_session
        a2, r2, resume = take_over(bob, marks, r1, a)
        assert a2.state is SessionState.RESUMING
        assert [type(e) for e in resume_at(r2, resume, marks)] == [Established]
        at_a, _ = pump(a2, r2)
        assert at_a == [Established(a.result), Resumed("r2", 1)]
        assert a2.result.session_id == a.result.session_id and r2.session.migrations == 1
        sid = a2.open_stream({"service": "after-the-move"})
        pump(a2, r2)
        r2.accept_stream(sid)
        r2.send_data(sid, b"still here")
        at_a, _ = pump(a2, r2)
        assert DataReceived(sid, b"still here") in at_a

    def test_counters_never_repeat_across_the_move_in_either_direction(
            self, r1_session: tuple[Tunnel, Tunnel, CounterLease], bob: Identity, marks: Marks) -> None:
        a, r1, _ = r1_session
        r1.ping(MONO)
        before_r1 = records_in(b"".join(r1.buffers_to_send()))
        a.ping(MONO)
        before_a = records_in(b"".join(a.buffers_to_send()))
        a2, r2, resume = take_over(bob, marks, r1, a)
        resume_at(r2, resume, marks)
        after_r2 = records_in(b"".join(r2.buffers_to_send()))
        a2.ping(MONO)
        after_a = records_in(b"".join(a2.buffers_to_send()))
        assert max(c for _, c in before_r1) < min(c for _, c in after_r2)
        assert max(c for _, c in before_a) < min(c for _, c in records_in(resume) + after_a)

    def test_a_record_from_before_the_move_is_refused_after_it(
            self, r1_session: tuple[Tunnel, Tunnel, CounterLease], bob: Identity, marks: Marks) -> None:
        a, r1, _ = r1_session
        a.ping(MONO)
        old = b"".join(a.buffers_to_send())
        a2, r2, resume = take_over(bob, marks, r1, a)
        resume_at(r2, resume, marks)
        pump(a2, r2)
        with pytest.raises(CounterReplayError):
            r2.receive_data(old, MONO, NOW_MS)

    def test_a_replayed_resume_is_refused_at_another_replica(
            self, r1_session: tuple[Tunnel, Tunnel, CounterLease], bob: Identity, marks: Marks) -> None:
        a, r1, _ = r1_session
        a2, r2, resume = take_over(bob, marks, r1, a)
        resume_at(r2, resume, marks)
        snapshot = r2.session.snapshot(NOW_MS)
        r3 = Tunnel.around(Session.from_snapshot(snapshot, backend=r2.session.backend, entropy=r2.session.entropy,
                                                 now_ms=MONO), now_ms=MONO)
        with pytest.raises(CounterReplayError):
            resume_at(r3, resume, marks)

    def test_a_resume_under_other_keys_is_refused(self, r1_session: tuple[Tunnel, Tunnel, CounterLease],
                                                 bob: Identity, marks: Marks, alice: Identity) -> None:
        a, r1, _ = r1_session
        _, r2, resume = take_over(bob, marks, r1, a)
        forged = bytearray(resume)
        forged[-3] ^= 0x40
        with pytest.raises(RecordAuthError):
            r2.session.open_resume(FrameDecoder().feed(bytes(forged))[0].body)

    def test_resumed_must_echo_alices_challenge(self, r1_session: tuple[Tunnel, Tunnel, CounterLease],
                                               bob: Identity, marks: Marks) -> None:
        a, r1, _ = r1_session
        a2, r2, resume = take_over(bob, marks, r1, a)
        frame = FrameDecoder().feed(resume)[0]
        r2.session.open_resume(frame.body)
        r2.session._challenge = b"\x00" * 16  # a replica answering some other RESUME
        r2.attach_counters(marks.lease(counter_key_id(a.result.session_id, "r2i"), fresh=False), MONO, "r2")
        with pytest.raises(RecordError, match="challenge"):
            pump(a2, r2)

    def test_a_replica_that_cannot_resume_says_so_and_alice_learns_why(
            self, r1_session: tuple[Tunnel, Tunnel, CounterLease], bob: Identity, marks: Marks) -> None:
        from pqtunnel.errors import HandshakeRefusedError, ResumeRefusedError
        from pqtunnel.handshake import alert_frame
        a, r1, _ = r1_session
        a2, _, _ = take_over(bob, marks, r1, a)
        with pytest.raises(HandshakeRefusedError, match="unknown session"):
            a2.receive_data(alert_frame(ResumeRefusedError("no such session")), MONO, NOW_MS)

    def test_resume_content_inside_an_established_session_is_refused(
            self, r1_session: tuple[Tunnel, Tunnel, CounterLease]) -> None:
        a, r1, _ = r1_session
        frame = a.session.records.seal(ContentType.RESUME, b"\x00" * 16)
        with pytest.raises(RecordError, match="inside an established session"):
            r1.receive_data(frame, MONO, NOW_MS)


def test_a_snapshot_not_rewritten_for_longer_than_a_live_session_would_allow_is_stale(
        r1_session: tuple[Tunnel, Tunnel, CounterLease], bob: Identity) -> None:
    snapshot = r1_session[1].session.snapshot(NOW_MS)
    again = StateWrapper.for_identity(bob).unwrap(snapshot.session_id, StateWrapper.for_identity(bob).wrap(snapshot))
    assert again.stored_ms == NOW_MS
    assert not again.is_stale(NOW_MS + 600_000, after_ms=600_000)
    assert again.is_stale(NOW_MS + 600_001, after_ms=600_000)


def test_a_replica_names_itself_after_confirming_and_only_replicas_sessions_are_resumable(
        r1_session: tuple[Tunnel, Tunnel, CounterLease], alice: Identity, bob: Identity) -> None:
    a, _, _ = r1_session
    assert a.session.replica == "r1"
    plain_a = Tunnel(InitiatorHandshake(alice, accept_as("bob")), now_ms=MONO)
    plain_b = Tunnel(ResponderHandshake(bob, accept_as("alice"), peer_address=PEER_ADDRESS), now_ms=MONO)
    plain_a.start(MONO, NOW_MS)
    pump(plain_a, plain_b)
    assert plain_a.session.replica == ""


def test_a_replica_record_from_the_initiator_is_refused(r1_session: tuple[Tunnel, Tunnel, CounterLease]) -> None:
    a, r1, _ = r1_session
    frame = a.session.records.seal(ContentType.REPLICA, b"r9")
    with pytest.raises(RecordError, match="REPLICA inside an established session"):
        r1.receive_data(frame, MONO, NOW_MS)


def test_a_replayed_resume_and_its_records_move_no_data_even_if_the_store_was_rolled_back(
        r1_session: tuple[Tunnel, Tunnel, CounterLease], bob: Identity, marks: Marks) -> None:
    """The store's used-RESUME mark put back to an older genuine value lets a captured RESUME
    be answered again, but the records captured after it cannot echo the new challenge."""
    a, r1, _ = r1_session
    a2, r2, resume = take_over(bob, marks, r1, a)
    resume_at(r2, resume, marks)
    a2.receive_data(b"".join(r2.buffers_to_send()), MONO, NOW_MS)  # RESUMED: alice confirms
    a2.open_stream({"service": "secret"})
    captured = b"".join(a2.buffers_to_send())  # RESUME_CONFIRM and the stream's OPEN
    assert r2.receive_data(captured, MONO, NOW_MS) == [StreamOpenRequested(1, {"service": "secret"})]
    marks.marks[resume_key_id(a.result.session_id)] = 0  # rolled back
    r3 = Tunnel.around(Session.from_snapshot(r2.session.snapshot(NOW_MS), backend=r2.session.backend,
                                             entropy=r2.session.entropy, now_ms=MONO), now_ms=MONO)
    resume_at(r3, resume, marks)  # the replayed RESUME itself gets an answer ...
    with pytest.raises(RecordError, match="RESUME_CONFIRM"):
        r3.receive_data(captured, MONO, NOW_MS)  # ... but its replayed records are refused
