"""Spec for the pqtunnel handshake (pqtunnel/handshake.py): Noise XX / XXhfs with hybrid signatures.

    -> HELLO     version, suite | e, e1 | payload {v, suites, aeads, ts, retry?}   (payload in clear, hashed)
    <- RETRY     optional {suite, cookie}
    <- RESPONSE  e, ee, ekem1, s, es | payload {aead, id, sig_R(h)}
    -> FINISH    s, se | payload {id, sig_I(h)}

Every refusal must be a HandshakeError subclass (the I/O shell logs it and closes only that
connection); anything else escaping is a crash, and any success after tampering is a hole.
"""

from __future__ import annotations

import os
from functools import partial

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pqtunnel.admission import Verdict
from pqtunnel.crypto.backend import KEM_SIZES, CryptographyBackend, ed25519_sign
from pqtunnel.crypto.suites import CLASSICAL, HYBRID, PQ_STRONG, Aead, Suite
from pqtunnel.errors import (
    BadSignatureError,
    CookieError,
    DowngradeError,
    HandshakeBusyError,
    HandshakeDecryptError,
    HandshakeError,
    HandshakeRefusedError,
    MalformedHandshakeError,
    NoCommonSuiteError,
    ReplayError,
    UnsupportedVersionError,
    UntrustedPeerError,
)
from pqtunnel.handshake import (
    COOKIE_LIFETIME_MS,
    AlertCode,
    CookieJar,
    HandshakeConfig,
    InitiatorHandshake,
    ReplayCache,
    ResponderHandshake,
    alert_frame,
    encode_payload,
    parse_alert,
)
from pqtunnel.identity import Identity
from pqtunnel.session import Session
from pqtunnel.trust import TrustStore
from pqtunnel.wire import Frame, FrameDecoder, Kind, encode_frame
from tests.conftest import (
    NOW_MS,
    PEER_ADDRESS,
    FixedEntropy,
    accept_as,
    config_for,
    deterministic_pair,
    flip_bit,
    one_frame,
    run_handshake,
    tamper_first,
)

ALL_SUITES = (CLASSICAL, HYBRID, PQ_STRONG)
SUITE_IDS = [s.name for s in ALL_SUITES]
WINDOW_MS = HandshakeConfig().replay_window_ms
TAG = 16


def pair(alice: Identity, bob: Identity, *, initiator_config: HandshakeConfig | None = None,
         responder_config: HandshakeConfig | None = None, initiator_auth=None, responder_auth=None,
         backend: CryptographyBackend | None = None, **responder_kwargs) -> tuple[InitiatorHandshake, ResponderHandshake]:
    """A fresh initiator (alice, dialling bob) and responder (bob) with real randomness."""
    initiator = InitiatorHandshake(alice, initiator_auth or accept_as("bob"), config=initiator_config, backend=backend)
    responder = ResponderHandshake(bob, responder_auth or accept_as("alice"), peer_address=PEER_ADDRESS,
                                   config=responder_config, backend=backend, **responder_kwargs)
    return initiator, responder


def assert_refused(exchange, *, by: str | None = None, error: type[HandshakeError] = HandshakeError) -> None:
    assert exchange.error is not None, f"handshake was not refused: {exchange.kinds()}"
    assert isinstance(exchange.error, error), f"expected {error.__name__}, got {exchange.error!r}"
    assert exchange.responder_result is None, "the responder must not complete a refused handshake"
    if by is not None:
        assert exchange.failed_side == by, f"expected the {by} side to refuse, {exchange.failed_side} did: {exchange.error!r}"


# --- layout of each message, used by the tampering tests ----------------------------------------


def regions(kind: Kind, suite: Suite, size: int) -> list[tuple[str, int, int]]:
    """(name, start, end) of every field of a handshake message body, per docs/PROTOCOL.md section 4."""
    if kind is Kind.HELLO:
        kem = KEM_SIZES[suite.kem].public_key if suite.kem else 0
        parts = [("version", 0, 1), ("suite id", 1, 2), ("e", 2, 34)]
        if kem:
            parts.append(("e1 (ML-KEM public key, in clear)", 34, 34 + kem))
        parts.append(("payload (msgpack, in clear)", 34 + kem, size))
        return parts
    if kind is Kind.RESPONSE:
        ekem1 = KEM_SIZES[suite.kem].ciphertext + TAG if suite.kem else 0
        parts = [("e", 0, 32)]
        if ekem1:
            parts.append(("ekem1 (encrypted ML-KEM ciphertext)", 32, 32 + ekem1))
        s = 32 + ekem1
        return parts + [("s (encrypted)", s, s + 48), ("payload (encrypted)", s + 48, size - TAG),
                        ("payload tag", size - TAG, size)]
    assert kind is Kind.FINISH
    return [("s (encrypted)", 0, 48), ("payload (encrypted)", 48, size - TAG), ("payload tag", size - TAG, size)]


EDGE = 24  # bytes flipped exhaustively at both ends of a large region
STRIDE = 19  # then every 19th byte in between (odd, so the flipped offset drifts through words)
SMALL = 2 * EDGE + STRIDE


def flip_plan(kind: Kind, suite: Suite, size: int) -> list[tuple[str, int, int]]:
    """(region, byte, bit) to flip. Exhaustive for classical; sampled inside large hybrid fields.

    Every region of every message is covered. The two header bytes get all 8 bits flipped;
    other bytes get one bit (``byte % 8``, so every bit position is exercised). For the
    classical suite every byte is flipped. For the hybrid suites a region larger than
    ``SMALL`` bytes (the ML-KEM key/ciphertext and the encrypted payload carrying the ML-DSA
    key and signature) is flipped on its first and last ``EDGE`` bytes and every ``STRIDE``-th
    byte in between: inside one AEAD ciphertext, or one hashed blob, every byte is protected
    by the same mechanism, so the boundaries plus a stride exercise it without running
    ~32,000 handshakes (about 40 s; a HELLO flip costs a fresh ML-DSA signature each time).
    """
    plan = []
    for name, start, end in regions(kind, suite, size):
        if suite.kem is None or end - start <= SMALL:
            positions = range(start, end)
        else:
            positions = sorted({*range(start, start + EDGE), *range(end - EDGE, end), *range(start + EDGE, end - EDGE, STRIDE)})
        for position in positions:
            bits = range(8) if kind is Kind.HELLO and position < 2 else [position % 8]
            plan.extend((name, position, bit) for bit in bits)
    return plan


def cut_points(kind: Kind, suite: Suite, size: int) -> list[int]:
    """0, 1, every field boundary (incl. HELLO's header-only cut at 2), one byte short."""
    points = {0, 1, size - 1}
    for _, start, end in regions(kind, suite, size):
        points |= {start, end, end - 1}
    return sorted(p for p in points if 0 <= p < size)


# --- successful handshakes ------------------------------------------------------------------------

LABELS = {
    "classical": ("X25519", "Ed25519"),
    "hybrid": ("X25519+ML-KEM-768", "Ed25519+ML-DSA-65"),
    "pq-strong": ("X25519+ML-KEM-1024", "Ed25519+ML-DSA-87"),
}


@pytest.mark.parametrize("suite", ALL_SUITES, ids=SUITE_IDS)
def test_a_full_handshake_agrees_on_keys_session_and_peers(suite: Suite, alice: Identity, bob: Identity) -> None:
    exchange = run_handshake(*pair(alice, bob, initiator_config=config_for(suite), responder_config=config_for(suite)))
    assert exchange.error is None and exchange.completed
    assert exchange.kinds() == [Kind.HELLO, Kind.RESPONSE, Kind.FINISH]
    i, r = exchange.initiator_result, exchange.responder_result
    assert i.is_initiator and not r.is_initiator
    assert i.send_key == r.recv_key and i.recv_key == r.send_key
    assert i.send_key != i.recv_key and len(i.send_key) == 32
    assert i.session_id == r.session_id and len(i.session_id) == 8
    assert i.handshake_hash == r.handshake_hash and len(i.handshake_hash) == 32
    assert i.rekey_chain == r.rekey_chain and i.rekey_chain not in (i.send_key, i.recv_key)
    assert i.suite is r.suite is suite
    assert (suite.kem_label, suite.signature_label) == LABELS[suite.name]
    assert i.aead is r.aead is Aead.CHACHA20_POLY1305
    assert i.peer.fingerprint == bob.fingerprint and r.peer.fingerprint == alice.fingerprint
    assert i.peer_static == bob.static_public and r.peer_static == alice.static_public
    assert (i.peer_name, r.peer_name) == ("bob", "alice")
    assert (i.peer.claimed_name, r.peer.claimed_name) == ("bob", "alice")


def test_two_handshakes_between_the_same_peers_get_fresh_keys(alice: Identity, bob: Identity) -> None:
    first = run_handshake(*pair(alice, bob)).initiator_result
    second = run_handshake(*pair(alice, bob)).initiator_result
    assert first.session_id != second.session_id
    assert first.send_key != second.send_key and first.recv_key != second.recv_key


def test_default_configuration_negotiates_hybrid(alice: Identity, bob: Identity) -> None:
    exchange = run_handshake(*pair(alice, bob))
    assert exchange.completed and exchange.initiator_result.suite is HYBRID


@pytest.mark.parametrize(
    ("initiator_suites", "responder_suites", "expected_kinds", "suite"),
    [
        ((CLASSICAL, HYBRID), (CLASSICAL,), [Kind.HELLO, Kind.RESPONSE, Kind.FINISH], CLASSICAL),
        ((CLASSICAL, HYBRID), (HYBRID, PQ_STRONG), [Kind.HELLO, Kind.RETRY, Kind.HELLO, Kind.RESPONSE, Kind.FINISH], HYBRID),
        ((HYBRID, PQ_STRONG), (CLASSICAL, HYBRID, PQ_STRONG), [Kind.HELLO, Kind.RESPONSE, Kind.FINISH], HYBRID),
    ],
    ids=["both-allow-classical", "only-initiator-allows-classical", "only-responder-allows-classical"],
)
def test_classical_is_used_only_when_both_sides_allow_it(initiator_suites, responder_suites, expected_kinds, suite,
                                                         alice: Identity, bob: Identity) -> None:
    exchange = run_handshake(*pair(alice, bob, initiator_config=config_for(*initiator_suites),
                                   responder_config=config_for(*responder_suites)))
    assert exchange.completed, exchange.error
    assert exchange.kinds() == expected_kinds
    assert exchange.initiator_result.suite is exchange.responder_result.suite is suite


AES_FIRST = (Aead.AES_256_GCM, Aead.CHACHA20_POLY1305)  # a node with AES instructions
CHACHA_FIRST = (Aead.CHACHA20_POLY1305, Aead.AES_256_GCM)  # a node without


@pytest.mark.parametrize(("initiator_aeads", "responder_aeads", "expected"), [
    pytest.param(AES_FIRST, AES_FIRST, Aead.AES_256_GCM, id="both-have-aes"),
    pytest.param(CHACHA_FIRST, CHACHA_FIRST, Aead.CHACHA20_POLY1305, id="neither-has-aes"),
    pytest.param(AES_FIRST, CHACHA_FIRST, Aead.CHACHA20_POLY1305, id="only-initiator-has-aes"),
    pytest.param(CHACHA_FIRST, AES_FIRST, Aead.CHACHA20_POLY1305, id="only-responder-has-aes"),
    pytest.param(AES_FIRST, (Aead.AES_256_GCM,), Aead.AES_256_GCM, id="responder-configured-aes-only"),
    pytest.param((Aead.AES_256_GCM,), CHACHA_FIRST, Aead.AES_256_GCM, id="initiator-configured-aes-only"),
    pytest.param((Aead.CHACHA20_POLY1305,), AES_FIRST, Aead.CHACHA20_POLY1305, id="initiator-configured-chacha-only"),
])
def test_both_sides_agree_on_the_aead_both_rank_best_and_chacha20_settles_a_disagreement(
        alice: Identity, bob: Identity, initiator_aeads: tuple[Aead, ...], responder_aeads: tuple[Aead, ...],
        expected: Aead) -> None:
    exchange = run_handshake(*pair(alice, bob, initiator_config=HandshakeConfig(aeads=initiator_aeads),
                                   responder_config=HandshakeConfig(aeads=responder_aeads)))
    assert exchange.completed, exchange.error
    assert exchange.initiator_result.aead is exchange.responder_result.aead is expected


def test_no_common_aead_is_refused(alice: Identity, bob: Identity) -> None:
    exchange = run_handshake(*pair(alice, bob, initiator_config=HandshakeConfig(aeads=(Aead.CHACHA20_POLY1305,)),
                                   responder_config=HandshakeConfig(aeads=(Aead.AES_256_GCM,))))
    assert_refused(exchange, by="R", error=NoCommonSuiteError)


def test_handshake_messages_after_completion_are_refused(alice: Identity, bob: Identity) -> None:
    initiator, responder = pair(alice, bob)
    exchange = run_handshake(initiator, responder)
    assert exchange.completed
    with pytest.raises(MalformedHandshakeError):
        initiator.receive(Frame(Kind.RESPONSE, exchange.body(Kind.RESPONSE)), NOW_MS)
    with pytest.raises(MalformedHandshakeError):
        responder.receive(Frame(Kind.FINISH, exchange.body(Kind.FINISH)), NOW_MS)


def test_frames_out_of_order_are_refused(alice: Identity, bob: Identity) -> None:
    initiator, responder = pair(alice, bob)
    with pytest.raises(MalformedHandshakeError):
        responder.receive(Frame(Kind.FINISH, b"\x00" * 100), NOW_MS)
    with pytest.raises(MalformedHandshakeError):
        responder.receive(Frame(Kind.RESPONSE, b"\x00" * 100), NOW_MS)
    with pytest.raises(MalformedHandshakeError):
        initiator.receive(Frame(Kind.RESPONSE, b"\x00" * 100), NOW_MS)  # before its HELLO
    initiator.start(NOW_MS)
    with pytest.raises(MalformedHandshakeError):
        initiator.receive(Frame(Kind.HELLO, b"\x00" * 100), NOW_MS)


def test_an_unsupported_protocol_version_is_refused(alice: Identity, bob: Identity) -> None:
    initiator, responder = pair(alice, bob)
    exchange = run_handshake(initiator, responder, tamper=tamper_first(Kind.HELLO, lambda body: b"\x02" + body[1:]))
    assert_refused(exchange, by="R", error=UnsupportedVersionError)


# --- tampering: every flipped bit ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", [Kind.HELLO, Kind.RESPONSE, Kind.FINISH], ids=lambda k: k.name)
@pytest.mark.parametrize("suite", ALL_SUITES, ids=SUITE_IDS)
def test_a_flipped_bit_anywhere_in_a_handshake_message_makes_the_handshake_fail(
        suite: Suite, kind: Kind, alice: Identity, bob: Identity, memo_backend) -> None:
    """A flip in HELLO's in-clear parts is caught late (the transcript hash differs, so the
    initiator cannot decrypt the RESPONSE); everything else fails where it is read. Never a
    crash, never success, and on a HELLO/RESPONSE flip the initiator never sends FINISH."""
    config = config_for(suite)

    def fresh():
        return deterministic_pair(alice, bob, memo_backend, initiator_config=config, responder_config=config)

    baseline = run_handshake(*fresh())
    assert baseline.completed
    control = run_handshake(*fresh(), tamper=tamper_first(kind, lambda body: body))
    assert control.completed and control.frames == baseline.frames, "rebuilt handshakes must be byte-identical"

    body = baseline.body(kind)
    plan = flip_plan(kind, suite, len(body))
    failures = []
    for region, position, bit in plan:
        try:
            exchange = run_handshake(*fresh(), tamper=tamper_first(kind, partial(flip_bit, position=position, bit=bit)))
        except Exception as exc:  # noqa: BLE001 - the point is to report any non-HandshakeError
            failures.append(f"{region} byte {position} bit {bit}: crashed with {exc!r}")
            continue
        if exchange.error is None or exchange.responder_result is not None:
            failures.append(f"{region} byte {position} bit {bit}: handshake completed")
        elif kind is not Kind.FINISH and Kind.FINISH in exchange.kinds():
            failures.append(f"{region} byte {position} bit {bit}: initiator sent FINISH to a tampered peer")
    assert not failures, "\n".join(failures[:20])
    assert {name for name, _, _ in plan} == {name for name, start, end in regions(kind, suite, len(body)) if end > start}


# --- tampering: truncation ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [Kind.HELLO, Kind.RESPONSE, Kind.FINISH], ids=lambda k: k.name)
@pytest.mark.parametrize("suite", ALL_SUITES, ids=SUITE_IDS)
def test_a_truncated_handshake_message_is_refused(suite: Suite, kind: Kind, alice: Identity, bob: Identity,
                                                  memo_backend) -> None:
    """Cut the message body (re-framed with the shorter length) at 0, 1, every field boundary
    (HELLO: header only, header + e, ...) and one byte short."""
    config = config_for(suite)
    baseline = run_handshake(*deterministic_pair(alice, bob, memo_backend, initiator_config=config, responder_config=config))
    size = len(baseline.body(kind))
    for length in cut_points(kind, suite, size):
        exchange = run_handshake(*deterministic_pair(alice, bob, memo_backend, initiator_config=config, responder_config=config),
                                 tamper=tamper_first(kind, lambda body, n=length: body[:n]))
        assert exchange.error is not None, f"{kind.name} cut to {length} of {size} bytes was accepted"
        assert exchange.responder_result is None
        if kind is not Kind.FINISH:
            assert exchange.initiator_result is None and Kind.FINISH not in exchange.kinds()


def test_a_frame_cut_short_on_the_wire_is_never_delivered(alice: Identity) -> None:
    """The outer length says more is coming: the decoder keeps waiting (the session's handshake
    timeout then closes the connection), it never hands a partial message to the handshake."""
    hello = InitiatorHandshake(alice, accept_as("bob")).start(NOW_MS)
    decoder = FrameDecoder()
    assert decoder.feed(hello[:-1]) == []
    assert decoder.buffered == len(hello) - 1
    assert [f.kind for f in decoder.feed(hello[-1:])] == [Kind.HELLO]


# --- replay ----------------------------------------------------------------------------------------------


def test_a_replayed_hello_is_refused_by_the_replay_cache(alice: Identity, bob: Identity) -> None:
    cache = ReplayCache()
    initiator, responder = pair(alice, bob, replay_cache=cache)
    hello = one_frame(initiator.start(NOW_MS))
    assert one_frame(responder.receive(hello, NOW_MS).to_send).kind is Kind.RESPONSE
    _, second_responder = pair(alice, bob, replay_cache=cache)
    with pytest.raises(ReplayError, match="replayed"):
        second_responder.receive(hello, NOW_MS + 1_000)


@pytest.mark.parametrize("skew_ms", [-WINDOW_MS - 1, WINDOW_MS + 1, -10 * WINDOW_MS], ids=["old", "future", "ancient"])
def test_a_hello_outside_the_timestamp_window_is_refused(skew_ms: int, alice: Identity, bob: Identity) -> None:
    initiator, responder = pair(alice, bob)
    hello = one_frame(initiator.start(NOW_MS + skew_ms))
    with pytest.raises(ReplayError):
        responder.receive(hello, NOW_MS)


@pytest.mark.parametrize("skew_ms", [-WINDOW_MS, WINDOW_MS], ids=["old-edge", "future-edge"])
def test_a_hello_at_the_edge_of_the_window_is_accepted(skew_ms: int, alice: Identity, bob: Identity) -> None:
    initiator, responder = pair(alice, bob)
    hello = one_frame(initiator.start(NOW_MS + skew_ms))
    assert one_frame(responder.receive(hello, NOW_MS).to_send).kind is Kind.RESPONSE


def test_the_replay_cache_forgets_entries_only_after_they_can_no_longer_pass_the_window() -> None:
    """Accepted at 0 with a timestamp of +1000, a HELLO still passes the (inclusive) window
    check at exactly 2000, so the cache must still refuse it then; only at 2001 is it
    refused by its timestamp anyway. (Until issue 13, finding 9, it was forgotten at 2000.)"""
    cache = ReplayCache(window_ms=1_000)
    cache.check_and_add(b"a" * 32, 0)
    with pytest.raises(ReplayError):
        cache.check_and_add(b"a" * 32, 1_999)
    with pytest.raises(ReplayError):
        cache.check_and_add(b"a" * 32, 2_000)
    cache.check_and_add(b"a" * 32, 2_001)


def test_a_hello_stamped_at_the_future_edge_is_not_accepted_again_at_twice_the_window(alice: Identity,
                                                                                      bob: Identity) -> None:
    """Finding 9: stamped +120 s and accepted, the same HELLO was accepted again exactly
    240,000 ms later, when its timestamp is at the (inclusive) -120 s edge."""
    cache = ReplayCache()
    initiator, responder = pair(alice, bob, replay_cache=cache)
    hello = one_frame(initiator.start(NOW_MS + WINDOW_MS))
    assert one_frame(responder.receive(hello, NOW_MS).to_send).kind is Kind.RESPONSE
    _, later = pair(alice, bob, replay_cache=cache)
    with pytest.raises(ReplayError, match="replayed"):
        later.receive(hello, NOW_MS + 2 * WINDOW_MS)
    _, after_the_edge = pair(alice, bob, replay_cache=cache)
    with pytest.raises(ReplayError, match="away from our clock"):
        after_the_edge.receive(hello, NOW_MS + 2 * WINDOW_MS + 1)


def test_the_replay_cache_is_bounded() -> None:
    cache = ReplayCache(window_ms=1_000, max_entries=2)
    for digest in (b"a", b"b", b"c"):
        cache.check_and_add(digest, 0)
    cache.check_and_add(b"a", 0)  # evicted as the oldest
    with pytest.raises(ReplayError):
        cache.check_and_add(b"c", 0)


def test_a_replayed_response_does_not_authenticate_to_a_new_initiator(alice: Identity, bob: Identity) -> None:
    recorded = run_handshake(*pair(alice, bob))
    assert recorded.completed
    initiator, _ = pair(alice, bob)
    initiator.start(NOW_MS)
    with pytest.raises(HandshakeError):
        initiator.receive(Frame(Kind.RESPONSE, recorded.body(Kind.RESPONSE)), NOW_MS)
    assert not initiator.done


def test_a_replayed_finish_does_not_authenticate_to_a_new_responder(alice: Identity, bob: Identity) -> None:
    """Even replaying the whole initiator side (HELLO then FINISH) to a responder with a fresh
    replay cache (say, after a restart) fails: the responder's new ephemeral changes every key."""
    recorded = run_handshake(*pair(alice, bob))
    assert recorded.completed
    _, responder = pair(alice, bob, replay_cache=ReplayCache())
    assert one_frame(responder.receive(Frame(Kind.HELLO, recorded.body(Kind.HELLO)), NOW_MS).to_send).kind is Kind.RESPONSE
    with pytest.raises(HandshakeError):
        responder.receive(Frame(Kind.FINISH, recorded.body(Kind.FINISH)), NOW_MS)
    assert not responder.done


# --- downgrade ----------------------------------------------------------------------------------------


def _payload_offset(body: bytes) -> int:
    suite = {s.wire_id: s for s in ALL_SUITES}[body[1]]
    return 2 + 32 + (KEM_SIZES[suite.kem].public_key if suite.kem else 0)


def rewrite_hello_payload(change):
    """HELLO's payload travels in clear after header, e and e1: decode, change, re-encode."""

    def rewrite(body: bytes) -> bytes:
        offset = _payload_offset(body)
        payload = msgpack.unpackb(body[offset:], raw=False)
        change(payload)
        return body[:offset] + msgpack.packb(payload, use_bin_type=True)

    return rewrite


def test_rewriting_the_hello_payload_unchanged_is_byte_identical(alice: Identity) -> None:
    """Control for the offer-stripping tests: the rewrite itself changes nothing."""
    body = one_frame(InitiatorHandshake(alice, accept_as("bob")).start(NOW_MS)).body
    assert rewrite_hello_payload(lambda payload: None)(body) == body


@pytest.mark.parametrize(
    ("initiator_suites", "stripped"),
    [
        ((PQ_STRONG, HYBRID), {HYBRID}),
        ((HYBRID, PQ_STRONG), {PQ_STRONG}),
        ((CLASSICAL, HYBRID, PQ_STRONG), {HYBRID, PQ_STRONG}),
    ],
    ids=["strip-hybrid", "strip-pq-strong", "strip-both-leaving-classical"],
)
def test_stripping_suites_from_the_hello_offer_makes_the_handshake_fail(initiator_suites, stripped,
                                                                        alice: Identity, bob: Identity) -> None:
    """The responder accepts the edited offer (it allows every suite), but the offer is in the
    transcript hash, so the initiator cannot decrypt the RESPONSE and never sends FINISH."""
    stripped_ids = {s.wire_id for s in stripped}

    def strip(payload):
        payload["suites"] = [s for s in payload["suites"] if s not in stripped_ids]

    everything = config_for(*ALL_SUITES)
    exchange = run_handshake(*pair(alice, bob, initiator_config=config_for(*initiator_suites), responder_config=everything),
                             tamper=tamper_first(Kind.HELLO, rewrite_hello_payload(strip)))
    assert exchange.kinds() == [Kind.HELLO, Kind.RESPONSE], "the edited HELLO should get past the responder"
    assert_refused(exchange, by="I", error=HandshakeDecryptError)
    assert exchange.initiator_result is None


@pytest.mark.parametrize(
    ("proposed", "swapped_to"),
    [(HYBRID, CLASSICAL), (PQ_STRONG, HYBRID), (PQ_STRONG, CLASSICAL), (CLASSICAL, HYBRID), (HYBRID, PQ_STRONG)],
    ids=lambda s: s.name,
)
def test_swapping_the_proposed_suite_id_makes_the_handshake_fail(proposed: Suite, swapped_to: Suite,
                                                                 alice: Identity, bob: Identity) -> None:
    everything = config_for(*ALL_SUITES)
    initiator_config = config_for(proposed, *[s for s in ALL_SUITES if s is not proposed])
    exchange = run_handshake(*pair(alice, bob, initiator_config=initiator_config, responder_config=everything),
                             tamper=tamper_first(Kind.HELLO, lambda body: body[:1] + bytes([swapped_to.wire_id]) + body[2:]))
    assert_refused(exchange)
    assert exchange.initiator_result is None


def test_a_responder_that_only_allows_pq_strong_retries_a_hybrid_hello(alice: Identity, bob: Identity) -> None:
    exchange = run_handshake(*pair(alice, bob, initiator_config=config_for(HYBRID, PQ_STRONG),
                                   responder_config=config_for(PQ_STRONG)))
    assert exchange.kinds() == [Kind.HELLO, Kind.RETRY, Kind.HELLO, Kind.RESPONSE, Kind.FINISH]
    assert exchange.completed
    assert exchange.initiator_result.suite is exchange.responder_result.suite is PQ_STRONG
    retry = msgpack.unpackb(exchange.body(Kind.RETRY), raw=False)
    assert retry["suite"] == PQ_STRONG.wire_id
    assert exchange.body(Kind.HELLO, 1)[1] == PQ_STRONG.wire_id


def forged_retry(suite_id: int, cookie: bytes) -> bytes:
    return encode_frame(Kind.RETRY, encode_payload({"suite": suite_id, "cookie": cookie}))


def test_a_forged_retry_asking_for_classical_is_a_downgrade(alice: Identity, bob: Identity) -> None:
    initiator, responder = pair(alice, bob)  # default: classical not allowed
    initiator.start(NOW_MS)  # the attacker swallows this HELLO and answers itself
    exchange = run_handshake(initiator, responder, start=[("R", forged_retry(CLASSICAL.wire_id, os.urandom(24)))])
    assert_refused(exchange, by="I", error=DowngradeError)
    assert exchange.kinds("I") == [], "the initiator must not start over with a suite it does not allow"


def test_a_forged_retry_with_a_bad_cookie_is_refused_by_the_responder(alice: Identity, bob: Identity) -> None:
    """Even when both sides allow the (stronger) suite the forged RETRY asks for, it cannot
    carry a cookie the responder issued, so the restarted HELLO is refused."""
    everything = config_for(HYBRID, PQ_STRONG, CLASSICAL)
    initiator, responder = pair(alice, bob, initiator_config=everything, responder_config=everything)
    initiator.start(NOW_MS)
    exchange = run_handshake(initiator, responder, start=[("R", forged_retry(PQ_STRONG.wire_id, os.urandom(24)))])
    assert exchange.kinds() == [Kind.RETRY, Kind.HELLO]
    assert_refused(exchange, by="R", error=CookieError)


@pytest.mark.parametrize(
    ("proposed", "retried_to"),
    [(HYBRID, CLASSICAL), (PQ_STRONG, HYBRID), (PQ_STRONG, CLASSICAL)],
    ids=["hybrid-to-classical", "pq-strong-to-hybrid", "pq-strong-to-classical"],
)
def test_the_initiator_never_follows_a_retry_to_a_weaker_suite(proposed: Suite, retried_to: Suite, alice: Identity,
                                                               bob: Identity) -> None:
    """Finding 8: a RETRY is unauthenticated, so it may only move the initiator to a suite at
    least as strong as the one it proposed, even one its configuration allows. (Before, a
    forged RETRY could take an initiator that allows classical down to classical.)"""
    everything_but_first = config_for(proposed, *[s for s in ALL_SUITES if s is not proposed])
    initiator, responder = pair(alice, bob, initiator_config=everything_but_first, responder_config=config_for(*ALL_SUITES))
    initiator.start(NOW_MS)
    exchange = run_handshake(initiator, responder, start=[("R", forged_retry(retried_to.wire_id, os.urandom(24)))])
    assert_refused(exchange, by="I", error=DowngradeError)
    assert exchange.kinds("I") == [], "no HELLO for the weaker suite was sent"


def test_a_responder_that_allows_only_weaker_suites_refuses_instead_of_retrying(alice: Identity, bob: Identity) -> None:
    """The honest counterpart: a responder never asks for a weaker suite, it says there is
    none in common (ALERT no common suite), so the initiator's proposal is its floor."""
    exchange = run_handshake(*pair(alice, bob, initiator_config=config_for(PQ_STRONG, HYBRID),
                                   responder_config=config_for(HYBRID)))
    assert_refused(exchange, by="R", error=NoCommonSuiteError)
    assert exchange.kinds() == [Kind.HELLO]


def test_a_retry_to_a_stronger_suite_is_followed(alice: Identity, bob: Identity) -> None:
    exchange = run_handshake(*pair(alice, bob, initiator_config=config_for(CLASSICAL, HYBRID, PQ_STRONG),
                                   responder_config=config_for(PQ_STRONG)))
    assert exchange.completed and exchange.kinds() == [Kind.HELLO, Kind.RETRY, Kind.HELLO, Kind.RESPONSE, Kind.FINISH]
    assert exchange.initiator_result.suite is PQ_STRONG


@pytest.mark.parametrize("cookie", [b"", b"x" * 65, "a string"], ids=["empty", "too-long", "not-bytes"])
def test_a_retry_with_a_malformed_cookie_is_refused_by_the_initiator_or_responder(cookie, alice: Identity, bob: Identity) -> None:
    initiator, responder = pair(alice, bob)
    initiator.start(NOW_MS)
    retry = encode_frame(Kind.RETRY, encode_payload({"suite": PQ_STRONG.wire_id, "cookie": cookie}))
    exchange = run_handshake(initiator, responder, start=[("R", retry)])
    assert_refused(exchange)
    assert isinstance(exchange.error, (MalformedHandshakeError, CookieError))


def test_a_second_retry_is_refused(alice: Identity, bob: Identity) -> None:
    initiator, _ = pair(alice, bob)
    initiator.start(NOW_MS)
    initiator.receive(one_frame(forged_retry(PQ_STRONG.wire_id, b"c" * 24)), NOW_MS)
    with pytest.raises(MalformedHandshakeError):
        initiator.receive(one_frame(forged_retry(HYBRID.wire_id, b"c" * 24)), NOW_MS)


def test_a_responder_requiring_hybrid_refuses_a_classical_only_initiator_with_an_alert(alice: Identity, bob: Identity) -> None:
    a = Session(InitiatorHandshake(alice, accept_as("bob"), config=config_for(CLASSICAL)), now_ms=NOW_MS)
    b = Session(ResponderHandshake(bob, accept_as("alice"), peer_address=PEER_ADDRESS), now_ms=NOW_MS)  # hybrid, pq-strong
    a.start(NOW_MS)
    with pytest.raises(NoCommonSuiteError):
        b.receive_data(a.data_to_send(), NOW_MS)
    alert = b.data_to_send()
    frame = one_frame(alert)
    assert frame.kind is Kind.ALERT and frame.body[0] == AlertCode.NO_COMMON_SUITE
    with pytest.raises(HandshakeRefusedError, match="no common suite"):
        a.receive_data(alert, NOW_MS)


@pytest.mark.parametrize(
    ("error", "code"),
    [(NoCommonSuiteError("x"), AlertCode.NO_COMMON_SUITE), (DowngradeError("x"), AlertCode.NO_COMMON_SUITE),
     (UnsupportedVersionError("x"), AlertCode.UNSUPPORTED_VERSION), (UntrustedPeerError("x"), AlertCode.UNTRUSTED),
     (ReplayError("x"), AlertCode.REPLAY), (CookieError("x"), AlertCode.BAD_COOKIE),
     (HandshakeBusyError("x"), AlertCode.BUSY),
     (BadSignatureError("secret detail"), AlertCode.BAD_MESSAGE), (HandshakeDecryptError("x"), AlertCode.BAD_MESSAGE)],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else v.name,
)
def test_an_alert_names_only_the_reason_code(error: HandshakeError, code: AlertCode) -> None:
    frame = one_frame(alert_frame(error))
    assert frame.kind is Kind.ALERT and frame.body[0] == code
    assert frame.body[1:] == code.name.lower().replace("_", " ").encode(), "the reason is the code's name, no details"
    refused = parse_alert(frame.body)
    assert isinstance(refused, HandshakeRefusedError)
    assert code.name.lower().replace("_", " ") in str(refused)


@given(body=st.binary(max_size=64))
def test_any_alert_body_becomes_handshake_refused(body: bytes, alice: Identity) -> None:
    initiator = InitiatorHandshake(alice, accept_as("bob"))
    initiator.start(NOW_MS)
    with pytest.raises(HandshakeRefusedError):
        initiator.receive(Frame(Kind.ALERT, body), NOW_MS)


# --- untrusted identities -----------------------------------------------------------------------------


def test_the_initiator_refuses_an_unpinned_responder_before_revealing_itself(alice: Identity, bob: Identity,
                                                                             mallory: Identity) -> None:
    pins = TrustStore({"bob": mallory.fingerprint})  # we believe "bob" is someone else
    initiator, responder = pair(alice, bob, initiator_auth=lambda peer: pins.require(peer.fingerprint, "bob"))
    exchange = run_handshake(initiator, responder)
    assert_refused(exchange, by="I", error=UntrustedPeerError)
    assert exchange.kinds() == [Kind.HELLO, Kind.RESPONSE]
    assert exchange.kinds("I") == [Kind.HELLO], "no FINISH: the initiator's identity was never sent"
    assert exchange.initiator_result is None and not initiator.done


def test_the_initiator_refuses_an_impostor_claiming_the_dialled_name(alice: Identity, bob: Identity) -> None:
    impostor = Identity.generate("bob")
    pins = TrustStore({"bob": bob.fingerprint})
    initiator, responder = pair(alice, impostor, initiator_auth=lambda peer: pins.require(peer.fingerprint, "bob"))
    exchange = run_handshake(initiator, responder)
    assert_refused(exchange, by="I", error=UntrustedPeerError)
    assert exchange.kinds("I") == [Kind.HELLO]


def test_the_initiator_accepts_the_pinned_responder(alice: Identity, bob: Identity) -> None:
    pins = TrustStore({"bob": bob.fingerprint})
    exchange = run_handshake(*pair(alice, bob, initiator_auth=lambda peer: pins.require(peer.fingerprint, "bob")))
    assert exchange.completed and exchange.initiator_result.peer_name == "bob"


def test_the_responder_refuses_an_unpinned_initiator(alice: Identity, bob: Identity, mallory: Identity) -> None:
    pins = TrustStore({"mallory": mallory.fingerprint})
    exchange = run_handshake(*pair(alice, bob, responder_auth=lambda peer: pins.require(peer.fingerprint, None)))
    assert_refused(exchange, by="R", error=UntrustedPeerError)


def test_the_responder_names_a_pinned_initiator_by_its_pin_not_its_claim(alice: Identity, bob: Identity) -> None:
    pins = TrustStore({"alice-laptop": alice.fingerprint})
    exchange = run_handshake(*pair(alice, bob, responder_auth=lambda peer: pins.require(peer.fingerprint, None)))
    assert exchange.completed
    assert exchange.responder_result.peer_name == "alice-laptop"
    assert exchange.responder_result.peer.claimed_name == "alice"


# --- bad signatures --------------------------------------------------------------------------------------


def _corrupt(signatures: dict, how: str, identity: Identity, suite: Suite) -> dict:
    signatures = dict(signatures)
    half, _, mode = how.partition("-")
    if mode == "flip":
        signatures[half] = flip_bit(signatures[half], len(signatures[half]) // 2, 3)
    elif mode == "drop":
        del signatures[half]
    elif mode == "other-message":  # a genuine signature by the right key, over another transcript
        other = b"pqtunnel/1 transcript signature\x00R" + b"\x00" * 32
        if half == "ed":
            signatures["ed"] = ed25519_sign(identity.ed25519_seed, other)
        else:
            signatures["pq"] = CryptographyBackend().mldsa_sign(suite.pq_signature, identity.pq_seeds[suite.pq_signature],
                                                               other, b"pqtunnel-v1")
    return signatures


@pytest.mark.parametrize("how", ["ed-flip", "pq-flip", "ed-drop", "pq-drop", "ed-other-message", "pq-other-message"])
@pytest.mark.parametrize("signer", ["responder", "initiator"])
@pytest.mark.parametrize("suite", [HYBRID, PQ_STRONG], ids=lambda s: s.name)
def test_both_signature_halves_are_required(suite: Suite, signer: str, how: str, alice: Identity, bob: Identity,
                                            monkeypatch) -> None:
    """One valid half is not enough: corrupting either Ed25519 or ML-DSA alone is refused."""
    victim = bob if signer == "responder" else alice
    real_sign = Identity.sign

    def sign(self, backend, suite_, message):
        signatures = real_sign(self, backend, suite_, message)
        return _corrupt(signatures, how, self, suite_) if self is victim else signatures

    monkeypatch.setattr(Identity, "sign", sign)
    config = config_for(suite)
    exchange = run_handshake(*pair(alice, bob, initiator_config=config, responder_config=config))
    assert_refused(exchange, by="I" if signer == "responder" else "R", error=BadSignatureError)
    if signer == "responder":
        assert exchange.kinds("I") == [Kind.HELLO]


@pytest.mark.parametrize("signer", ["responder", "initiator"])
def test_a_bad_ed25519_signature_is_refused_in_the_classical_suite(signer: str, alice: Identity, bob: Identity,
                                                                   monkeypatch) -> None:
    victim = bob if signer == "responder" else alice
    real_sign = Identity.sign
    monkeypatch.setattr(Identity, "sign", lambda self, backend, suite, message: _corrupt(
        real_sign(self, backend, suite, message), "ed-flip", self, suite) if self is victim else real_sign(self, backend, suite, message))
    config = config_for(CLASSICAL)
    exchange = run_handshake(*pair(alice, bob, initiator_config=config, responder_config=config))
    assert_refused(exchange, by="I" if signer == "responder" else "R", error=BadSignatureError)


def test_a_genuine_signature_under_another_identity_is_refused(alice: Identity, bob: Identity, mallory: Identity,
                                                               monkeypatch) -> None:
    """The responder presents bob's identity but signs with mallory's keys."""
    real_sign = Identity.sign
    monkeypatch.setattr(Identity, "sign", lambda self, backend, suite, message: real_sign(
        mallory if self is bob else self, backend, suite, message))
    exchange = run_handshake(*pair(alice, bob))
    assert_refused(exchange, by="I", error=BadSignatureError)


# --- cookies ---------------------------------------------------------------------------------------------


def test_a_responder_requiring_a_cookie_answers_with_a_cheap_retry_first(alice: Identity, bob: Identity,
                                                                        monkeypatch) -> None:
    signed_by: list[str] = []
    real_sign = Identity.sign

    def spy(self, backend, suite, message):
        signed_by.append(self.name)
        return real_sign(self, backend, suite, message)

    monkeypatch.setattr(Identity, "sign", spy)
    initiator, responder = pair(alice, bob, require_cookie=True)
    retry = responder.receive(one_frame(initiator.start(NOW_MS)), NOW_MS).to_send
    frame = one_frame(retry)
    assert frame.kind is Kind.RETRY
    payload = msgpack.unpackb(frame.body, raw=False)
    assert set(payload) == {"suite", "cookie"} and payload["suite"] == HYBRID.wire_id and len(payload["cookie"]) == 24
    assert signed_by == [], "a RETRY must not cost the responder a signature"
    exchange = run_handshake(initiator, responder, start=[("R", retry)])
    assert exchange.kinds() == [Kind.RETRY, Kind.HELLO, Kind.RESPONSE, Kind.FINISH]
    assert exchange.completed
    assert msgpack.unpackb(exchange.body(Kind.HELLO)[_payload_offset(exchange.body(Kind.HELLO)):], raw=False)["retry"]["cookie"] \
        == payload["cookie"]


def test_an_expired_cookie_is_refused(alice: Identity, bob: Identity) -> None:
    initiator, responder = pair(alice, bob, require_cookie=True)
    retry = responder.receive(one_frame(initiator.start(NOW_MS)), NOW_MS).to_send
    later = NOW_MS + 3 * 60_000  # two cookie buckets on
    second_hello = initiator.receive(one_frame(retry), later).to_send
    with pytest.raises(CookieError, match="expired"):
        responder.receive(one_frame(second_hello), later)


def test_a_cookie_is_accepted_until_the_end_of_its_lifetime(alice: Identity, bob: Identity) -> None:
    """Cookies carry their issue time (since issue 13; before, a 60 s bucket number)."""
    initiator, responder = pair(alice, bob, require_cookie=True)
    retry = responder.receive(one_frame(initiator.start(NOW_MS)), NOW_MS).to_send
    at_the_edge = NOW_MS + COOKIE_LIFETIME_MS
    second_hello = initiator.receive(one_frame(retry), at_the_edge).to_send
    assert one_frame(responder.receive(one_frame(second_hello), at_the_edge).to_send).kind is Kind.RESPONSE


def test_a_cookie_is_bound_to_the_client_address(alice: Identity, bob: Identity) -> None:
    jar = CookieJar(b"k" * 32)
    initiator, responder = pair(alice, bob, require_cookie=True, cookies=jar)
    retry = responder.receive(one_frame(initiator.start(NOW_MS)), NOW_MS).to_send
    second_hello = initiator.receive(one_frame(retry), NOW_MS).to_send
    elsewhere = ResponderHandshake(bob, accept_as("alice"), peer_address="198.51.100.9", require_cookie=True, cookies=jar)
    with pytest.raises(CookieError, match="forged"):
        elsewhere.receive(one_frame(second_hello), NOW_MS)


def test_a_cookie_from_another_responder_secret_is_refused(alice: Identity, bob: Identity) -> None:
    initiator, responder = pair(alice, bob, require_cookie=True)
    retry = responder.receive(one_frame(initiator.start(NOW_MS)), NOW_MS).to_send
    second_hello = initiator.receive(one_frame(retry), NOW_MS).to_send
    _, restarted = pair(alice, bob, require_cookie=True)  # new random cookie secret
    with pytest.raises(CookieError):
        restarted.receive(one_frame(second_hello), NOW_MS)


def retried_hellos_with_one_cookie(alice: Identity, bob: Identity, backend: CryptographyBackend, count: int,
                                   jar: CookieJar) -> list[Frame]:
    """What a flooder does with one cookie: ``count`` distinct HELLOs (other timestamps) from
    the same ephemeral key and address, each carrying the cookie of the first RETRY."""
    first, responder = deterministic_pair(alice, bob, backend, require_cookie=True, cookies=jar)
    retry = one_frame(responder.receive(one_frame(first.start(NOW_MS)), NOW_MS).to_send)
    assert retry.kind is Kind.RETRY
    hellos = []
    for n in range(count):
        initiator, _ = deterministic_pair(alice, bob, backend)
        initiator.start(NOW_MS + n)
        hellos.append(one_frame(initiator.receive(retry, NOW_MS + n).to_send))
    assert len({hello.body for hello in hellos}) == count
    return hellos


def test_one_cookie_admits_one_hello_not_a_hundred(alice: Identity, bob: Identity, memo_backend) -> None:
    """Finding 2: one cookie was accepted for 100 different HELLOs. Now it is single-use:
    the first redemption is answered, every other HELLO carrying it is refused, on any
    connection, before the responder signs anything."""
    jar = CookieJar(b"k" * 32)
    answered, refused = 0, 0
    for hello in retried_hellos_with_one_cookie(alice, bob, memo_backend, 100, jar):
        _, responder = deterministic_pair(alice, bob, memo_backend, require_cookie=True, cookies=jar)
        try:
            answered += one_frame(responder.receive(hello, NOW_MS + 200).to_send).kind is Kind.RESPONSE
        except CookieError as exc:
            assert "already used" in str(exc)
            refused += 1
    assert (answered, refused) == (1, 99)


def test_a_cookie_is_bound_to_the_ephemeral_key_of_the_hello_it_answers(alice: Identity, bob: Identity) -> None:
    """The MAC covers the answered HELLO's X25519 ephemeral ``e``, which the retried HELLO
    must carry again: another HELLO (another ``e``) cannot use the cookie."""
    jar = CookieJar(b"k" * 32)
    initiator, responder = pair(alice, bob, require_cookie=True, cookies=jar)
    retry = one_frame(responder.receive(one_frame(initiator.start(NOW_MS)), NOW_MS).to_send)
    stranger, _ = pair(alice, bob)
    stranger.start(NOW_MS)
    borrowed = one_frame(stranger.receive(retry, NOW_MS).to_send)
    _, other_connection = pair(alice, bob, require_cookie=True, cookies=jar)
    with pytest.raises(CookieError, match="another HELLO"):
        other_connection.receive(borrowed, NOW_MS)


def test_a_retried_hello_keeps_its_ephemeral_key_and_gets_a_fresh_kem_key(alice: Identity, bob: Identity) -> None:
    initiator, responder = pair(alice, bob, require_cookie=True)
    first = one_frame(initiator.start(NOW_MS)).body
    retried = one_frame(initiator.receive(one_frame(responder.receive(Frame(Kind.HELLO, first), NOW_MS).to_send),
                                          NOW_MS).to_send).body
    kem = KEM_SIZES[HYBRID.kem].public_key
    assert retried[2:34] == first[2:34], "same X25519 ephemeral e"
    assert retried[34:34 + kem] != first[34:34 + kem], "new ML-KEM encapsulation key"


def test_a_full_table_of_used_cookies_never_lets_a_cookie_through_twice() -> None:
    """The single-use table is bounded; when it overflows, the earliest-issued cookie is
    forgotten and every cookie issued up to then is refused (the horizon moves up)."""
    jar = CookieJar(b"k" * 32, max_spent=2)
    cookies = [jar.issue(NOW_MS + n, PEER_ADDRESS, HYBRID, bytes([n]) * 32) for n in range(4)]
    for n in (0, 1, 2):
        jar.redeem(cookies[n], NOW_MS + 10, PEER_ADDRESS, HYBRID, bytes([n]) * 32)
    assert jar.spent == 2
    for n in (0, 1, 2):
        with pytest.raises(CookieError, match="already used"):
            jar.redeem(cookies[n], NOW_MS + 10, PEER_ADDRESS, HYBRID, bytes([n]) * 32)
    jar.redeem(cookies[3], NOW_MS + 10, PEER_ADDRESS, HYBRID, bytes([3]) * 32)  # issued after the horizon


def test_used_cookies_are_forgotten_once_they_have_expired_anyway() -> None:
    jar = CookieJar(b"k" * 32)
    cookie = jar.issue(NOW_MS, PEER_ADDRESS, HYBRID, b"e" * 32)
    jar.redeem(cookie, NOW_MS, PEER_ADDRESS, HYBRID, b"e" * 32)
    jar.redeem(jar.issue(NOW_MS + COOKIE_LIFETIME_MS + 1, PEER_ADDRESS, HYBRID, b"f" * 32),
               NOW_MS + COOKIE_LIFETIME_MS + 1, PEER_ADDRESS, HYBRID, b"f" * 32)
    assert jar.spent == 1
    with pytest.raises(CookieError, match="expired"):
        jar.redeem(cookie, NOW_MS + COOKIE_LIFETIME_MS + 1, PEER_ADDRESS, HYBRID, b"e" * 32)


@pytest.mark.parametrize("cookie", [b"", b"x" * 23, b"x" * 25, "text", None, 7], ids=repr)
def test_a_malformed_cookie_is_refused(cookie) -> None:
    with pytest.raises(CookieError, match="malformed"):
        CookieJar(b"k" * 32).redeem(cookie, NOW_MS, PEER_ADDRESS, HYBRID, b"e" * 32)


# --- admission: rationing the responder's expensive work -----------------------------------------------


class RecordingAdmission:
    """An ``admit`` hook that answers from a script and remembers what it was asked."""

    def __init__(self, *verdicts: Verdict) -> None:
        self.verdicts = list(verdicts)
        self.asked: list[bool] = []

    def __call__(self, proven: bool) -> Verdict:
        self.asked.append(proven)
        return self.verdicts.pop(0)


def test_admission_asking_for_a_cookie_gets_a_retry_and_no_signature(alice: Identity, bob: Identity, monkeypatch) -> None:
    signed: list[str] = []
    real_sign = Identity.sign
    monkeypatch.setattr(Identity, "sign", lambda self, *a: signed.append(self.name) or real_sign(self, *a))
    admit = RecordingAdmission(Verdict.COOKIE, Verdict.ADMIT)
    initiator, responder = pair(alice, bob, admit=admit)
    retry = one_frame(responder.receive(one_frame(initiator.start(NOW_MS)), NOW_MS).to_send)
    assert retry.kind is Kind.RETRY and signed == []
    exchange = run_handshake(initiator, responder, start=[("R", encode_frame(retry.kind, retry.body))])
    assert exchange.completed
    assert admit.asked == [False, True], "the retried HELLO is judged as proven (it carried a valid cookie)"


def test_admission_saying_busy_refuses_with_a_busy_alert_and_no_signature(alice: Identity, bob: Identity,
                                                                           monkeypatch) -> None:
    signed: list[str] = []
    real_sign = Identity.sign
    monkeypatch.setattr(Identity, "sign", lambda self, *a: signed.append(self.name) or real_sign(self, *a))
    a = Session(InitiatorHandshake(alice, accept_as("bob")), now_ms=NOW_MS)
    b = Session(ResponderHandshake(bob, accept_as("alice"), peer_address=PEER_ADDRESS,
                                   admit=RecordingAdmission(Verdict.BUSY)), now_ms=NOW_MS)
    a.start(NOW_MS)
    with pytest.raises(HandshakeBusyError):
        b.receive_data(a.data_to_send(), NOW_MS)
    assert signed == []
    alert = b.data_to_send()
    assert one_frame(alert).body[0] == AlertCode.BUSY
    with pytest.raises(HandshakeRefusedError, match="busy"):
        a.receive_data(alert, NOW_MS)


def test_a_proven_hello_that_admission_still_answers_with_cookie_is_refused_as_busy(alice: Identity,
                                                                                    bob: Identity) -> None:
    """A cookie is never asked for twice: a second RETRY would only cost another round trip."""
    initiator, responder = pair(alice, bob, admit=RecordingAdmission(Verdict.COOKIE, Verdict.COOKIE))
    exchange = run_handshake(initiator, responder)
    assert exchange.kinds() == [Kind.HELLO, Kind.RETRY, Kind.HELLO]
    assert_refused(exchange, by="R", error=HandshakeBusyError)


def test_a_suite_retry_does_not_consult_admission_until_the_retried_hello(alice: Identity, bob: Identity) -> None:
    admit = RecordingAdmission(Verdict.ADMIT)
    exchange = run_handshake(*pair(alice, bob, initiator_config=config_for(HYBRID, PQ_STRONG),
                                   responder_config=config_for(PQ_STRONG), admit=admit))
    assert exchange.completed and admit.asked == [True]


# --- arbitrary input -------------------------------------------------------------------------------------

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=40) | st.text(max_size=8)
    | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
small_ints = st.lists(st.integers(-1, 5), min_size=0, max_size=4)
hello_payloads = st.fixed_dictionaries({}, optional={
    "v": st.one_of(st.just([1]), small_ints, msgpack_values),
    "suites": st.one_of(st.just([1, 2, 3]), small_ints, msgpack_values),
    "aeads": st.one_of(st.just([1, 2]), small_ints, msgpack_values),
    "ts": st.one_of(st.integers(NOW_MS - 2 * WINDOW_MS, NOW_MS + 2 * WINDOW_MS), msgpack_values),
    "retry": st.one_of(st.fixed_dictionaries({"cookie": st.binary(max_size=30), "first": st.binary(max_size=40)}),
                       msgpack_values),
}) | st.dictionaries(st.text(max_size=6), msgpack_values, max_size=6)


def _mutate(base: bytes, position: int, replacement: bytes, cut: int | None) -> bytes:
    position %= len(base) + 1
    mutated = base[:position] + replacement + base[position + len(replacement):]
    return mutated[:cut] if cut is not None else mutated


mutation = st.tuples(st.integers(0, 20_000), st.binary(min_size=1, max_size=8), st.none() | st.integers(0, 20_000))


@FUZZ
@given(data=st.data())
def test_arbitrary_hello_bodies_are_answered_or_refused_with_a_handshake_error(data, alice: Identity, bob: Identity,
                                                                              memo_backend) -> None:
    """Random bytes, a random header and tail, a valid classical prefix with an arbitrary
    payload map, or a mutated genuine HELLO: the responder either answers (RESPONSE/RETRY)
    or raises a HandshakeError, nothing else."""
    genuine = one_frame(InitiatorHandshake(alice, accept_as("bob"), entropy=FixedEntropy(0x41),
                                           backend=memo_backend).start(NOW_MS)).body
    body = data.draw(st.one_of(
        st.binary(max_size=2_000),
        st.builds(lambda version, suite, rest: bytes([version, suite]) + rest,
                  st.sampled_from([0, 1, 2, 255]), st.integers(0, 255), st.binary(max_size=1_700)),
        st.builds(lambda e, payload: bytes([1, CLASSICAL.wire_id]) + e + encode_payload(payload),
                  st.binary(min_size=32, max_size=32), hello_payloads),
        st.builds(lambda m: _mutate(genuine, *m), mutation),
    ))
    responder = ResponderHandshake(bob, accept_as("alice"), peer_address=PEER_ADDRESS,
                                   config=config_for(*ALL_SUITES), backend=memo_backend)
    try:
        step = responder.receive(Frame(Kind.HELLO, body), NOW_MS)
    except HandshakeError:
        return
    assert one_frame(step.to_send).kind in (Kind.RESPONSE, Kind.RETRY)


@FUZZ
@pytest.mark.parametrize("suite", [CLASSICAL, HYBRID], ids=lambda s: s.name)
@given(data=st.data())
def test_arbitrary_response_bodies_are_refused_with_a_handshake_error(suite: Suite, data, alice: Identity, bob: Identity,
                                                                      memo_backend) -> None:
    config = config_for(suite)
    genuine = run_handshake(*deterministic_pair(alice, bob, memo_backend, initiator_config=config,
                                                responder_config=config)).body(Kind.RESPONSE)
    body = data.draw(st.one_of(st.binary(max_size=10_000), st.builds(lambda m: _mutate(genuine, *m), mutation)))
    assume(body != genuine)
    initiator = InitiatorHandshake(alice, accept_as("bob"), config=config, backend=memo_backend, entropy=FixedEntropy(0x41))
    initiator.start(NOW_MS)
    with pytest.raises(HandshakeError):
        initiator.receive(Frame(Kind.RESPONSE, body), NOW_MS)


@FUZZ
@pytest.mark.parametrize("suite", [CLASSICAL, HYBRID], ids=lambda s: s.name)
@given(data=st.data())
def test_arbitrary_finish_bodies_are_refused_with_a_handshake_error(suite: Suite, data, alice: Identity, bob: Identity,
                                                                    memo_backend) -> None:
    config = config_for(suite)
    genuine = run_handshake(*deterministic_pair(alice, bob, memo_backend, initiator_config=config,
                                                responder_config=config)).body(Kind.FINISH)
    body = data.draw(st.one_of(st.binary(max_size=8_000), st.builds(lambda m: _mutate(genuine, *m), mutation)))
    assume(body != genuine)
    initiator, responder = deterministic_pair(alice, bob, memo_backend, initiator_config=config, responder_config=config)
    responder.receive(one_frame(initiator.start(NOW_MS)), NOW_MS)
    with pytest.raises(HandshakeError):
        responder.receive(Frame(Kind.FINISH, body), NOW_MS)


@FUZZ
@given(body=st.one_of(st.binary(max_size=200),
                      st.builds(encode_payload, st.fixed_dictionaries({}, optional={
                          "suite": st.one_of(st.integers(-1, 5), msgpack_values),
                          "cookie": st.one_of(st.binary(max_size=80), msgpack_values)}))))
def test_arbitrary_retry_bodies_restart_or_are_refused_with_a_handshake_error(body: bytes, alice: Identity) -> None:
    initiator = InitiatorHandshake(alice, accept_as("bob"), entropy=FixedEntropy(0x41))
    initiator.start(NOW_MS)
    try:
        step = initiator.receive(Frame(Kind.RETRY, body), NOW_MS)
    except HandshakeError:
        return
    assert one_frame(step.to_send).kind is Kind.HELLO
