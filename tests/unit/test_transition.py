"""Transition records and legacy anchors: classical trust handed over to a hybrid identity.

A record binds a classical key to a node name and hybrid fingerprint, signed by both; a
known_hosts anchor decides whether the classical key is trusted for the name; the policy
accepts such a peer only where no pin says otherwise. Pure: keys are made in memory here;
the files and real ``ssh-keygen`` keys are in tests/e2e/test_migration.py.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

import msgpack
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa

from pqtunnel.crypto import CryptographyBackend
from pqtunnel.crypto.suites import CLASSICAL, HYBRID, PQ_STRONG
from pqtunnel.errors import MalformedHandshakeError, MigrationError, TransitionError
from pqtunnel.handshake import HandshakeConfig, InitiatorHandshake, ResponderHandshake
from pqtunnel.identity import Identity
from pqtunnel.knownhosts import LegacyAnchors, LegacyVerifier, parse_known_hosts
from pqtunnel.policy import MIGRATED_SSH, RULE_MIGRATED_SSH, PeerRequest, Policy
from pqtunnel.transition import MAX_TRANSITION, make_transition, verify_transition
from tests.conftest import NOW_MS, PEER_ADDRESS, run_handshake

pytestmark = pytest.mark.unit

NOW = 1_800_000_000
YEAR = 365 * 86400
BACKEND = CryptographyBackend()


@pytest.fixture(scope="module")
def bob() -> Identity:
    return Identity.generate("bob")


@pytest.fixture(scope="module")
def bob_host_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def ssh_line(host: str, key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return f"{host} {public.decode()}"


def hashed(host: str, salt: bytes = b"0123456789abcdefghij") -> str:
    digest = hmac.new(salt, host.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"


def record_of(identity: Identity, key, **kw) -> bytes:
    return make_transition(identity, key, BACKEND, kind="ssh", not_before=kw.pop("nb", NOW - 10),
                           not_after=kw.pop("na", NOW + YEAR), **kw).encode()


# --- records -------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_key", [
    ed25519.Ed25519PrivateKey.generate,
    lambda: ec.generate_private_key(ec.SECP256R1()),
    lambda: ec.generate_private_key(ec.SECP384R1()),
    lambda: rsa.generate_private_key(65537, 3072),
], ids=["ed25519", "p256", "p384", "rsa3072"])
def test_a_record_signed_by_both_keys_verifies_for_the_identity_that_made_it(bob: Identity, make_key) -> None:
    key = make_key()
    record = verify_transition(record_of(bob, key), bob.fingerprint, NOW, BACKEND)
    assert (record.name, record.fingerprint, record.kind) == ("bob", bob.fingerprint, "ssh")


def test_a_record_presented_by_another_identity_is_refused(bob: Identity, bob_host_key) -> None:
    mallory = Identity.generate("mallory")
    with pytest.raises(TransitionError, match="belongs to"):
        verify_transition(record_of(bob, bob_host_key), mallory.fingerprint, NOW, BACKEND)


def test_a_record_is_valid_only_between_its_times(bob: Identity, bob_host_key) -> None:
    data = record_of(bob, bob_host_key, nb=NOW, na=NOW + 100)
    with pytest.raises(TransitionError, match="not valid yet"):
        verify_transition(data, bob.fingerprint, NOW - 1, BACKEND)
    with pytest.raises(TransitionError, match="expired"):
        verify_transition(data, bob.fingerprint, NOW + 100, BACKEND)


def _tampered(data: bytes, **changes) -> bytes:
    outer = msgpack.unpackb(data, raw=False)
    body = msgpack.unpackb(outer["body"], raw=False)
    body.update(changes)
    outer["body"] = msgpack.packb(body, use_bin_type=True)
    return msgpack.packb(outer, use_bin_type=True)


def test_a_record_whose_body_was_changed_fails_its_signatures(bob: Identity, bob_host_key) -> None:
    data = _tampered(record_of(bob, bob_host_key), na=NOW + 10 * YEAR)
    with pytest.raises(TransitionError, match="invalid hybrid signature"):
        verify_transition(data, bob.fingerprint, NOW, BACKEND)


def test_a_record_claiming_another_classical_key_fails_the_classical_signature(bob: Identity, bob_host_key) -> None:
    other = ed25519.Ed25519PrivateKey.generate()
    honest = make_transition(bob, other, BACKEND, kind="ssh", not_before=NOW - 10, not_after=NOW + YEAR)
    outer = msgpack.unpackb(record_of(bob, bob_host_key), raw=False)
    outer["sig"]["classical"] = msgpack.unpackb(honest.encode(), raw=False)["sig"]["classical"]
    with pytest.raises(TransitionError, match="not signed by its classical key"):
        verify_transition(msgpack.packb(outer, use_bin_type=True), bob.fingerprint, NOW, BACKEND)


@pytest.mark.parametrize("data", [b"", b"\x81\xa4body\xc0", b"x" * 9000, None])
def test_malformed_records_are_refused_without_a_traceback_class_leaking(data) -> None:
    with pytest.raises(TransitionError):
        verify_transition(data, "pq1:" + "a" * 32, NOW, BACKEND)


@pytest.mark.parametrize("make_key, reason", [
    (lambda: rsa.generate_private_key(65537, 1024), "too weak"),
    (lambda: dsa.generate_private_key(2048), "not supported"),
    (lambda: ec.generate_private_key(ec.SECP521R1()), "not supported"),
], ids=["rsa1024", "dsa", "p521"])
def test_weak_or_unsupported_classical_keys_cannot_make_a_record(bob: Identity, make_key, reason: str) -> None:
    with pytest.raises(MigrationError, match=reason):
        record_of(bob, make_key())


# --- known_hosts anchors -------------------------------------------------------------------------


def test_plain_and_hashed_host_names_list_a_key_for_exactly_that_name(bob_host_key) -> None:
    anchors = parse_known_hosts(f"{ssh_line('bob,bob.example.net', bob_host_key)}\n"
                                f"{ssh_line(hashed('carol'), bob_host_key)}\n", "known_hosts")
    spki = verify_key(bob_host_key)
    assert anchors.vouches("bob", spki) and anchors.vouches("BOB", spki) and anchors.vouches("carol", spki)
    assert not anchors.vouches("bo", spki) and not anchors.vouches("dave", spki)


def test_wildcards_and_port_forms_never_vouch(bob_host_key) -> None:
    anchors = parse_known_hosts(f"{ssh_line('*,[bob]:2222,b?b', bob_host_key)}\n", "kh")
    assert not anchors.vouches("bob", verify_key(bob_host_key))


def test_a_revoked_key_vouches_for_nobody(bob_host_key) -> None:
    text = f"{ssh_line('bob', bob_host_key)}\n@revoked {ssh_line('*', bob_host_key)}\n"
    assert not parse_known_hosts(text, "kh").vouches("bob", verify_key(bob_host_key))


@pytest.mark.parametrize("line, reason", [
    ("@cert-authority *.example.net ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDx", "@cert-authority"),
    ("bob ssh-ed25519", "expected 'hostnames keytype base64-key'"),
    ("bob ssh-ed25519 not-base64!", "unreadable ssh-ed25519 key"),
    ("|1|abc bob ssh-ed25519 AAAA", "hashed host name|unreadable"),
    ("@marked bob ssh-ed25519 AAAA", "unknown marker"),
])
def test_a_malformed_known_hosts_line_is_refused_naming_file_and_line(line: str, reason: str) -> None:
    with pytest.raises(MigrationError, match=rf"^/etc/ssh/kh:3: .*({reason})"):
        parse_known_hosts(f"# comment\n\n{line}\n", "/etc/ssh/kh")


def test_short_rsa_host_keys_are_refused_in_known_hosts() -> None:
    weak = rsa.generate_private_key(65537, 1024)
    with pytest.raises(MigrationError, match=r"kh:1: RSA key of 1024 bits is too weak"):
        parse_known_hosts(ssh_line("bob", weak), "kh")


def verify_key(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


# --- the policy rule -----------------------------------------------------------------------------


def policy_with(anchors: LegacyAnchors, pins: dict[str, str] | None = None, accept_until: int | None = None) -> Policy:
    return Policy("alice", pins=pins or {}, verify_transition=LegacyVerifier(anchors, BACKEND, accept_until).verify)


def ask(policy: Policy, identity: Identity, record: bytes | None, dialled: str | None = None, now: int = NOW):
    return policy.decide(PeerRequest(fingerprint=identity.fingerprint, now=now, transition=record, dialled=dialled))


def test_a_peer_whose_record_known_hosts_vouches_for_is_admitted_as_migrated(bob: Identity, bob_host_key) -> None:
    policy = policy_with(parse_known_hosts(ssh_line("bob", bob_host_key), "kh"))
    for dialled in (None, "bob"):
        decision = ask(policy, bob, record_of(bob, bob_host_key), dialled)
        assert (decision.allowed, decision.rule, decision.name, decision.trust) == (True, RULE_MIGRATED_SSH, "bob",
                                                                                    MIGRATED_SSH)


def test_a_peer_presenting_another_hosts_key_is_refused(bob: Identity, bob_host_key) -> None:
    carol_key = ed25519.Ed25519PrivateKey.generate()
    policy = policy_with(parse_known_hosts(f"{ssh_line('bob', bob_host_key)}\n{ssh_line('carol', carol_key)}", "kh"))
    decision = ask(policy, bob, record_of(bob, carol_key))  # bob's record, signed with carol's host key
    assert not decision.allowed and "no known_hosts entry" in decision.reason


def test_a_record_for_another_name_than_the_one_dialled_is_refused(bob: Identity, bob_host_key) -> None:
    policy = policy_with(parse_known_hosts(ssh_line("bob", bob_host_key), "kh"))
    decision = ask(policy, bob, record_of(bob, bob_host_key), dialled="carol")
    assert not decision.allowed and decision.reason == "transition record is for bob, not carol"


def test_a_hybrid_pin_always_wins_over_a_legacy_anchor(bob: Identity, bob_host_key) -> None:
    policy = policy_with(parse_known_hosts(ssh_line("bob", bob_host_key), "kh"),
                         pins={"bob": Identity.generate("bob").fingerprint})
    for dialled in (None, "bob"):
        decision = ask(policy, bob, record_of(bob, bob_host_key), dialled)
        assert not decision.allowed and decision.rule in {"pin:bob", RULE_MIGRATED_SSH}


def test_after_accept_until_a_record_proves_nothing(bob: Identity, bob_host_key) -> None:
    policy = policy_with(parse_known_hosts(ssh_line("bob", bob_host_key), "kh"), accept_until=NOW)
    decision = ask(policy, bob, record_of(bob, bob_host_key, na=NOW + YEAR), now=NOW)
    assert not decision.allowed and "migration window closed" in decision.reason


def test_without_anchors_or_a_record_the_rule_has_no_opinion(bob: Identity, bob_host_key) -> None:
    assert ask(Policy("alice"), bob, record_of(bob, bob_host_key)).rule == "default-deny"
    assert ask(policy_with(LegacyAnchors()), bob, None).rule == "default-deny"


# --- in the handshake ----------------------------------------------------------------------------


@pytest.mark.parametrize("suite", [CLASSICAL, HYBRID, PQ_STRONG], ids=lambda s: s.name)
def test_records_travel_in_both_directions_of_a_handshake_and_admit_the_peer(suite, bob: Identity, bob_host_key) -> None:
    """Each side presents its record (RESPONSE, FINISH); the policy admits both as migrated."""
    alice, alice_key = Identity.generate("alice"), ed25519.Ed25519PrivateKey.generate()
    anchors = parse_known_hosts(f"{ssh_line('alice', alice_key)}\n{ssh_line('bob', bob_host_key)}", "kh")

    def authorize(node_name: str):
        policy = Policy(node_name, verify_transition=LegacyVerifier(anchors, BACKEND).verify)

        def decide(peer):
            decision = policy.decide(PeerRequest(fingerprint=peer.fingerprint, now=NOW_MS // 1000,
                                                 transition=peer.transition))
            assert decision.allowed, decision.reason
            return decision.name
        return decide

    config = HandshakeConfig(allowed_suites=(suite,))
    initiator = InitiatorHandshake(alice, authorize("alice"), config=config, backend=BACKEND,
                                   transition=record_of(alice, alice_key, nb=NOW_MS // 1000 - 5))
    responder = ResponderHandshake(bob, authorize("bob"), peer_address=PEER_ADDRESS, config=config, backend=BACKEND,
                                   transition=record_of(bob, bob_host_key, nb=NOW_MS // 1000 - 5))
    exchange = run_handshake(initiator, responder)
    assert exchange.error is None, exchange.error
    assert exchange.initiator_result.peer_name == "bob" and exchange.responder_result.peer_name == "alice"


def test_an_oversized_transition_field_is_a_malformed_handshake(bob: Identity) -> None:
    initiator = InitiatorHandshake(Identity.generate("alice"), lambda peer: "bob", backend=BACKEND)
    responder = ResponderHandshake(bob, lambda peer: "alice", peer_address=PEER_ADDRESS, backend=BACKEND,
                                   transition=b"x" * (MAX_TRANSITION + 1))
    exchange = run_handshake(initiator, responder)
    assert isinstance(exchange.error, MalformedHandshakeError) and "transition field" in str(exchange.error)
