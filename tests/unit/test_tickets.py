"""Spec for resumption tickets (pqtunnel/tickets.py, docs/PROTOCOL.md 4.10), driven without I/O.

alice and bob make one full hybrid handshake; bob issues a ticket (only its id and lifetime
travel); later alice resumes in one round trip: RESUME_HELLO, RESUME_ACCEPT. The shared
store's single-use record is the application's (specified with the stores); here each
resumption gets the TicketState the store would hand over.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from noise.functions.hash import hkdf as noise_hkdf

from pqtunnel.crypto.suites import CLASSICAL, HYBRID, PQ_STRONG, Aead
from pqtunnel.errors import (
    DowngradeError,
    HandshakeError,
    HandshakeRefusedError,
    LocalProtocolError,
    MalformedHandshakeError,
    NoCommonSuiteError,
    RecordError,
    ReplayError,
    StoreDataError,
    TicketAuthError,
    TicketExpiredError,
    TicketMismatchError,
    UnsupportedVersionError,
    UntrustedPeerError,
)
from pqtunnel.handover import SessionSnapshot, StateWrapper
from pqtunnel.handshake import HandshakeConfig, HandshakeResult, alert_frame
from pqtunnel.identity import Identity
from pqtunnel.records import ContentType, RecordLayer
from pqtunnel.tickets import (
    DEFAULT_TICKET_LIFETIME_S,
    GRANT_SIZE,
    MAX_TICKET_LIFETIME_S,
    TICKET_FORMAT,
    ClientTicket,
    ResumeInitiator,
    ResumeResponder,
    TicketGrant,
    TicketState,
    accept_ticket_grant,
    client_ticket_state_id,
    encode_ticket_grant,
    hkdf,
    issue_ticket,
    parse_resume_hello,
    parse_ticket_grant,
    ticket_state_id,
    unwrap_client_ticket,
    unwrap_ticket,
    wrap_client_ticket,
    wrap_ticket,
)
from pqtunnel.wire import Frame, FrameDecoder, Kind, encode_frame
from tests.conftest import MemoBackend, accept_as, config_for, deterministic_pair, flip_bit, one_frame, run_handshake

ISSUED_MS = 1_800_000_000_000
LATER_MS = ISSUED_MS + 3_600_000
"""An hour after the ticket was issued: when alice comes back."""
WINDOW_MS = HandshakeConfig().replay_window_ms


def full_handshake(alice: Identity, bob: Identity, backend: MemoBackend,
                   suite: object = HYBRID) -> tuple[HandshakeResult, HandshakeResult]:
    initiator, responder = deterministic_pair(alice, bob, backend, initiator_config=config_for(suite),
                                              responder_config=config_for(suite))
    exchange = run_handshake(initiator, responder, now_ms=ISSUED_MS)
    assert exchange.initiator_result is not None and exchange.responder_result is not None
    return exchange.initiator_result, exchange.responder_result


@pytest.fixture(scope="module")
def session(alice: Identity, bob: Identity) -> tuple[HandshakeResult, HandshakeResult]:
    """(alice's result, bob's result) of one full hybrid handshake."""
    return full_handshake(alice, bob, MemoBackend())


@pytest.fixture(scope="module")
def ticket(session: tuple[HandshakeResult, HandshakeResult]) -> tuple[ClientTicket, TicketState, bytes]:
    """bob issues one ticket; alice takes the grant: (alice's ticket, bob's state, grant body)."""
    at_alice, at_bob = session
    state, grant = issue_ticket(at_bob, ISSUED_MS)
    return accept_ticket_grant(at_alice, grant, ISSUED_MS + 5), state, grant


@dataclasses.dataclass
class Resumption:
    hello: bytes
    accept: bytes = b""
    initiator: HandshakeResult | None = None
    responder: HandshakeResult | None = None


def resume(alice: Identity, bob: Identity, client: ClientTicket, state: TicketState, *, now_ms: int = LATER_MS,
           sent_ms: int | None = None,
           tamper_hello: Callable[[bytes], bytes] = lambda body: body,
           tamper_accept: Callable[[bytes], bytes] = lambda body: body) -> Resumption:
    """One resumption; a HandshakeError escapes from the side that refuses."""
    initiator = ResumeInitiator(alice, client, accept_as("bob"))
    responder = ResumeResponder(bob, state, accept_as("alice"))
    hello = one_frame(initiator.start(now_ms if sent_ms is None else sent_ms))
    out = Resumption(encode_frame(hello.kind, tamper_hello(bytes(hello.body))))
    step_r = responder.receive(one_frame(out.hello), now_ms)
    accept = one_frame(step_r.to_send)
    out.accept, out.responder = encode_frame(accept.kind, tamper_accept(bytes(accept.body))), step_r.result
    out.initiator = initiator.receive(one_frame(out.accept), now_ms).result
    return out


class TestTheGrant:
    def test_only_the_ticket_id_and_lifetime_travel_and_both_sides_derive_the_same_psk(
            self, session: tuple[HandshakeResult, HandshakeResult],
            ticket: tuple[ClientTicket, TicketState, bytes]) -> None:
        client, state, grant = ticket
        assert len(grant) == GRANT_SIZE == 21
        assert parse_ticket_grant(grant) == TicketGrant(state.ticket_id, DEFAULT_TICKET_LIFETIME_S)
        assert client.psk == state.psk and len(state.psk) == 32
        assert client.psk not in grant and session[0].resumption_secret not in grant
        assert client.ticket_id == state.ticket_id

    def test_each_side_keeps_the_other_sides_identity_and_the_sessions_algorithms(
            self, alice: Identity, bob: Identity, ticket: tuple[ClientTicket, TicketState, bytes]) -> None:
        client, state, _ = ticket
        assert client.peer_fingerprint == bob.fingerprint and client.peer_name == "bob"
        assert state.peer_fingerprint == alice.fingerprint and state.peer_name == "alice"
        assert (client.suite, client.aead) == (state.suite, state.aead) == ("hybrid", Aead.CHACHA20_POLY1305)
        assert state.expires_ms == ISSUED_MS + DEFAULT_TICKET_LIFETIME_S * 1000
        assert client.expires_ms == ISSUED_MS + 5 + DEFAULT_TICKET_LIFETIME_S * 1000  # alice's clock

    def test_two_tickets_of_one_session_have_unrelated_secrets(
            self, session: tuple[HandshakeResult, HandshakeResult]) -> None:
        first, _ = issue_ticket(session[1], ISSUED_MS)
        second, _ = issue_ticket(session[1], ISSUED_MS)
        assert first.ticket_id != second.ticket_id and first.psk != second.psk

    @pytest.mark.parametrize("body, reason", [
        (b"", "0 bytes"),
        (bytes([1]) + bytes(16) + (3600).to_bytes(4, "big") + b"x", "22 bytes"),
        (bytes([2]) + bytes(16) + (3600).to_bytes(4, "big"), "version 2"),
        (bytes([1]) + bytes(16) + (0).to_bytes(4, "big"), "lifetime 0 s"),
        (bytes([1]) + bytes(16) + (MAX_TICKET_LIFETIME_S + 1).to_bytes(4, "big"), "lifetime 604801 s"),
    ])
    def test_a_malformed_grant_is_refused(self, body: bytes, reason: str) -> None:
        with pytest.raises(RecordError, match=reason):
            parse_ticket_grant(body)

    def test_only_the_responder_issues_and_only_the_initiator_takes_tickets(
            self, session: tuple[HandshakeResult, HandshakeResult],
            ticket: tuple[ClientTicket, TicketState, bytes]) -> None:
        with pytest.raises(LocalProtocolError, match="responder"):
            issue_ticket(session[0], ISSUED_MS)
        with pytest.raises(LocalProtocolError, match="initiator"):
            accept_ticket_grant(session[1], ticket[2], ISSUED_MS)

    def test_a_session_without_a_resumption_secret_cannot_issue(
            self, session: tuple[HandshakeResult, HandshakeResult]) -> None:
        with pytest.raises(LocalProtocolError, match="no resumption secret"):
            issue_ticket(dataclasses.replace(session[1], resumption_secret=b""), ISSUED_MS)

    def test_a_replica_that_took_the_session_over_issues_tickets_alice_can_use(
            self, alice: Identity, bob: Identity, session: tuple[HandshakeResult, HandshakeResult]) -> None:
        at_alice, at_bob = session
        wrapper = StateWrapper.for_identity(bob)
        snapshot = SessionSnapshot.of(at_bob, send_key=at_bob.send_key, recv_key=at_bob.recv_key,
                                      rekey_chain=at_bob.rekey_chain, epoch=0, migrations=0, wall_ms=ISSUED_MS)
        moved = wrapper.unwrap(at_bob.session_id, wrapper.wrap(snapshot)).result()
        state, grant = issue_ticket(moved, ISSUED_MS)
        client = accept_ticket_grant(at_alice, grant, ISSUED_MS)
        assert resume(alice, bob, client, state).initiator is not None


class TestResumption:
    def test_a_resumed_handshake_gives_both_sides_the_same_new_keys_and_a_new_session(
            self, alice: Identity, bob: Identity, session: tuple[HandshakeResult, HandshakeResult],
            ticket: tuple[ClientTicket, TicketState, bytes]) -> None:
        done = resume(alice, bob, *ticket[:2])
        i, r = done.initiator, done.responder
        assert i is not None and r is not None
        assert (i.send_key, i.recv_key) == (r.recv_key, r.send_key) and i.send_key != i.recv_key
        assert i.session_id == r.session_id != session[0].session_id
        assert i.handshake_hash == r.handshake_hash and i.rekey_chain == r.rekey_chain
        assert i.resumption_secret == r.resumption_secret != session[0].resumption_secret
        assert {i.send_key, i.recv_key, i.rekey_chain}.isdisjoint(
            {session[0].send_key, session[0].recv_key, session[0].rekey_chain})
        assert (i.is_initiator, r.is_initiator) == (True, False)
        assert (i.peer.fingerprint, i.peer_name, r.peer.fingerprint, r.peer_name) == \
            (bob.fingerprint, "bob", alice.fingerprint, "alice")
        assert (i.suite, i.aead) == (r.suite, r.aead) == (HYBRID, Aead.CHACHA20_POLY1305)
        assert (i.peer_static, r.peer_static) == (session[0].peer_static, session[1].peer_static)

    def test_the_resumed_keys_carry_records_both_ways(
            self, alice: Identity, bob: Identity, ticket: tuple[ClientTicket, TicketState, bytes]) -> None:
        done = resume(alice, bob, *ticket[:2])
        i, r = done.initiator, done.responder
        assert i is not None and r is not None
        a = RecordLayer(i.aead, i.send_key, i.recv_key, i.session_id)
        b = RecordLayer(r.aead, r.send_key, r.recv_key, r.session_id)
        content, data = b.open(one_frame(a.seal(ContentType.DATA, b"hello")).body)
        assert (content, bytes(data)) == (ContentType.DATA, b"hello")
        content, data = a.open(one_frame(b.seal(ContentType.PING, bytes(16))).body)
        assert (content, bytes(data)) == (ContentType.PING, bytes(16))

    def test_one_round_trip_of_well_under_a_kilobyte(
            self, alice: Identity, bob: Identity, ticket: tuple[ClientTicket, TicketState, bytes]) -> None:
        done = resume(alice, bob, *ticket[:2])
        assert one_frame(done.hello).kind is Kind.RESUME_HELLO and len(done.hello) == 94
        assert one_frame(done.accept).kind is Kind.RESUME_ACCEPT and len(done.accept) == 69
        assert len(done.hello) + len(done.accept) < 1024

    def test_no_secret_is_ever_on_the_wire(self, alice: Identity, bob: Identity,
                                           session: tuple[HandshakeResult, HandshakeResult],
                                           ticket: tuple[ClientTicket, TicketState, bytes]) -> None:
        client, state, grant = ticket
        done = resume(alice, bob, client, state)
        assert done.initiator is not None
        wire = grant + done.hello + done.accept
        for secret in (client.psk, session[0].resumption_secret, done.initiator.send_key,
                       done.initiator.recv_key, done.initiator.rekey_chain, done.initiator.resumption_secret):
            for start in range(0, len(secret) - 8 + 1, 8):
                assert secret[start : start + 8] not in wire

    def test_fresh_ephemerals_make_every_resumption_with_one_ticket_a_different_session(
            self, alice: Identity, bob: Identity, ticket: tuple[ClientTicket, TicketState, bytes]) -> None:
        """Forward secrecy against a later theft of the ticket: the keys depend on the
        ephemerals (which are forgotten), not only on the psk. (Single use is the store's.)"""
        first, second = resume(alice, bob, *ticket[:2]), resume(alice, bob, *ticket[:2])
        assert first.initiator is not None and second.initiator is not None
        assert first.hello != second.hello and first.accept != second.accept
        assert first.initiator.send_key != second.initiator.send_key
        assert first.initiator.session_id != second.initiator.session_id

    def test_a_resumed_session_issues_the_next_ticket(
            self, alice: Identity, bob: Identity, ticket: tuple[ClientTicket, TicketState, bytes]) -> None:
        done = resume(alice, bob, *ticket[:2])
        assert done.initiator is not None and done.responder is not None
        state, grant = issue_ticket(done.responder, LATER_MS)
        client = accept_ticket_grant(done.initiator, grant, LATER_MS)
        again = resume(alice, bob, client, state, now_ms=LATER_MS + 1000)
        assert again.initiator is not None and again.initiator.peer_name == "bob"

    @pytest.mark.parametrize("suite", [CLASSICAL, PQ_STRONG], ids=["classical", "pq-strong"])
    def test_a_ticket_keeps_the_suite_of_its_session(self, alice: Identity, bob: Identity, suite: object) -> None:
        at_alice, at_bob = full_handshake(alice, bob, MemoBackend(), suite)
        state, grant = issue_ticket(at_bob, ISSUED_MS)
        client = accept_ticket_grant(at_alice, grant, ISSUED_MS)
        initiator = ResumeInitiator(alice, client, accept_as("bob"), config=config_for(suite))
        responder = ResumeResponder(bob, state, accept_as("alice"), config=config_for(suite))
        step = responder.receive(one_frame(initiator.start(LATER_MS)), LATER_MS)
        result = initiator.receive(one_frame(step.to_send), LATER_MS).result
        assert result is not None and result.suite is suite and result.send_key == step.result.recv_key


HELLO_FIELDS = [("version", 0, 1, UnsupportedVersionError), ("ticket id", 1, 17, TicketMismatchError),
                ("e", 17, 49, TicketAuthError), ("timestamp", 49, 57, TicketAuthError),
                ("MAC", 57, 89, TicketAuthError)]


class TestRefusals:
    @pytest.mark.parametrize("name, start, stop, error", HELLO_FIELDS, ids=[f[0] for f in HELLO_FIELDS])
    def test_every_flipped_bit_of_resume_hello_is_refused(
            self, alice: Identity, bob: Identity, ticket: tuple[ClientTicket, TicketState, bytes],
            name: str, start: int, stop: int, error: type[HandshakeError]) -> None:
        for position in range(start, stop):
            for bit in range(8):
                with pytest.raises(error):
                    resume(alice, bob, *ticket[:2], tamper_hello=lambda body: flip_bit(body, position, bit))

    def test_every_flipped_bit_of_resume_accept_is_refused(
            self, alice: Identity, bob: Identity, ticket: tuple[ClientTicket, TicketState, bytes]) -> None:
        """Including the top bit of ``e`` that X25519 ignores: the transcript hashes ``e`` as sent."""
        for position in range(64):
            for bit in range(8):
                with pytest.raises((TicketAuthError, MalformedHandshakeError)) as refused:
                    resume(alice, bob, *ticket[:2], tamper_accept=lambda body: flip_bit(body, position, bit))
                assert isinstance(refused.value, TicketAuthError) or "low-order" in str(refused.value)

    @pytest.mark.parametrize("change", [lambda b: b[:-1], lambda b: b + b"\x00", lambda b: b[:1]],
                             ids=["truncated", "extended", "version only"])
    def test_a_resume_hello_or_accept_of_the_wrong_length_is_malformed(
            self, alice: Identity, bob: Identity, ticket: tuple[ClientTicket, TicketState, bytes],
            change: Callable[[bytes], bytes]) -> None:
        with pytest.raises(MalformedHandshakeError, match="RESUME_HELLO has"):
            resume(alice, bob, *ticket[:2], tamper_hello=change)
        with pytest.raises(MalformedHandshakeError, match="RESUME_ACCEPT has"):
            resume(alice, bob, *ticket[:2], tamper_accept=change)

    def test_an_expired_ticket_is_refused_by_both_sides(
            self, alice: Identity, bob: Identity, ticket: tuple[ClientTicket, TicketState, bytes]) -> None:
        client, state, _ = ticket
        at_expiry = state.expires_ms
        assert resume(alice, bob, client, state, now_ms=at_expiry).initiator is not None  # the last good moment
        with pytest.raises(TicketExpiredError):
            resume(alice, bob, client, state, now_ms=at_expiry + 1, sent_ms=at_expiry)
        with pytest.raises(TicketExpiredError):
            ResumeInitiator(alice, client, accept_as("bob")).start(client.expires_ms + 1)

    @pytest.mark.parametrize("skew_ms", [WINDOW_MS + 1, -(WINDOW_MS + 1)], ids=["stale", "from the future"])
    def test_a_timestamp_outside_the_window_is_refused(
            self, alice: Identity, bob: Identity, ticket: tuple[ClientTicket, TicketState, bytes], skew_ms: int) -> None:
        with pytest.raises(ReplayError, match="away from our clock"):
            resume(alice, bob, *ticket[:2], sent_ms=LATER_MS - skew_ms)

    @pytest.mark.parametrize("skew_ms", [WINDOW_MS, -WINDOW_MS], ids=["oldest", "newest"])
    def test_the_window_bounds_are_inclusive(
            self, alice: Identity, bob: Identity, ticket: tuple[ClientTicket, TicketState, bytes], skew_ms: int) -> None:
        assert resume(alice, bob, *ticket[:2], sent_ms=LATER_MS - skew_ms).initiator is not None

    def test_a_ticket_state_copied_to_another_node_is_refused(
            self, alice: Identity, mallory: Identity, ticket: tuple[ClientTicket, TicketState, bytes]) -> None:
        """The transcript binds bob's fingerprint: mallory holding bob's ticket state cannot
        answer alice (and cannot even open bob's wrapped state: below)."""
        with pytest.raises(TicketAuthError, match="RESUME_HELLO MAC"):
            resume(alice, mallory, *ticket[:2])

    def test_a_ticket_presented_by_another_peer_is_refused(
            self, bob: Identity, mallory: Identity, ticket: tuple[ClientTicket, TicketState, bytes]) -> None:
        """mallory with a copy of alice's ticket: the transcript binds alice's fingerprint."""
        with pytest.raises(TicketAuthError, match="RESUME_HELLO MAC"):
            resume(mallory, bob, *ticket[:2])

    def test_a_stolen_client_ticket_without_alices_static_key_yields_no_session(
            self, alice: Identity, bob: Identity, ticket: tuple[ClientTicket, TicketState, bytes]) -> None:
        """Even with alice's fingerprint: the keys also mix X25519(s_alice, e_bob)."""
        thief = dataclasses.replace(alice, x25519_static=bytes([7]) * 32)
        assert thief.fingerprint == alice.fingerprint
        with pytest.raises(TicketAuthError, match="RESUME_ACCEPT MAC"):
            resume(thief, bob, *ticket[:2])

    def test_the_state_of_another_ticket_is_refused(
            self, alice: Identity, bob: Identity, session: tuple[HandshakeResult, HandshakeResult],
            ticket: tuple[ClientTicket, TicketState, bytes]) -> None:
        other, _ = issue_ticket(session[1], ISSUED_MS)
        with pytest.raises(TicketMismatchError):
            resume(alice, bob, ticket[0], other)

    def test_a_suite_or_aead_the_responder_no_longer_allows_is_refused(
            self, alice: Identity, bob: Identity, ticket: tuple[ClientTicket, TicketState, bytes]) -> None:
        client, state, _ = ticket
        hello = one_frame(ResumeInitiator(alice, client, accept_as("bob")).start(LATER_MS))
        with pytest.raises(DowngradeError, match="hybrid"):
            ResumeResponder(bob, state, accept_as("alice"), config=config_for(PQ_STRONG)).receive(hello, LATER_MS)
        aes_only = config_for(HYBRID, aeads=(Aead.AES_256_GCM,))
        with pytest.raises(NoCommonSuiteError, match="AEAD"):
            ResumeResponder(bob, state, accept_as("alice"), config=aes_only).receive(hello, LATER_MS)
        with pytest.raises(TicketMismatchError, match="no longer allows"):
            ResumeInitiator(alice, client, accept_as("bob"), config=config_for(PQ_STRONG)).start(LATER_MS)

    def test_a_peer_the_policy_no_longer_trusts_is_refused_on_either_side(
            self, alice: Identity, bob: Identity, ticket: tuple[ClientTicket, TicketState, bytes]) -> None:
        def distrust(peer: object) -> str:
            raise UntrustedPeerError("pin removed")

        client, state, _ = ticket
        initiator = ResumeInitiator(alice, client, distrust)
        step = ResumeResponder(bob, state, accept_as("alice")).receive(one_frame(initiator.start(LATER_MS)), LATER_MS)
        with pytest.raises(UntrustedPeerError):
            initiator.receive(one_frame(step.to_send), LATER_MS)
        hello = one_frame(ResumeInitiator(alice, client, accept_as("bob")).start(LATER_MS))
        with pytest.raises(UntrustedPeerError):
            ResumeResponder(bob, state, distrust).receive(hello, LATER_MS)

    @pytest.mark.parametrize("error, says", [
        (TicketAuthError("x"), "bad ticket"), (TicketExpiredError("x"), "unknown ticket"),
        (TicketMismatchError("x"), "unknown ticket"), (ReplayError("x"), "replay"),
        (MalformedHandshakeError("x"), "bad message"), (UnsupportedVersionError("x"), "unsupported version")])
    def test_the_initiator_learns_why_from_the_alert(
            self, alice: Identity, ticket: tuple[ClientTicket, TicketState, bytes], error: HandshakeError,
            says: str) -> None:
        initiator = ResumeInitiator(alice, ticket[0], accept_as("bob"))
        initiator.start(LATER_MS)
        with pytest.raises(HandshakeRefusedError, match=f"refused the handshake: {says}$"):
            initiator.receive(one_frame(alert_frame(error)), LATER_MS)

    def test_each_side_takes_only_its_own_frames_in_order(
            self, alice: Identity, bob: Identity, ticket: tuple[ClientTicket, TicketState, bytes]) -> None:
        client, state, _ = ticket
        initiator = ResumeInitiator(alice, client, accept_as("bob"))
        responder = ResumeResponder(bob, state, accept_as("alice"))
        with pytest.raises(LocalProtocolError):
            responder.accept()
        hello = one_frame(initiator.start(LATER_MS))
        with pytest.raises(LocalProtocolError):
            initiator.start(LATER_MS)
        with pytest.raises(MalformedHandshakeError, match="did not expect RESUME_HELLO"):
            initiator.receive(hello, LATER_MS)
        with pytest.raises(MalformedHandshakeError, match="did not expect HELLO"):
            ResumeResponder(bob, state, accept_as("alice")).receive(Frame(Kind.HELLO, hello.body), LATER_MS)
        responder.check(hello, LATER_MS)
        with pytest.raises(MalformedHandshakeError, match="did not expect RESUME_HELLO"):
            responder.check(hello, LATER_MS)
        accept = one_frame(responder.accept().to_send)
        with pytest.raises(LocalProtocolError):
            responder.accept()
        assert initiator.receive(accept, LATER_MS).result is not None and initiator.done and responder.done
        with pytest.raises(MalformedHandshakeError, match="did not expect RESUME_ACCEPT"):
            initiator.receive(accept, LATER_MS)

    def test_a_refused_hello_cannot_be_accepted_afterwards(
            self, alice: Identity, bob: Identity, ticket: tuple[ClientTicket, TicketState, bytes]) -> None:
        responder = ResumeResponder(bob, ticket[1], accept_as("alice"))
        hello = one_frame(ResumeInitiator(alice, ticket[0], accept_as("bob")).start(LATER_MS))
        with pytest.raises(TicketAuthError):
            responder.check(Frame(Kind.RESUME_HELLO, flip_bit(bytes(hello.body), 60, 0)), LATER_MS)
        with pytest.raises(LocalProtocolError):
            responder.accept()

    def test_the_application_reads_the_ticket_id_before_it_has_the_state(
            self, alice: Identity, ticket: tuple[ClientTicket, TicketState, bytes]) -> None:
        hello = one_frame(ResumeInitiator(alice, ticket[0], accept_as("bob")).start(LATER_MS))
        parsed = parse_resume_hello(hello.body)
        assert (parsed.ticket_id, parsed.timestamp_ms) == (ticket[1].ticket_id, LATER_MS)
        with pytest.raises(UnsupportedVersionError):
            parse_resume_hello(b"\x02" + bytes(hello.body)[1:])


class TestStoredTickets:
    def test_a_ticket_state_survives_wrapping_and_holds_no_secret_in_plain_text(
            self, bob: Identity, ticket: tuple[ClientTicket, TicketState, bytes]) -> None:
        state = ticket[1]
        blob = wrap_ticket(StateWrapper.for_identity(bob), state)
        assert unwrap_ticket(StateWrapper.for_identity(bob), state.ticket_id, blob) == state
        assert state.psk not in blob and state.ticket_id not in blob

    def test_a_client_ticket_survives_wrapping_under_its_store_id(
            self, alice: Identity, bob: Identity, ticket: tuple[ClientTicket, TicketState, bytes]) -> None:
        client = ticket[0]
        wrapper = StateWrapper.for_identity(alice)
        store_id = client_ticket_state_id(bob.fingerprint, client.ticket_id)
        assert store_id.startswith(f"client-ticket.{bob.fingerprint}.")
        blob = wrap_client_ticket(wrapper, client)
        assert unwrap_client_ticket(wrapper, store_id, blob) == client and client.psk not in blob
        with pytest.raises(StoreDataError):
            unwrap_client_ticket(wrapper, client_ticket_state_id(bob.fingerprint, bytes(16)), blob)

    def test_another_nodes_ticket_a_moved_one_and_a_session_blob_are_refused(
            self, bob: Identity, mallory: Identity, session: tuple[HandshakeResult, HandshakeResult],
            ticket: tuple[ClientTicket, TicketState, bytes]) -> None:
        state = ticket[1]
        ours = StateWrapper.for_identity(bob)
        with pytest.raises(StoreDataError, match="fails authentication"):
            unwrap_ticket(ours, state.ticket_id, wrap_ticket(StateWrapper.for_identity(mallory), state))
        with pytest.raises(StoreDataError, match="fails authentication"):
            unwrap_ticket(ours, bytes(16), wrap_ticket(ours, state))
        at_bob = session[1]
        snapshot = SessionSnapshot.of(at_bob, send_key=at_bob.send_key, recv_key=at_bob.recv_key,
                                      rekey_chain=at_bob.rekey_chain, epoch=0, migrations=0, wall_ms=ISSUED_MS)
        with pytest.raises(StoreDataError, match="not a pqtunnel ticket"):
            unwrap_ticket(ours, state.ticket_id, ours.wrap(snapshot))

    @pytest.mark.parametrize("change", [
        {"tid": b"short"}, {"psk": b"k" * 31}, {"suite": "no-such-suite"}, {"aead": 99}, {"peer": {"n": "alice"}},
        {"static": b"s"}, {"exp": -1}, {"name": 7}, "not a map", "truncated"])
    def test_a_well_wrapped_but_malformed_ticket_state_is_refused(
            self, bob: Identity, ticket: tuple[ClientTicket, TicketState, bytes], change: object) -> None:
        state = ticket[1]
        if change == "not a map":
            plain = msgpack.packb([1, 2, 3])
        elif change == "truncated":
            plain = state.to_msgpack()[:-3]
        else:
            fields = msgpack.unpackb(state.to_msgpack(), raw=False)
            fields.update(change)
            plain = msgpack.packb(fields, use_bin_type=True)
        wrapper = StateWrapper.for_identity(bob)
        blob = wrapper.wrap_bytes(TICKET_FORMAT, ticket_state_id(state.ticket_id), plain)
        with pytest.raises(StoreDataError, match="ticket state is malformed"):
            unwrap_ticket(wrapper, state.ticket_id, blob)

    def test_the_single_use_record_outlives_the_ticket(self, ticket: tuple[ClientTicket, TicketState, bytes]) -> None:
        state = ticket[1]
        assert state.use_ttl_s(LATER_MS) == (state.expires_ms - LATER_MS + 120_000) / 1000
        assert state.use_ttl_s(state.expires_ms + 10**9) == 0

    def test_a_session_snapshot_keeps_the_resumption_secret(
            self, bob: Identity, session: tuple[HandshakeResult, HandshakeResult]) -> None:
        at_bob = session[1]
        snapshot = SessionSnapshot.of(at_bob, send_key=at_bob.send_key, recv_key=at_bob.recv_key,
                                      rekey_chain=at_bob.rekey_chain, epoch=0, migrations=0, wall_ms=ISSUED_MS)
        wrapper = StateWrapper.for_identity(bob)
        again = wrapper.unwrap(at_bob.session_id, wrapper.wrap(snapshot))
        assert again.result().resumption_secret == at_bob.resumption_secret != b""
        assert "res" not in msgpack.unpackb(dataclasses.replace(snapshot, resumption_secret=b"").to_msgpack())


def test_hkdf_is_the_handshakes_noise_hkdf_with_hmac_blake2s() -> None:
    import hashlib
    import hmac

    def hmac_blake2s(key: bytes, data: bytes) -> bytes:
        return hmac.new(key, data, hashlib.blake2s).digest()

    for ikm in (b"", b"pqtunnel/1 resume", bytes(96)):
        assert hkdf(b"\x01" * 32, ikm, 2) == noise_hkdf(b"\x01" * 32, ikm, 2, hmac_blake2s)


def test_grant_encoding_round_trips() -> None:
    grant = TicketGrant(bytes(range(16)), 3600)
    assert encode_ticket_grant(grant).hex() == "01" + bytes(range(16)).hex() + "00000e10"
    assert parse_ticket_grant(encode_ticket_grant(grant)) == grant


def test_frames_of_the_resumed_handshake_are_handshake_frames() -> None:
    decoder = FrameDecoder(max_record=64)
    frames = decoder.feed(encode_frame(Kind.RESUME_HELLO, bytes(89)) + encode_frame(Kind.RESUME_ACCEPT, bytes(64)))
    assert [f.kind for f in frames] == [Kind.RESUME_HELLO, Kind.RESUME_ACCEPT]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=200))
def test_any_resume_hello_body_is_refused_cleanly(bob: Identity, ticket: tuple[ClientTicket, TicketState, bytes],
                                                  body: bytes) -> None:
    """Random bytes as RESUME_HELLO: a HandshakeError naming the fault, never a crash."""
    with pytest.raises(HandshakeError):
        ResumeResponder(bob, ticket[1], accept_as("alice")).check(Frame(Kind.RESUME_HELLO, body), LATER_MS)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=300), st.dictionaries(st.text(max_size=8), st.integers(-2**63, 2**64 - 1) | st.binary(max_size=40))))
def test_any_stored_bytes_that_are_no_ticket_state_are_refused_cleanly(data: bytes | dict[str, object]) -> None:
    plain = data if isinstance(data, bytes) else msgpack.packb(data, use_bin_type=True)
    with pytest.raises(StoreDataError):
        TicketState.from_msgpack(plain)


class TestTicketsInTheTunnel:
    """The grant travels in a TICKET record; a resumed session is an ordinary tunnel."""

    def test_a_granted_ticket_resumes_a_new_tunnel_in_one_round_trip(self, alice: Identity, bob: Identity) -> None:
        from pqtunnel.handshake import InitiatorHandshake, ResponderHandshake
        from pqtunnel.session import SessionState
        from pqtunnel.tickets import ResumeInitiator, ResumeResponder, accept_ticket_grant, issue_ticket
        from pqtunnel.tunnel import DataReceived, Established, StreamOpenRequested, TicketGranted, Tunnel
        from tests.conftest import NOW_MS, PEER_ADDRESS

        def pump(a: Tunnel, b: Tunnel) -> tuple[list, list, int]:
            at_a: list = []
            at_b: list = []
            trips = 0
            while True:
                from_a, from_b = b"".join(a.buffers_to_send()), b"".join(b.buffers_to_send())
                if not from_a and not from_b:
                    return at_a, at_b, trips
                trips += 1
                at_b += b.receive_data(from_a, 0, NOW_MS) if from_a else []
                at_a += a.receive_data(from_b, 0, NOW_MS) if from_b else []

        a = Tunnel(InitiatorHandshake(alice, accept_as("bob")), now_ms=0)
        b = Tunnel(ResponderHandshake(bob, accept_as("alice"), peer_address=PEER_ADDRESS), now_ms=0)
        a.start(0, NOW_MS)
        pump(a, b)
        state, grant = issue_ticket(b.result, NOW_MS)
        b.send_ticket(grant, 0)
        at_a, _, _ = pump(a, b)
        granted = [e for e in at_a if isinstance(e, TicketGranted)]
        assert len(granted) == 1 and not a.session.with_ticket
        client = accept_ticket_grant(a.result, granted[0].body, NOW_MS)

        a2 = Tunnel(ResumeInitiator(alice, client, accept_as("bob")), now_ms=0)
        b2 = Tunnel(ResumeResponder(bob, state, accept_as("alice")), now_ms=0)
        a2.start(0, NOW_MS)
        at_a, at_b, _ = pump(a2, b2)
        assert [type(e) for e in at_a] == [Established] and type(at_b[0]) is Established
        assert a2.state is SessionState.ESTABLISHED and a2.session.with_ticket and b2.session.with_ticket
        assert a2.result.session_id == b2.result.session_id != a.result.session_id
        stream_id = a2.open_stream({"service": "after-a-ticket"})
        _, at_b, _ = pump(a2, b2)
        assert StreamOpenRequested(stream_id, {"service": "after-a-ticket"}) in at_b
        b2.accept_stream(stream_id)
        b2.send_data(stream_id, b"pong")
        at_a, _, _ = pump(a2, b2)
        assert DataReceived(stream_id, b"pong") in at_a

    def test_a_ticket_record_from_the_initiator_is_refused(self, alice: Identity, bob: Identity) -> None:
        from pqtunnel.handshake import InitiatorHandshake, ResponderHandshake
        from pqtunnel.tunnel import Tunnel
        from tests.conftest import NOW_MS, PEER_ADDRESS

        a = Tunnel(InitiatorHandshake(alice, accept_as("bob")), now_ms=0)
        b = Tunnel(ResponderHandshake(bob, accept_as("alice"), peer_address=PEER_ADDRESS), now_ms=0)
        a.start(0, NOW_MS)
        for _ in range(3):
            b.receive_data(b"".join(a.buffers_to_send()), 0, NOW_MS)
            a.receive_data(b"".join(b.buffers_to_send()), 0, NOW_MS)
        with pytest.raises(RecordError, match="TICKET inside an established session"):
            b.receive_data(a.session.records.seal(ContentType.TICKET, b"\x01" * 21), 0, NOW_MS)
