"""A network CA, like Nebula's but hybrid-signed (Ed25519 + ML-DSA-65).

The CA signs a certificate binding a name, groups and a validity period to a node's
identity fingerprint (which commits to all of the node's signing keys). Nodes configured
with the CA's public key accept peers that present a valid certificate, reach them by the
certificate's name, and refuse expired or revoked certificates. The handshake carries the
certificate (docs/PROTOCOL.md, "Certificates").

Sans-IO: this module encodes, issues and verifies certificates. Where the CA keeps its key
and revocation list, and how a node reads its CA files, is a ``CaStore``
(``pqtunnel.stores``); the daemon's file store is ``pqtunneld.stores``.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .crypto import backend as prim
from .crypto.suites import HYBRID
from .entropy import SYSTEM_ENTROPY, Entropy
from .errors import CaError, CertificateError
from .identity import MLDSA_CONTEXT, Identity, PublicIdentity, normalise_fingerprint
from .names import validate_name

CERT_LABEL = b"pqtunnel/1 certificate\x00"
ARMOR_BEGIN = "-----BEGIN PQTUNNEL CERTIFICATE-----"
ARMOR_END = "-----END PQTUNNEL CERTIFICATE-----"
MAX_CERTIFICATE = 8 * 1024
MAX_GROUPS = 32
SERIAL_BYTES = 16

RevokedSerials = Callable[[], Collection[str]]
"""The current revocation list; may raise CertificateError when it cannot be known (fail closed)."""


@dataclass(frozen=True)
class Certificate:
    """What the CA vouches for. ``signature`` covers the msgpack ``body`` bytes exactly."""

    name: str
    groups: tuple[str, ...]
    fingerprint: str
    not_before: int
    not_after: int
    serial: str
    issuer: str
    body: bytes = field(repr=False)
    signature: dict[str, bytes] = field(repr=False, compare=False)

    def encode(self) -> bytes:
        return msgpack.packb({"body": self.body, "sig": self.signature}, use_bin_type=True)

    def armor(self) -> str:
        text = base64.b64encode(self.encode()).decode()
        lines = [text[i : i + 64] for i in range(0, len(text), 64)]
        return "\n".join([ARMOR_BEGIN, *lines, ARMOR_END]) + "\n"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "groups": list(self.groups), "fingerprint": self.fingerprint,
                "not_before": self.not_before, "not_after": self.not_after, "serial": self.serial,
                "issuer": self.issuer}


def _body(name: str, groups: tuple[str, ...], fingerprint: str, not_before: int, not_after: int,
          serial: str, issuer: str) -> bytes:
    return msgpack.packb({"v": 1, "name": name, "groups": list(groups), "fp": fingerprint, "nb": not_before,
                          "na": not_after, "serial": serial, "issuer": issuer}, use_bin_type=True)


def decode_certificate(data: bytes) -> Certificate:
    """Parse (not verify) a certificate; any malformation is a CertificateError."""
    if not isinstance(data, bytes) or len(data) > MAX_CERTIFICATE:
        raise CertificateError("certificate is missing or too large")
    try:
        outer = msgpack.unpackb(data, raw=False, strict_map_key=True)
        body = outer["body"]
        inner = msgpack.unpackb(body, raw=False, strict_map_key=True)
        groups = tuple(inner["groups"])
        cert = Certificate(name=inner["name"], groups=groups, fingerprint=inner["fp"], not_before=inner["nb"],
                           not_after=inner["na"], serial=inner["serial"], issuer=inner["issuer"], body=body,
                           signature=outer["sig"])
    except Exception as exc:  # msgpack and shape errors come in many types
        raise CertificateError(f"certificate is malformed ({type(exc).__name__})") from None
    _check_shape(cert, inner)
    return cert


def _check_shape(cert: Certificate, inner: dict[str, Any]) -> None:
    if inner.get("v") != 1:
        raise CertificateError("certificate has an unknown version")
    if not isinstance(cert.name, str) or not all(isinstance(g, str) for g in cert.groups) or len(cert.groups) > MAX_GROUPS:
        raise CertificateError("certificate name or groups are malformed")
    if not all(isinstance(v, int) for v in (cert.not_before, cert.not_after)):
        raise CertificateError("certificate validity is malformed")
    if not all(isinstance(v, str) for v in (cert.fingerprint, cert.serial, cert.issuer)):
        raise CertificateError("certificate identifiers are malformed")
    if not isinstance(cert.signature, dict) or not all(isinstance(v, bytes) for v in cert.signature.values()):
        raise CertificateError("certificate signature is malformed")


def dearmor(text: str) -> bytes:
    """The certificate bytes inside an armored text (the inverse of ``Certificate.armor``)."""
    body = "".join(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("-----"))
    try:
        return base64.b64decode(body, validate=True)
    except ValueError:
        raise CertificateError("not a pqtunnel certificate (bad base64)") from None


def normalise_serial(text: str) -> str:
    """A serial as the CA writes it (32 lower-case hex digits); CaError otherwise."""
    serial = text.strip().lower()
    if len(serial) != 2 * SERIAL_BYTES or any(c not in "0123456789abcdef" for c in serial):
        raise CaError(f"not a certificate serial: {serial!r} (32 hex digits)")
    return serial


# --- issuing ---------------------------------------------------------------------------------------


class CertificateAuthority:
    """The CA's signing half: its identity issues certificates; storing them is the caller's job."""

    def __init__(self, identity: Identity, backend: prim.CryptographyBackend,
                 entropy: Entropy = SYSTEM_ENTROPY) -> None:
        self.identity = identity
        self.backend = backend
        self.entropy = entropy

    def sign(self, name: str, fingerprint: str, *, groups: tuple[str, ...] = (), not_before: int,
             not_after: int) -> Certificate:
        name = validate_name(name, "certificate name")
        groups = tuple(validate_name(g, "group name") for g in groups)
        fingerprint = normalise_fingerprint(fingerprint)
        if not_after <= not_before:
            raise CaError("certificate validity must end after it starts")
        serial = self.entropy.random_bytes(SERIAL_BYTES).hex()
        issuer = self.identity.fingerprint
        body = _body(name, groups, fingerprint, not_before, not_after, serial, issuer)
        signature = self.identity.sign(self.backend, HYBRID, CERT_LABEL + body)
        return Certificate(name, groups, fingerprint, not_before, not_after, serial, issuer, body, signature)


# --- verifying -------------------------------------------------------------------------------------


def no_revocations() -> frozenset[str]:
    return frozenset()


class CaVerifier:
    """Checks peer certificates against one CA public key and its revocation list.

    ``revoked`` is asked on every verification, so a list edited while the daemon runs is
    honoured; when it raises CertificateError (the list vanished) every certificate fails.
    """

    def __init__(self, ca: PublicIdentity, backend: prim.CryptographyBackend,
                 revoked: RevokedSerials = no_revocations) -> None:
        self.ca = ca
        self.backend = backend
        self.revoked = revoked

    def verify(self, data: bytes | None, presented_fingerprint: str, now: int) -> Certificate:
        """Return the certificate if the CA vouches for this exact identity now."""
        if data is None:
            raise CertificateError(f"peer {presented_fingerprint} presented no certificate")
        cert = decode_certificate(data)
        if cert.issuer != self.ca.fingerprint:
            raise CertificateError(f"certificate for {cert.name} was issued by {cert.issuer}, not our CA")
        signature_ok = _verify_hybrid(self.backend, self.ca, CERT_LABEL + cert.body, cert.signature)
        if not signature_ok:
            raise CertificateError(f"certificate for {cert.name} has an invalid CA signature")
        if cert.fingerprint != presented_fingerprint:
            raise CertificateError(f"certificate for {cert.name} belongs to {cert.fingerprint}, not {presented_fingerprint}")
        if now < cert.not_before:
            raise CertificateError(f"certificate for {cert.name} is not valid yet")
        if now >= cert.not_after:
            raise CertificateError(f"certificate for {cert.name} expired")
        if cert.serial in self.revoked():
            raise CertificateError(f"certificate for {cert.name} (serial {cert.serial}) is revoked")
        try:
            canonical = validate_name(cert.name) == cert.name and all(validate_name(g) == g for g in cert.groups)
        except Exception:
            canonical = False
        if not canonical:  # "BOB" or " bob" must not slip past a pin on "bob"
            raise CertificateError("certificate name or groups are not canonical node names")
        return cert


def _verify_hybrid(backend: prim.CryptographyBackend, ca: PublicIdentity, message: bytes,
                   signature: dict[str, bytes]) -> bool:
    """Both halves must verify: Ed25519 and the CA's ML-DSA-65."""
    if not prim.ed25519_verify(ca.ed25519, signature.get("ed", b""), message):
        return False
    return backend.mldsa_verify("ML-DSA-65", ca.pq_keys["ML-DSA-65"], signature.get("pq", b""), message,
                                MLDSA_CONTEXT)

