"""X.509 anchors: a transition record signed by a certificate's key is accepted when the chain
verifies to a trusted CA (cryptography's X.509 verification) and the certificate names the peer.
Certificates are built in memory here; openssl-made ones and real daemons are in
tests/e2e/test_migration_x509.py."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from pqtunnel.crypto import CryptographyBackend
from pqtunnel.errors import TransitionError
from pqtunnel.identity import Identity
from pqtunnel.knownhosts import LegacyAnchors, LegacyVerifier
from pqtunnel.policy import PeerRequest, Policy
from pqtunnel.transition import make_transition
from pqtunneld.migration import LegacyTrust
from pqtunneld.x509trust import X509Verifier, certificate_names

pytestmark = pytest.mark.unit

NOW = int(dt.datetime(2026, 11, 30, tzinfo=dt.timezone.utc).timestamp())
BACKEND = CryptographyBackend()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(dt.datetime.fromtimestamp(NOW - 86400, dt.timezone.utc))
            .not_valid_after(dt.datetime.fromtimestamp(NOW + 86400 * 30, dt.timezone.utc))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def issue(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], cn: str, san: list[str] | None,
          days: int = 30) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca[0].subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(dt.datetime.fromtimestamp(NOW - 3600, dt.timezone.utc))
               .not_valid_after(dt.datetime.fromtimestamp(NOW + 86400 * days, dt.timezone.utc))
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca[1].public_key()), critical=False))
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in san]), critical=False)
    return builder.sign(ca[1], hashes.SHA256()), key


def record(identity: Identity, leaf: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> bytes:
    return make_transition(identity, leaf[1], BACKEND, kind="x509", not_before=NOW - 60, not_after=NOW + 86400,
                           chain=(leaf[0].public_bytes(Encoding.DER),)).encode()


@pytest.fixture(scope="module")
def corp():
    return make_ca("corp")


@pytest.fixture(scope="module")
def bob() -> Identity:
    return Identity.generate("bob")


def test_a_certificate_chaining_to_the_ca_and_naming_the_peer_vouches_for_its_record(corp, bob: Identity) -> None:
    verified = X509Verifier([corp[0]]).verify(record(bob, issue(corp, "bob", ["bob"])), bob.fingerprint, NOW)
    assert (verified.name, verified.kind) == ("bob", "x509")


def test_the_cn_names_the_peer_only_when_there_is_no_san(corp) -> None:
    assert certificate_names(issue(corp, "bob", None)[0]) == ["bob"]
    assert certificate_names(issue(corp, "bob", ["carol", "bob.example.net"])[0]) == ["carol", "bob.example.net"]


@pytest.mark.parametrize("case, reason", [
    ("foreign", "does not verify against our X.509 CA"),
    ("name", "certificate names carol, not bob"),
    ("expired", "does not verify against our X.509 CA"),
])
def test_foreign_misnamed_or_expired_certificates_are_refused(corp, bob: Identity, case: str, reason: str) -> None:
    leaf = {"foreign": lambda: issue(make_ca("rogue"), "bob", ["bob"]),
            "name": lambda: issue(corp, "bob", ["carol"]),
            "expired": lambda: issue(corp, "bob", ["bob"], days=1)}[case]()
    now = NOW + 2 * 86400 if case == "expired" else NOW
    data = make_transition(bob, leaf[1], BACKEND, kind="x509", not_before=NOW - 60, not_after=NOW + 10 * 86400,
                           chain=(leaf[0].public_bytes(Encoding.DER),)).encode()
    with pytest.raises(TransitionError, match=reason):
        X509Verifier([corp[0]]).verify(data, bob.fingerprint, now)


def test_a_record_signed_by_another_key_than_the_certificates_is_refused(corp, bob: Identity) -> None:
    cert, _ = issue(corp, "bob", ["bob"])
    data = make_transition(bob, ec.generate_private_key(ec.SECP256R1()), BACKEND, kind="x509", not_before=NOW - 60,
                           not_after=NOW + 86400, chain=(cert.public_bytes(Encoding.DER),)).encode()
    with pytest.raises(TransitionError, match="not signed by its certificate's key"):
        X509Verifier([corp[0]]).verify(data, bob.fingerprint, NOW)


def test_the_record_kind_picks_the_anchor_and_a_kind_without_anchors_gets_no_opinion(corp, bob: Identity) -> None:
    ssh_only = Policy("alice", verify_transition=LegacyTrust(LegacyVerifier(LegacyAnchors(), BACKEND), None).verify)
    x509_record = record(bob, issue(corp, "bob", ["bob"]))
    request = PeerRequest(fingerprint=bob.fingerprint, now=NOW, transition=x509_record)
    assert ssh_only.decide(request).rule == "default-deny"
    both = Policy("alice", verify_transition=LegacyTrust(None, X509Verifier([corp[0]])).verify)
    decision = both.decide(request)
    assert (decision.allowed, decision.rule, decision.trust, decision.name) == (True, "migrated:x509", "migrated:x509",
                                                                               "bob")
    ssh_record = make_transition(bob, ed25519.Ed25519PrivateKey.generate(), BACKEND, kind="ssh",
                                 not_before=NOW - 60, not_after=NOW + 86400).encode()
    assert both.decide(PeerRequest(fingerprint=bob.fingerprint, now=NOW, transition=ssh_record)).rule == "default-deny"
