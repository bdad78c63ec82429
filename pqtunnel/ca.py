"""A network CA, like Nebula's but hybrid-signed (Ed25519 + ML-DSA-65).

The CA signs a certificate binding a name, groups and a validity period to a node's
identity fingerprint (which commits to all of the node's signing keys). Nodes configured
with the CA's public key accept peers that present a valid certificate, reach them by the
certificate's name, and refuse expired or revoked certificates. The handshake carries the
certificate (docs/PROTOCOL.md, "Certificates").
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from .crypto import backend as prim
from .crypto.suites import HYBRID
from .errors import CaError, CertificateError, IdentityError
from .identity import MLDSA_CONTEXT, Identity, PublicIdentity, create_identity, load_identity, normalise_fingerprint
from .names import validate_name

CERT_LABEL = b"pqtunnel/1 certificate\x00"
ARMOR_BEGIN = "-----BEGIN PQTUNNEL CERTIFICATE-----"
ARMOR_END = "-----END PQTUNNEL CERTIFICATE-----"
MAX_CERTIFICATE = 8 * 1024
REVOKED_FILE = "revoked"
CA_PUBLIC_FILE = "identity.pub"
MAX_GROUPS = 32


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


def read_certificate_file(path: Path) -> Certificate:
    try:
        text = path.read_text()
    except OSError as exc:
        raise CaError(f"cannot read certificate {path}: {exc.strerror or exc}") from None
    body = "".join(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("-----"))
    try:
        raw = base64.b64decode(body, validate=True)
    except ValueError:
        raise CaError(f"{path} is not a pqtunnel certificate (bad base64)") from None
    try:
        return decode_certificate(raw)
    except CertificateError as exc:
        raise CaError(f"{path}: {exc}") from None


# --- the CA itself ---------------------------------------------------------------------------------


class CertificateAuthority:
    """A CA directory: an identity (its keys) plus the revocation list it publishes."""

    def __init__(self, directory: Path, identity: Identity) -> None:
        self.directory = directory
        self.identity = identity

    @classmethod
    def create(cls, directory: Path, name: str) -> CertificateAuthority:
        try:
            identity = create_identity(directory, name)
        except IdentityError as exc:
            raise CaError(str(exc).replace("an identity", "a CA")) from None
        (directory / REVOKED_FILE).touch(mode=0o644)
        return cls(directory, identity)

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        try:
            return cls(directory, load_identity(directory))
        except IdentityError as exc:
            raise CaError(f"not a usable CA directory: {exc}") from None

    def sign(self, name: str, fingerprint: str, *, groups: tuple[str, ...] = (), not_before: int,
             not_after: int) -> Certificate:
        name = validate_name(name, "certificate name")
        groups = tuple(validate_name(g, "group name") for g in groups)
        fingerprint = normalise_fingerprint(fingerprint)
        if not_after <= not_before:
            raise CaError("certificate validity must end after it starts")
        serial = secrets.token_hex(16)
        body = _body(name, groups, fingerprint, not_before, not_after, serial, self.identity.fingerprint)
        signature = self.identity.sign(prim.CryptographyBackend(), HYBRID, CERT_LABEL + body)
        return Certificate(name, groups, fingerprint, not_before, not_after, serial, self.identity.fingerprint,
                           body, signature)

    def revoke(self, serial: str) -> bool:
        """Add ``serial`` to the revocation list; False if it was already there."""
        serial = serial.strip().lower()
        if len(serial) != 32 or any(c not in "0123456789abcdef" for c in serial):
            raise CaError(f"not a certificate serial: {serial!r} (32 hex digits)")
        path = self.directory / REVOKED_FILE
        if serial in load_revocations(path):
            return False
        with path.open("a") as handle:
            handle.write(serial + "\n")
        return True


def load_revocations(path: Path | None) -> frozenset[str]:
    if path is None or not path.exists():
        return frozenset()
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise CaError(f"cannot read revocation list {path}: {exc.strerror or exc}") from None
    return frozenset(line.split("#", 1)[0].strip().lower() for line in lines if line.split("#", 1)[0].strip())


def load_ca_public(path: Path) -> PublicIdentity:
    """Read a CA's public key file and check its keys hash to the fingerprint it states."""
    try:
        data = json.loads(path.read_text())
        public = PublicIdentity(
            name=data["name"],
            ed25519=base64.b64decode(data["ed25519"]),
            pq_keys={"ML-DSA-65": base64.b64decode(data["ml_dsa_65"]), "ML-DSA-87": base64.b64decode(data["ml_dsa_87"])},
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CaError(f"cannot read CA public key {path}: {exc}") from None
    if public.fingerprint != data.get("fingerprint"):
        raise CaError(f"CA public key {path} does not match its stated fingerprint")
    return public


class CaVerifier:
    """Checks peer certificates against one CA public key and its revocation list."""

    def __init__(self, ca: PublicIdentity, revoked: frozenset[str] = frozenset(),
                 revocation_path: Path | None = None) -> None:
        self.ca = ca
        self.revoked = revoked
        self.revocation_path = revocation_path
        self._revocation_mtime = _mtime(revocation_path)
        if revocation_path is not None and self._revocation_mtime is None:
            raise CaError(f"revocation list {revocation_path} does not exist (create it empty if nothing is revoked)")

    def _refresh_revocations(self) -> None:
        """Pick up a revocation list edited while the daemon runs; fail closed if it vanishes."""
        if self.revocation_path is None:
            return
        stamp = _mtime(self.revocation_path)
        if stamp is None:
            raise CertificateError(f"revocation list {self.revocation_path} is missing: refusing CA certificates")
        if stamp != self._revocation_mtime:
            self.revoked = load_revocations(self.revocation_path)
            self._revocation_mtime = stamp

    def verify(self, data: bytes | None, presented_fingerprint: str, now: int) -> Certificate:
        """Return the certificate if the CA vouches for this exact identity now."""
        if data is None:
            raise CertificateError(f"peer {presented_fingerprint} presented no certificate")
        cert = decode_certificate(data)
        if cert.issuer != self.ca.fingerprint:
            raise CertificateError(f"certificate for {cert.name} was issued by {cert.issuer}, not our CA")
        signature_ok = _verify_hybrid(self.ca, CERT_LABEL + cert.body, cert.signature)
        if not signature_ok:
            raise CertificateError(f"certificate for {cert.name} has an invalid CA signature")
        if cert.fingerprint != presented_fingerprint:
            raise CertificateError(f"certificate for {cert.name} belongs to {cert.fingerprint}, not {presented_fingerprint}")
        if now < cert.not_before:
            raise CertificateError(f"certificate for {cert.name} is not valid yet")
        if now >= cert.not_after:
            raise CertificateError(f"certificate for {cert.name} expired")
        self._refresh_revocations()
        if cert.serial in self.revoked:
            raise CertificateError(f"certificate for {cert.name} (serial {cert.serial}) is revoked")
        try:
            canonical = validate_name(cert.name) == cert.name and all(validate_name(g) == g for g in cert.groups)
        except Exception:
            canonical = False
        if not canonical:  # "BOB" or " bob" must not slip past a pin on "bob"
            raise CertificateError("certificate name or groups are not canonical node names")
        return cert


def _verify_hybrid(ca: PublicIdentity, message: bytes, signature: dict[str, bytes]) -> bool:
    backend = prim.CryptographyBackend()
    if not prim.ed25519_verify(ca.ed25519, signature.get("ed", b""), message):
        return False
    return backend.mldsa_verify("ML-DSA-65", ca.pq_keys["ML-DSA-65"], signature.get("pq", b""), message,
                                MLDSA_CONTEXT)


def _mtime(path: Path | None) -> tuple[int, int, int] | None:
    """What identifies one version of a file: modification time, size and inode."""
    try:
        info = os.stat(path) if path is not None else None
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_size, info.st_ino) if info is not None else None
