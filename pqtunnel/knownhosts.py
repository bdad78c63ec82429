"""Legacy anchors: SSH host keys a fleet already trusts, read from OpenSSH ``known_hosts`` text.

A peer named NAME may migrate through an anchor when a known_hosts line lists its classical
key for exactly the host name NAME (compared case-insensitively, plain or hashed
``|1|salt|hash``); ``[NAME]:port`` entries and wildcard patterns never match, since the
pqtunnel name is what the anchor must vouch for. ``@revoked`` lines withdraw a key for every
name; ``@cert-authority`` lines are refused (a host CA signs certificates pqtunnel does not
verify). Keys are compared as DER SubjectPublicKeyInfo, like ``pqtunnel.transition``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

from cryptography.hazmat.primitives.serialization import load_ssh_public_key

from .crypto import backend as prim
from .errors import MigrationError, TransitionError
from .transition import TransitionRecord, check_classical_key, classical_fingerprint, spki_of, verify_transition


@dataclass(frozen=True)
class Anchor:
    """One host key line: who it is for (plain names, or hashed ``(salt, hash)`` pairs)."""

    names: tuple[str, ...]
    hashed: tuple[tuple[bytes, bytes], ...]
    spki: bytes
    text: str
    """The line as written (without marker), to store it again verbatim."""

    def lists(self, name: str) -> bool:
        name = name.lower()
        if name in self.names:
            return True
        return any(hmac.compare_digest(hmac.new(salt, name.encode(), hashlib.sha1).digest(), digest)
                   for salt, digest in self.hashed)


@dataclass(frozen=True)
class LegacyAnchors:
    """The known_hosts anchors of one node: host keys and revoked keys."""

    anchors: tuple[Anchor, ...] = ()
    revoked: frozenset[bytes] = frozenset()

    def vouches(self, name: str, spki: bytes) -> bool:
        """Whether some line lists ``spki`` for ``name`` and no ``@revoked`` line withdraws it."""
        if spki in self.revoked:
            return False
        return any(anchor.spki == spki and anchor.lists(name) for anchor in self.anchors)

    def names_for(self, spki: bytes) -> list[str]:
        """The plain names an anchor lists for a key (hashed names cannot be read back)."""
        return sorted({n for a in self.anchors if a.spki == spki for n in a.names})

    def __bool__(self) -> bool:
        return bool(self.anchors)

    def merged(self, other: LegacyAnchors) -> LegacyAnchors:
        return LegacyAnchors(self.anchors + other.anchors, self.revoked | other.revoked)


def parse_known_hosts(text: str, source: str) -> LegacyAnchors:
    """Every line of a known_hosts file; a malformed one is a MigrationError naming source:line."""
    anchors: list[Anchor] = []
    revoked: set[bytes] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            marker, anchor = _parse_line(line)
        except MigrationError as exc:
            raise MigrationError(f"{source}:{number}: {exc}") from None
        if marker == "@revoked":
            revoked.add(anchor.spki)
        else:
            anchors.append(anchor)
    return LegacyAnchors(tuple(anchors), frozenset(revoked))


def _parse_line(line: str) -> tuple[str, Anchor]:
    fields = line.split()
    marker = ""
    if fields[0].startswith("@"):
        marker = fields.pop(0)
        if marker == "@cert-authority":
            raise MigrationError("@cert-authority lines are not supported: host certificates are not migrated; "
                                 "list the host keys themselves")
        if marker != "@revoked":
            raise MigrationError(f"unknown marker {marker}")
    if len(fields) < 3:
        raise MigrationError("expected 'hostnames keytype base64-key'")
    hosts, key_type, key_b64 = fields[:3]
    spki = _host_key(key_type, key_b64)
    names, hashed = _host_patterns(hosts)
    return marker, Anchor(names, hashed, spki, " ".join(fields[:3]))


def _host_key(key_type: str, key_b64: str) -> bytes:
    try:
        key = load_ssh_public_key(f"{key_type} {key_b64}".encode())
    except Exception as exc:  # cryptography raises ValueError or UnsupportedAlgorithm
        raise MigrationError(f"unreadable {key_type} key ({type(exc).__name__})") from None
    check_classical_key(key)
    return spki_of(key)  # type: ignore[arg-type]


def _host_patterns(hosts: str) -> tuple[tuple[str, ...], tuple[tuple[bytes, bytes], ...]]:
    if hosts.startswith("|1|"):
        parts = hosts.split("|")
        try:
            salt, digest = base64.b64decode(parts[2], validate=True), base64.b64decode(parts[3], validate=True)
        except (IndexError, ValueError):
            raise MigrationError("malformed hashed host name") from None
        if len(parts) != 4 or len(digest) != 20:
            raise MigrationError("malformed hashed host name")
        return (), ((salt, digest),)
    return tuple(h.lower() for h in hosts.split(",") if h and not any(c in h for c in "*?![]")), ()


class LegacyVerifier:
    """Checks a peer's transition record against the node's anchors and the migration deadline.

    ``accept_until`` (seconds since the epoch, None: no deadline) ends the legacy path: from
    then on a record proves nothing and only pins and the CA count.
    """

    def __init__(self, anchors: LegacyAnchors, backend: prim.CryptographyBackend,
                 accept_until: int | None = None) -> None:
        self.anchors = anchors
        self.backend = backend
        self.accept_until = accept_until

    def verify(self, data: bytes | None, presented_fingerprint: str, now: int) -> TransitionRecord:
        """The record, if an anchor vouches for its key under its name; TransitionError otherwise."""
        if data is None:
            raise TransitionError(f"peer {presented_fingerprint} presented no transition record")
        if self.accept_until is not None and now >= self.accept_until:
            raise TransitionError("the migration window closed (migration.accept_until): only hybrid trust counts")
        record = verify_transition(data, presented_fingerprint, now, self.backend)
        if record.kind != "ssh":
            raise TransitionError(f"transition record for {record.name} is of kind {record.kind}, not ssh")
        if not self.anchors.vouches(record.name, record.classical_key):
            raise TransitionError(f"no known_hosts entry lists the key of {record.name}'s transition record "
                                  f"({classical_fingerprint(record.classical_key)}) for {record.name}")
        return record
