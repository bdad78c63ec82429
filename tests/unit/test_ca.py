"""Network CA: certificates bind a name to an identity; expired, revoked, forged ones fail.

Everything here runs without files (pqtunnel/ca.py is sans-IO); the CA directory, the
certificate files and the revocation list file are specified in tests/unit/test_stores.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pqtunneld.trustpolicy import authorize_peer
from pqtunnel.ca import CaVerifier, CertificateAuthority, dearmor, decode_certificate, normalise_serial
from pqtunnel.crypto import CryptographyBackend
from pqtunnel.crypto.suites import HYBRID
from pqtunnel.entropy import Entropy
from pqtunnel.errors import CaError, CertificateError, UntrustedPeerError
from pqtunnel.identity import Identity, WireIdentity
from pqtunnel.trust import TrustStore

NOW = 1_800_000_000
BACKEND = CryptographyBackend()


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority(Identity.generate("corp"), BACKEND)


@pytest.fixture(scope="module")
def other_ca() -> CertificateAuthority:
    return CertificateAuthority(Identity.generate("rogue"), BACKEND)


@pytest.fixture(scope="module")
def node() -> Identity:
    return Identity.generate("bob")


def verifier(ca: CertificateAuthority) -> CaVerifier:
    return CaVerifier(ca.identity.public, BACKEND)


def wire(identity: Identity, certificate: bytes | None) -> WireIdentity:
    wire_identity = WireIdentity.from_wire(identity.public.to_wire(HYBRID), HYBRID)
    return WireIdentity(wire_identity.claimed_name, wire_identity.ed25519, wire_identity.pq_key_hashes,
                        wire_identity.pq_key, certificate)


def sign(ca: CertificateAuthority, node: Identity, name: str = "bob", start: int = NOW - 10, end: int = NOW + 3600) -> bytes:
    return ca.sign(name, node.fingerprint, groups=("web",), not_before=start, not_after=end).encode()


def test_a_valid_certificate_proves_its_name(ca: CertificateAuthority, node: Identity) -> None:
    cert = verifier(ca).verify(sign(ca, node), node.fingerprint, NOW)
    assert cert.name == "bob" and cert.groups == ("web",) and cert.issuer == ca.identity.fingerprint


@pytest.mark.parametrize("start, end, message", [
    (NOW - 7200, NOW - 1, "expired"),
    (NOW + 60, NOW + 7200, "not valid yet"),
])
def test_certificates_outside_their_validity_are_refused(ca: CertificateAuthority, node: Identity, start: int, end: int,
                                                        message: str) -> None:
    with pytest.raises(CertificateError, match=message):
        verifier(ca).verify(sign(ca, node, start=start, end=end), node.fingerprint, NOW)


def test_a_revoked_certificate_is_refused_even_while_running(ca: CertificateAuthority, node: Identity) -> None:
    """The verifier asks for the revocation list on every certificate, so later revocations count."""
    cert = ca.sign("bob", node.fingerprint, not_before=NOW - 10, not_after=NOW + 3600)
    revoked: set[str] = set()
    checker = CaVerifier(ca.identity.public, BACKEND, lambda: revoked)
    assert checker.verify(cert.encode(), node.fingerprint, NOW).serial == cert.serial
    revoked.add(cert.serial)
    with pytest.raises(CertificateError, match="revoked"):
        checker.verify(cert.encode(), node.fingerprint, NOW)


def test_an_unknown_revocation_list_fails_closed(ca: CertificateAuthority, node: Identity) -> None:
    def vanished() -> frozenset[str]:
        raise CertificateError("revocation list is missing: refusing CA certificates")

    checker = CaVerifier(ca.identity.public, BACKEND, vanished)
    with pytest.raises(CertificateError, match="refusing CA certificates"):
        checker.verify(sign(ca, node), node.fingerprint, NOW)


def test_the_verifier_checks_signatures_with_the_configured_backend(ca: CertificateAuthority, node: Identity) -> None:
    class RefusingBackend(CryptographyBackend):
        asked = 0

        def mldsa_verify(self, *args: object) -> bool:
            RefusingBackend.asked += 1
            return False

    with pytest.raises(CertificateError, match="invalid CA signature"):
        CaVerifier(ca.identity.public, RefusingBackend()).verify(sign(ca, node), node.fingerprint, NOW)
    assert RefusingBackend.asked == 1


def test_serials_come_from_the_injected_entropy(node: Identity) -> None:
    class Fixed(Entropy):
        def random_bytes(self, size: int) -> bytes:
            return b"\xab" * size

    authority = CertificateAuthority(Identity.generate("corp"), BACKEND, Fixed())
    cert = authority.sign("bob", node.fingerprint, not_before=NOW, not_after=NOW + 60)
    assert cert.serial == "ab" * 16 == normalise_serial(" " + "AB" * 16)
    with pytest.raises(CaError, match="not a certificate serial"):
        normalise_serial("ab" * 15)


def test_a_certificate_for_another_identity_is_refused(ca: CertificateAuthority, node: Identity) -> None:
    impostor = Identity.generate("bob")
    with pytest.raises(CertificateError, match="belongs to"):
        verifier(ca).verify(sign(ca, node), impostor.fingerprint, NOW)


def test_a_certificate_from_another_ca_is_refused(ca: CertificateAuthority, other_ca: CertificateAuthority,
                                                  node: Identity) -> None:
    with pytest.raises(CertificateError, match="not our CA"):
        verifier(ca).verify(sign(other_ca, node), node.fingerprint, NOW)


def test_a_forged_issuer_field_does_not_help(ca: CertificateAuthority, other_ca: CertificateAuthority, node: Identity) -> None:
    """A rogue CA that writes our CA's fingerprint as issuer still fails the signature check."""
    rogue = other_ca.sign("bob", node.fingerprint, not_before=NOW - 10, not_after=NOW + 3600)
    body = rogue.body.replace(other_ca.identity.fingerprint.encode(), ca.identity.fingerprint.encode())
    forged = type(rogue)(rogue.name, rogue.groups, rogue.fingerprint, rogue.not_before, rogue.not_after, rogue.serial,
                         ca.identity.fingerprint, body, rogue.signature).encode()
    with pytest.raises(CertificateError, match="invalid CA signature"):
        verifier(ca).verify(forged, node.fingerprint, NOW)


def test_every_flipped_byte_of_a_certificate_is_refused(ca: CertificateAuthority, node: Identity) -> None:
    data = sign(ca, node)
    checker = verifier(ca)
    for index in range(0, len(data), 7):
        tampered = bytearray(data)
        tampered[index] ^= 0x01
        with pytest.raises(CertificateError):
            checker.verify(bytes(tampered), node.fingerprint, NOW)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_garbage_is_only_ever_a_certificate_error(data: bytes) -> None:
    with pytest.raises(CertificateError):
        decode_certificate(data)


def test_armor_round_trips_and_bad_armor_is_a_certificate_error(ca: CertificateAuthority, node: Identity) -> None:
    cert = ca.sign("bob", node.fingerprint, not_before=NOW, not_after=NOW + 60)
    assert decode_certificate(dearmor(cert.armor())) == cert
    with pytest.raises(CertificateError, match="not a pqtunnel certificate"):
        dearmor("-----BEGIN PQTUNNEL CERTIFICATE-----\nnot base64!\n")


# --- the daemon's trust policy ---------------------------------------------------------------


def test_pins_win_over_certificates(ca: CertificateAuthority, node: Identity) -> None:
    """A certificate can never claim a name that is pinned to another key."""
    pinned_bob = Identity.generate("bob")
    trust = TrustStore({"bob": pinned_bob.fingerprint})
    with pytest.raises(CertificateError, match="pinned to another key"):
        authorize_peer(trust, verifier(ca), wire(node, sign(ca, node)), None, NOW)
    with pytest.raises(UntrustedPeerError):
        authorize_peer(trust, verifier(ca), wire(node, sign(ca, node)), "bob", NOW)
    assert authorize_peer(trust, verifier(ca), wire(pinned_bob, None), "bob", NOW) == "bob"


def test_a_dialled_name_must_match_the_certificate(ca: CertificateAuthority, node: Identity) -> None:
    trust = TrustStore()
    assert authorize_peer(trust, verifier(ca), wire(node, sign(ca, node)), "bob", NOW) == "bob"
    with pytest.raises(CertificateError, match="is for bob, not carol"):
        authorize_peer(trust, verifier(ca), wire(node, sign(ca, node)), "carol", NOW)


def test_without_pin_or_certificate_a_peer_is_untrusted(ca: CertificateAuthority, node: Identity) -> None:
    with pytest.raises(UntrustedPeerError, match="not pinned"):
        authorize_peer(TrustStore(), None, wire(node, None), None, NOW)
    with pytest.raises(CertificateError, match="no certificate"):
        authorize_peer(TrustStore(), verifier(ca), wire(node, None), None, NOW)
