"""X.509 legacy anchors: a peer whose transition record is signed by the key of a certificate
that chains to a CA we trust (``pqtunnel trust --x509-ca``) and names it is accepted
(``migrated:x509``). The chain is built and checked by ``cryptography``'s X.509 verification
(validity, CA constraints, signatures), not by hand; the name check is ours: a SAN DNS name,
or the CN when the certificate has no SAN. This lives in the application because building
the verifier needs wall-clock datetimes."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store, VerificationError

from pqtunnel.crypto.backend import CryptographyBackend
from pqtunnel.errors import MigrationError, TransitionError
from pqtunnel.transition import TransitionRecord, spki_of, verify_transition


def read_pem_certificates(path: Path, what: str = "certificate") -> list[x509.Certificate]:
    """Every PEM certificate in ``path``; one-line errors naming the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MigrationError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise MigrationError(f"{path}: not a PEM certificate ({exc})") from None
    return certificates


def read_pem_private_key(path: Path, passphrase_file: Path | None = None):
    try:
        data = path.read_bytes()
        passphrase = passphrase_file.read_bytes().rstrip(b"\r\n") if passphrase_file else None
    except OSError as exc:
        raise MigrationError(f"cannot read {exc.filename}: {exc.strerror or exc}") from None
    try:
        return load_pem_private_key(data, passphrase)
    except TypeError:
        raise MigrationError(f"{path}: the key is encrypted: give its passphrase with --passphrase-file") from None
    except ValueError as exc:
        raise MigrationError(f"{path}: not a usable PEM private key ({exc})") from None
    except Exception as exc:  # UnsupportedAlgorithm
        raise MigrationError(f"{path}: unsupported private key ({type(exc).__name__})") from None


def certificate_names(certificate: x509.Certificate) -> list[str]:
    """The DNS names of the SAN, or the CN when there is no SAN (lower-case)."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [str(a.value).lower() for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return [name.lower() for name in san.get_values_for_type(x509.DNSName)]


def _signs_digitally(certificate: x509.Certificate) -> bool:
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return usage.digital_signature


class X509Verifier:
    """Checks ``x509`` transition records against trusted CA certificates (and the deadline)."""

    def __init__(self, cas: list[x509.Certificate], accept_until: int | None = None,
                 backend: CryptographyBackend | None = None) -> None:
        self.cas = cas
        self.accept_until = accept_until
        self.backend = backend or CryptographyBackend()

    def verify(self, data: bytes | None, presented_fingerprint: str, now: int) -> TransitionRecord:
        if data is None:
            raise TransitionError(f"peer {presented_fingerprint} presented no transition record")
        if self.accept_until is not None and now >= self.accept_until:
            raise TransitionError("the migration window closed (migration.accept_until): only hybrid trust counts")
        record = verify_transition(data, presented_fingerprint, now, self.backend)
        if not record.chain:
            raise TransitionError(f"transition record for {record.name} carries no certificate")
        try:
            leaf, *intermediates = [x509.load_der_x509_certificate(der) for der in record.chain]
        except ValueError:
            raise TransitionError(f"transition record for {record.name} carries a malformed certificate") from None
        if spki_of(leaf.public_key()) != record.classical_key:  # type: ignore[arg-type]
            raise TransitionError(f"transition record for {record.name} is not signed by its certificate's key")
        self._verify_chain(record.name, leaf, intermediates, now)
        names = certificate_names(leaf)
        if record.name not in names:
            raise TransitionError(f"certificate names {', '.join(names) or 'nobody'}, not {record.name}")
        if not _signs_digitally(leaf):
            raise TransitionError(f"certificate for {record.name} may not sign (key usage)")
        return record

    def _verify_chain(self, name: str, leaf: x509.Certificate, intermediates: list[x509.Certificate], now: int) -> None:
        verifier = (PolicyBuilder().store(Store(self.cas)).time(datetime.fromtimestamp(now, timezone.utc))
                    .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                                        ee_policy=ExtensionPolicy.permit_all())
                    .build_client_verifier())
        try:
            verifier.verify(leaf, intermediates)
        except VerificationError as exc:
            raise TransitionError(f"certificate for {name} does not verify against our X.509 CA: {exc}") from None
