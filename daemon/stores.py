"""File-backed stores: the daemon's persistence for state the sans-IO library keeps in memory.

The library (``pqtunnel``) never touches files; ``pqtunnel.stores`` declares what a store
must do and this module implements it on disk. It owns every file format involved:

==================  ================  ===================================================
file                class             format
==================  ================  ===================================================
HOME/identity.key   IdentityFile      JSON seeds, 0600 (group/world-readable is refused)
HOME/identity.pub   IdentityFile      JSON public keys and fingerprint (a CA's too)
HOME/known_peers    KnownPeersFile    ``NAME FINGERPRINT`` per line, ``#`` comments, 0600
                                      (group/world-writable is refused)
``[ca]`` files      CaFiles           CA public key, own certificate, revocation list
CA directory        CaDirectory       a CA's identity files and the ``revoked`` list
==================  ================  ===================================================

Stores for later state (counter leases, resumption tickets, replay state) belong here too:
one class per store, implementing its protocol from ``pqtunnel.stores``.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import Any

from pqtunnel.ca import Certificate, CertificateAuthority, dearmor, decode_certificate, normalise_serial
from pqtunnel.crypto.backend import CryptographyBackend
from pqtunnel.entropy import SYSTEM_ENTROPY, Entropy
from pqtunnel.errors import (
    CaError,
    CertificateError,
    IdentityError,
    IdentityExistsError,
    InsecureKeyFileError,
    TrustStoreError,
    UserError,
)
from pqtunnel.identity import Identity, PublicIdentity, normalise_fingerprint
from pqtunnel.names import validate_name
from pqtunnel.trust import PinConflictError, TrustedPeer, TrustStore

KEY_FILE = "identity.key"
PUB_FILE = "identity.pub"
TRUST_FILE = "known_peers"
REVOKED_FILE = "revoked"
KEY_FILE_VERSION = 1


def refuse_writable_by_others(path: Path, what: str, error: type[UserError]) -> None:
    """Refuse a file that group or others may write: whoever can edit it decides whom we
    trust (``known_peers``) or which commands we run (``config.toml``). A missing file passes."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise error(f"{what} {path} is writable by group or others (mode {stat.S_IMODE(mode):04o}); "
                    f"run: chmod go-w {path}")


def ensure_home(home: Path) -> Path:
    """Create the node home owner-only (0700); it holds keys and the control socket."""
    if home.exists() and not home.is_dir():
        raise IdentityError(f"node home {home} is not a directory; pick another --home")
    try:
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(home, 0o700)
    except OSError as exc:
        raise IdentityError(f"cannot create node home {home}: {exc.strerror or exc}") from None
    return home


# --- identity files ----------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str, size: int) -> bytes:
    raw = base64.b64decode(text, validate=True)
    if len(raw) != size:
        raise ValueError(f"expected {size} bytes, got {len(raw)}")
    return raw


def identity_to_json(identity: Identity) -> dict[str, Any]:
    """The ``identity.key`` contents: the seeds every key is derived from."""
    return {
        "version": KEY_FILE_VERSION,
        "name": identity.name,
        "ed25519_seed": _b64(identity.ed25519_seed),
        "ml_dsa_65_seed": _b64(identity.pq_seeds["ML-DSA-65"]),
        "ml_dsa_87_seed": _b64(identity.pq_seeds["ML-DSA-87"]),
        "x25519_static": _b64(identity.x25519_static),
    }


def identity_from_json(data: Any, path: Path) -> Identity:
    """Parse ``identity.key`` contents; every defect is an IdentityError naming ``path``."""
    if not isinstance(data, dict) or data.get("version") != KEY_FILE_VERSION:
        raise IdentityError(f"identity key file {path} has an unknown format")
    if not isinstance(data.get("name"), str):
        raise IdentityError(f"identity key file {path} is malformed (name missing or not a string)")
    try:
        return Identity(
            name=validate_name(data["name"]),
            ed25519_seed=_unb64(data["ed25519_seed"], 32),
            pq_seeds={"ML-DSA-65": _unb64(data["ml_dsa_65_seed"], 32), "ML-DSA-87": _unb64(data["ml_dsa_87_seed"], 32)},
            x25519_static=_unb64(data["x25519_static"], 32),
        )
    except (KeyError, TypeError, ValueError, UserError) as exc:
        raise IdentityError(f"identity key file {path} is malformed ({exc})") from None


def public_summary(identity: Identity) -> dict[str, Any]:
    """The ``identity.pub`` contents: public keys only, safe to share."""
    return {
        "name": identity.name,
        "fingerprint": identity.fingerprint,
        "ed25519": _b64(identity.public.ed25519),
        "ml_dsa_65": _b64(identity.public.pq_keys["ML-DSA-65"]),
        "ml_dsa_87": _b64(identity.public.pq_keys["ML-DSA-87"]),
        "x25519_static": _b64(identity.static_public),
    }


def public_from_summary(data: Any) -> PublicIdentity:
    """The public identity in ``identity.pub`` contents (KeyError/TypeError/ValueError if malformed)."""
    return PublicIdentity(
        name=data["name"],
        ed25519=base64.b64decode(data["ed25519"]),
        pq_keys={"ML-DSA-65": base64.b64decode(data["ml_dsa_65"]), "ML-DSA-87": base64.b64decode(data["ml_dsa_87"])},
    )


class IdentityFile:
    """IdentityStore on a node home (or a CA directory): ``identity.key`` plus ``identity.pub``."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.key_path = home / KEY_FILE
        self.public_path = home / PUB_FILE

    def create(self, name: str, entropy: Entropy = SYSTEM_ENTROPY) -> Identity:
        """Generate and store a new identity; refuse to overwrite an existing one."""
        if self.key_path.exists():
            raise IdentityExistsError(
                f"an identity already exists in {self.home} (refusing to overwrite {self.key_path})"
            )
        identity = Identity.generate(name, entropy)
        ensure_home(self.home)
        self._write_key(identity)
        self.public_path.write_text(json.dumps(public_summary(identity), indent=2) + "\n")
        return identity

    def _write_key(self, identity: Identity) -> None:
        """Owner-only from the first byte (O_EXCL, 0600), and on disk before we report success."""
        fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(identity_to_json(identity), handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())

    def load(self) -> Identity:
        """Load ``identity.key``, refusing group/world-readable files like ssh does."""
        self._check_mode()
        try:
            data = json.loads(self.key_path.read_text())
        except (OSError, ValueError) as exc:
            raise IdentityError(f"cannot read identity key {self.key_path}: {exc}") from None
        except RecursionError:
            raise IdentityError(f"identity key file {self.key_path} has an unknown format (nested too deeply)") from None
        return identity_from_json(data, self.key_path)

    def _check_mode(self) -> None:
        home, key_path = self.home, self.key_path
        if home.exists() and not home.is_dir():
            raise IdentityError(f"node home {home} is not a directory")
        if not home.is_dir():
            raise IdentityError(
                f"node home {home} does not exist; create an identity with: pqtunnel init --name NAME --home {home}"
            )
        try:
            mode = key_path.stat().st_mode
        except FileNotFoundError:
            raise IdentityError(f"no identity in {home}; create one with: pqtunnel init --name NAME --home {home}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise InsecureKeyFileError(
                f"identity key {key_path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
                f"run: chmod 600 {key_path}"
            )


def create_identity(home: Path, name: str, entropy: Entropy = SYSTEM_ENTROPY) -> Identity:
    return IdentityFile(home).create(name, entropy)


def load_identity(home: Path) -> Identity:
    return IdentityFile(home).load()


# --- pinned peers ------------------------------------------------------------------------------------


def parse_known_peers(text: str, path: Path) -> list[TrustedPeer]:
    """``NAME FINGERPRINT`` lines; errors name the file and line (``path:3: ...``)."""
    peers = []
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 2:
            raise TrustStoreError(f"{path}:{number}: expected 'NAME FINGERPRINT'")
        try:
            peers.append(TrustedPeer(validate_name(words[0], "peer name"), normalise_fingerprint(words[1])))
        except UserError as exc:
            raise TrustStoreError(f"{path}:{number}: {exc}") from None
    return peers


class KnownPeersFile:
    """PinStore on ``HOME/known_peers`` (like ssh's known_hosts): read whole, appended to."""

    def __init__(self, home: Path) -> None:
        self.path = home / TRUST_FILE

    def pins(self) -> list[TrustedPeer]:
        if not self.path.exists():
            return []
        refuse_writable_by_others(self.path, "pinned-peer file", TrustStoreError)
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise TrustStoreError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise TrustStoreError(f"{self.path} is not UTF-8 text (byte {exc.start})") from None
        return parse_known_peers(text, self.path)

    def table(self) -> TrustStore:
        return TrustStore.from_peers(self.pins())

    def add(self, name: str, fingerprint: str) -> bool:
        """Pin ``name``; False if already pinned to this fingerprint. A changed key is refused."""
        name, fingerprint = validate_name(name, "peer name"), normalise_fingerprint(fingerprint)
        table = self.table()
        try:
            added = table.pin(name, fingerprint)
        except PinConflictError:
            existing = table.fingerprint_for(name)
            raise PinConflictError(
                f"{name} is already pinned to {existing}; remove that line from {self.path} to change it"
            ) from None
        if added:
            self._append(f"{name} {fingerprint}\n")
        return added

    def _append(self, line: str) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as handle:
            handle.write(line)


def load_trust(home: Path) -> TrustStore:
    """The pin table of a node home (an empty table when ``known_peers`` does not exist)."""
    return KnownPeersFile(home).table()


# --- certificates and the CA a node trusts -------------------------------------------------------------


def read_certificate_file(path: Path) -> Certificate:
    try:
        text = path.read_text()
    except OSError as exc:
        raise CaError(f"cannot read certificate {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CaError(f"certificate {path} is not text") from None
    try:
        return decode_certificate(dearmor(text))
    except CertificateError as exc:
        raise CaError(f"{path}: {exc}") from None


def write_certificate_file(path: Path, certificate: Certificate) -> None:
    try:
        path.write_text(certificate.armor())
    except OSError as exc:
        raise CaError(f"cannot write certificate {path}: {exc.strerror or exc}") from None


def load_ca_public(path: Path) -> PublicIdentity:
    """Read a CA's public key file and check its keys hash to the fingerprint it states."""
    try:
        data = json.loads(path.read_text())
        public = public_from_summary(data)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CaError(f"cannot read CA public key {path}: {exc}") from None
    except RecursionError:
        raise CaError(f"cannot read CA public key {path}: nested too deeply") from None
    if public.fingerprint != data.get("fingerprint"):
        raise CaError(f"CA public key {path} does not match its stated fingerprint")
    return public


def parse_revocations(text: str) -> frozenset[str]:
    """One serial per line, ``#`` comments; case-insensitive."""
    serials = (line.split("#", 1)[0].strip().lower() for line in text.splitlines())
    return frozenset(serial for serial in serials if serial)


def load_revocations(path: Path | None) -> frozenset[str]:
    """The serials in a revocation list (none when there is no list)."""
    if path is None or not path.exists():
        return frozenset()
    try:
        return parse_revocations(path.read_text())
    except OSError as exc:
        raise CaError(f"cannot read revocation list {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CaError(f"revocation list {path} is not UTF-8 text") from None


def _file_version(path: Path) -> tuple[int, int, int] | None:
    """What identifies one version of a file: modification time, size and inode (None: missing)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size, info.st_ino


class RevocationFile:
    """A revocation list checked on every certificate: re-read when the file changes.

    It must exist when the node starts (an empty file if nothing is revoked); if it vanishes
    or becomes unreadable later, ``revoked`` raises CertificateError, so CA certificates are
    refused: revocation fails closed.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._version = _file_version(path)
        if self._version is None:
            raise CaError(f"revocation list {path} does not exist (create it empty if nothing is revoked)")
        self._serials = load_revocations(path)

    def revoked(self) -> frozenset[str]:
        version = _file_version(self.path)
        if version is None:
            raise CertificateError(f"revocation list {self.path} is missing: refusing CA certificates")
        if version != self._version:
            try:
                self._serials = load_revocations(self.path)
            except CaError as exc:
                raise CertificateError(f"{exc}: refusing CA certificates") from None
            self._version = version
        return self._serials


class CaFiles:
    """CaStore on the files a node's ``[ca]`` settings name (each optional).

    The revocation list only matters with a CA key, so it is required to exist only then.
    """

    def __init__(self, public: Path | None, certificate: Path | None = None,
                 revocations: Path | None = None) -> None:
        self.public_path = public
        self.certificate_path = certificate
        self._revocations = RevocationFile(revocations) if public is not None and revocations is not None else None

    def ca_public(self) -> PublicIdentity | None:
        return load_ca_public(self.public_path) if self.public_path is not None else None

    def revoked(self) -> frozenset[str]:
        return self._revocations.revoked() if self._revocations is not None else frozenset()

    def own_certificate(self) -> Certificate | None:
        return read_certificate_file(self.certificate_path) if self.certificate_path is not None else None


# --- a CA directory (the CA's own side) ----------------------------------------------------------------


class CaDirectory:
    """A CA directory: its identity files (``identity.key``/``identity.pub``) and ``revoked``."""

    def __init__(self, directory: Path, authority: CertificateAuthority) -> None:
        self.directory = directory
        self.authority = authority

    @property
    def identity(self) -> Identity:
        return self.authority.identity

    @property
    def revocation_path(self) -> Path:
        return self.directory / REVOKED_FILE

    @classmethod
    def create(cls, directory: Path, name: str, backend: CryptographyBackend | None = None,
               entropy: Entropy = SYSTEM_ENTROPY) -> CaDirectory:
        """A new CA key pair and an empty revocation list; refuses to overwrite a CA."""
        try:
            identity = create_identity(directory, name, entropy)
        except IdentityError as exc:
            raise CaError(str(exc).replace("an identity", "a CA")) from None
        (directory / REVOKED_FILE).touch(mode=0o644)
        return cls(directory, CertificateAuthority(identity, backend or CryptographyBackend(), entropy))

    @classmethod
    def load(cls, directory: Path, backend: CryptographyBackend | None = None,
             entropy: Entropy = SYSTEM_ENTROPY) -> CaDirectory:
        create = f"create one with: pqtunnel ca init --name NAME --ca-dir {directory}"
        if not directory.is_dir():
            what = "is not a directory" if directory.exists() else "does not exist"
            raise CaError(f"CA directory {directory} {what}; {create}")
        if not (directory / KEY_FILE).exists():
            raise CaError(f"no CA key in {directory}; {create}")
        try:
            identity = load_identity(directory)
        except IdentityError as exc:
            raise CaError(f"not a usable CA directory: {exc}") from None
        return cls(directory, CertificateAuthority(identity, backend or CryptographyBackend(), entropy))

    def sign(self, name: str, fingerprint: str, *, groups: tuple[str, ...] = (), not_before: int,
             not_after: int) -> Certificate:
        return self.authority.sign(name, fingerprint, groups=groups, not_before=not_before, not_after=not_after)

    def revoke(self, serial: str) -> bool:
        """Add ``serial`` to the revocation list; False if it was already there."""
        serial = normalise_serial(serial)
        if serial in load_revocations(self.revocation_path):
            return False
        try:
            with self.revocation_path.open("a") as handle:
                handle.write(serial + "\n")
        except OSError as exc:
            raise CaError(f"cannot write revocation list {self.revocation_path}: {exc.strerror or exc}") from None
        return True
