"""Migration from classical keys to hybrid identities: the files, the commands' work, the pin.

==========================  ==================================================================
HOME/transition.rec         this node's transition record (``pqtunnel migrate ssh``), presented
                            in every handshake
HOME/legacy_known_hosts     known_hosts lines imported by ``pqtunnel trust --ssh-known-hosts``
                            (the legacy anchors), verbatim, ``@revoked`` markers included
HOME/legacy_x509_ca.pem     CA certificates imported by ``pqtunnel trust --x509-ca`` (PEM)
HOME/migrated               ``NAME FINGERPRINT METHOD TIME`` per peer pinned through migration,
                            so ``pqtunnel peers`` can say how a pin came to be
==========================  ==================================================================

The trust argument is in docs/migration.md; the record format in docs/PROTOCOL.md 4.4b.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding, load_ssh_private_key

from pqtunnel import events
from pqtunnel.crypto.backend import CryptographyBackend
from pqtunnel.errors import ConfigError, MigrationError, TransitionError, UserError
from pqtunnel.identity import Identity
from pqtunnel.knownhosts import LegacyAnchors, LegacyVerifier, parse_known_hosts
from pqtunnel.policy import Decision
from pqtunnel.transition import TransitionRecord, decode_transition, make_transition, spki_of, transition_kind
from pqtunnel.trust import TrustStore

from .logs import LOG
from .stores import KnownPeersFile
from .x509trust import X509Verifier, certificate_names, read_pem_certificates, read_pem_private_key

RECORD_FILE = "transition.rec"
ANCHORS_FILE = "legacy_known_hosts"
X509_CA_FILE = "legacy_x509_ca.pem"
MIGRATED_FILE = "migrated"
DEFAULT_VALIDITY_DAYS = 730
MAX_KEY_FILE = 64 * 1024


# --- this node's record ----------------------------------------------------------------------------


def _read_small(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MigrationError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_FILE:
        raise MigrationError(f"{path}: too large for {what}")
    return data


def read_ssh_private_key(path: Path, passphrase_file: Path | None = None):
    """An OpenSSH private key, checked to be one a transition may rest on; errors name the file."""
    data = _read_small(path, "SSH private key")
    passphrase = _read_small(passphrase_file, "passphrase file").rstrip(b"\r\n") if passphrase_file else None
    try:
        with warnings.catch_warnings():  # DSA loads with a deprecation warning; it is refused below anyway
            warnings.simplefilter("ignore")
            key = load_ssh_private_key(data, passphrase)
    except TypeError:  # cryptography: encrypted without a passphrase, or a passphrase for a plain key
        if passphrase is None:
            raise MigrationError(f"{path}: the key is encrypted: give its passphrase with --passphrase-file") from None
        raise MigrationError(f"{path}: the key is not encrypted: leave out --passphrase-file") from None
    except ValueError as exc:
        reason = "wrong passphrase" if passphrase is not None and "ncrypt" not in str(exc) else str(exc)
        raise MigrationError(f"{path}: not a usable OpenSSH private key ({reason})") from None
    except Exception as exc:  # UnsupportedAlgorithm and friends
        raise MigrationError(f"{path}: unsupported OpenSSH private key ({type(exc).__name__}: {exc})") from None
    return key


def migrate_ssh(home: Path, identity: Identity, key_path: Path, passphrase_file: Path | None = None, *,
                days: int = DEFAULT_VALIDITY_DAYS, now: int | None = None) -> TransitionRecord:
    """Sign and write HOME/transition.rec binding this node to the host key in ``key_path``."""
    key = read_ssh_private_key(key_path, passphrase_file)
    start = int(time.time() if now is None else now) - 300  # clocks of peers may lag a little
    try:
        record = make_transition(identity, key, CryptographyBackend(), kind="ssh", not_before=start,
                                 not_after=start + days * 86400)
    except MigrationError as exc:
        raise MigrationError(f"{key_path}: {exc}") from None
    _write_record(home, record)
    return record


def _write_record(home: Path, record: TransitionRecord) -> None:
    path = home / RECORD_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(record.encode())
    os.replace(tmp, path)


def own_transition(home: Path, identity: Identity) -> bytes | None:
    """The record this node presents, refused at start if it is for another identity."""
    path = home / RECORD_FILE
    if not path.exists():
        return None
    data = _read_small(path, "transition record")
    try:
        record = decode_transition(data)
    except TransitionError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if record.fingerprint != identity.fingerprint:
        raise ConfigError(f"{path} is for {record.fingerprint}, not this node ({identity.fingerprint}): "
                          "run pqtunnel migrate ssh again")
    return data


# --- legacy anchors --------------------------------------------------------------------------------


def read_known_hosts(path: Path) -> tuple[str, LegacyAnchors]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MigrationError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise MigrationError(f"{path} is not UTF-8 text (byte {exc.start})") from None
    return text, parse_known_hosts(text, str(path))


def import_known_hosts(home: Path, path: Path) -> LegacyAnchors:
    """Check every line of ``path`` (one bad line refuses the whole file), then keep them."""
    text, anchors = read_known_hosts(path)
    if not anchors.anchors and not anchors.revoked:
        raise MigrationError(f"{path}: no host keys in it")
    fd = os.open(home / ANCHORS_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as handle:
        handle.write(f"# imported from {path}\n{text.rstrip()}\n")
    return anchors


def load_anchors(home: Path) -> LegacyAnchors:
    path = home / ANCHORS_FILE
    if not path.exists():
        return LegacyAnchors()
    try:
        return read_known_hosts(path)[1]
    except MigrationError as exc:
        raise ConfigError(str(exc)) from None


class LegacyTrust:
    """The Policy's transition check: the record's kind picks the verifier (known_hosts for
    ``ssh``, the X.509 CAs for ``x509``); None (no opinion) when that kind has no anchors."""

    def __init__(self, ssh: LegacyVerifier | None, x509: X509Verifier | None) -> None:
        self.ssh, self.x509 = ssh, x509

    def verify(self, data: bytes | None, presented_fingerprint: str, now: int) -> TransitionRecord | None:
        verifier = self.x509 if transition_kind(data) == "x509" else self.ssh
        return verifier.verify(data, presented_fingerprint, now) if verifier is not None else None


def legacy_verifier(home: Path, accept_until: int | None) -> LegacyTrust | None:
    """None while no anchors were imported (the rule stays silent)."""
    anchors = load_anchors(home)
    ssh = LegacyVerifier(anchors, CryptographyBackend(), accept_until) if anchors else None
    x509 = None
    if (home / X509_CA_FILE).exists():
        try:
            x509 = X509Verifier(read_pem_certificates(home / X509_CA_FILE, "X.509 CA"), accept_until)
        except MigrationError as exc:
            raise ConfigError(str(exc)) from None
    return LegacyTrust(ssh, x509) if ssh is not None or x509 is not None else None


def migrate_x509(home: Path, identity: Identity, cert_path: Path, key_path: Path, chain_path: Path | None = None,
                 passphrase_file: Path | None = None) -> TransitionRecord:
    """Sign HOME/transition.rec with a TLS certificate's key; valid as long as the certificate."""
    leaf, *_ = read_pem_certificates(cert_path) or [None]
    if leaf is None:
        raise MigrationError(f"{cert_path}: no certificate in it")
    key = read_pem_private_key(key_path, passphrase_file)
    if spki_of(key.public_key()) != spki_of(leaf.public_key()):  # type: ignore[union-attr, arg-type]
        raise MigrationError(f"{key_path} is not the key of the certificate in {cert_path}")
    now = time.time()
    if now >= leaf.not_valid_after_utc.timestamp():
        raise MigrationError(f"{cert_path}: the certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")
    if now < leaf.not_valid_before_utc.timestamp():
        raise MigrationError(f"{cert_path}: the certificate is not valid before "
                             f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC")
    names = certificate_names(leaf)
    if identity.name not in names:
        raise MigrationError(f"{cert_path} names {', '.join(names) or 'nobody'}, not this node ({identity.name})")
    chain = [leaf, *(read_pem_certificates(chain_path, "chain") if chain_path else [])]
    try:
        record = make_transition(identity, key, CryptographyBackend(), kind="x509",  # type: ignore[arg-type]
                                 not_before=int(leaf.not_valid_before_utc.timestamp()),
                                 not_after=int(leaf.not_valid_after_utc.timestamp()),
                                 chain=tuple(c.public_bytes(Encoding.DER) for c in chain))
    except MigrationError as exc:
        raise MigrationError(f"{key_path}: {exc}") from None
    _write_record(home, record)
    return record


def import_x509_ca(home: Path, path: Path) -> int:
    """Keep the CA certificates of ``path`` (PEM); returns how many."""
    certificates = read_pem_certificates(path, "X.509 CA")
    if not certificates:
        raise MigrationError(f"{path}: no certificate in it")
    fd = os.open(home / X509_CA_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab") as handle:
        handle.write(b"".join(c.public_bytes(Encoding.PEM) for c in certificates))
    return len(certificates)


def parse_deadline(value: object, source: str) -> int:
    """``[migration] accept_until``: a date (the whole day counts, UTC) or an ISO date-time."""
    if not isinstance(value, str):
        raise ConfigError(f"{source}: migration.accept_until must be a date like \"2027-06-30\"")
    try:
        if len(value) == 10:
            day = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=timezone.utc)
            return int(day.timestamp()) + 86400
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"{source}: migration.accept_until {value!r} is not a date like \"2027-06-30\"") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp())


# --- peers pinned through migration ----------------------------------------------------------------


def record_migration(home: Path, name: str, fingerprint: str, method: str) -> bool:
    """Pin ``name`` for good and note how; False when it was already pinned to this key."""
    added = KnownPeersFile(home).add(name, fingerprint)
    if added:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        fd = os.open(home / MIGRATED_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as handle:
            handle.write(f"{name} {fingerprint} {method} {stamp}\n")
    return added


def migrated_peers(home: Path) -> dict[str, tuple[str, str]]:
    """name -> (fingerprint, method) for pins that came from a migration (a damaged line is skipped)."""
    path = home / MIGRATED_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    table = {}
    for line in lines:
        words = line.split()
        if len(words) >= 3:
            table[words[0]] = (words[1], words[2])
    return table


def trust_label(home: Path, name: str, fingerprint: str | None) -> str:
    """``migrated:ssh`` for a pin a migration made, else ``pinned``."""
    entry = migrated_peers(home).get(name)
    return entry[1] if entry is not None and entry[0] == fingerprint else "pinned"


def pin_migrated(home: Path, trust: TrustStore, decision: Decision | None, name: str, fingerprint: str,
                 emit: Callable[[events.Event], None]) -> None:
    """A session admitted through a legacy anchor: pin its hybrid fingerprint for good (file and
    table), so the next handshake is decided by the pin and the classical key is no longer needed."""
    if decision is None or not decision.allowed or not (decision.trust or "").startswith("migrated:"):
        return
    method = decision.trust or ""
    try:
        added = record_migration(home, name, fingerprint, method)
        trust.pin(name, fingerprint)
    except UserError as exc:  # e.g. a pin written by hand meanwhile: the pin wins, nothing replaced
        LOG.warning("migrated peer %s not pinned: %s", name, exc)
        return
    if added:
        emit(events.PeerMigrated(peer=name, fingerprint=fingerprint, method=method))
