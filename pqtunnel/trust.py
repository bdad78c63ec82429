"""Pinned trust (like ssh's known_hosts or WireGuard's peer list): name -> fingerprint.

A name is only ever believed when the handshake proves the pinned fingerprint; discovery
and the peer's own claim are hints, never proof.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import TrustStoreError, UntrustedPeerError, UserError
from .identity import normalise_fingerprint
from .names import validate_name

TRUST_FILE = "known_peers"


@dataclass(frozen=True)
class TrustedPeer:
    name: str
    fingerprint: str


class TrustStore:
    """The pinned peers of one node, stored one ``NAME FINGERPRINT`` per line."""

    def __init__(self, peers: dict[str, str] | None = None, path: Path | None = None) -> None:
        self._by_name: dict[str, str] = dict(peers or {})
        self.path = path

    @classmethod
    def load(cls, home: Path) -> TrustStore:
        path = home / TRUST_FILE
        peers: dict[str, str] = {}
        if path.exists():
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                text = line.split("#", 1)[0].strip()
                if not text:
                    continue
                parts = text.split()
                if len(parts) != 2:
                    raise TrustStoreError(f"{path}:{number}: expected 'NAME FINGERPRINT'")
                try:
                    peers[validate_name(parts[0], "peer name")] = normalise_fingerprint(parts[1])
                except UserError as exc:
                    raise TrustStoreError(f"{path}:{number}: {exc}") from None
        return cls(peers, path)

    def pin(self, name: str, fingerprint: str) -> bool:
        """Pin ``name``; returns False if it was already pinned to this fingerprint.

        Re-pinning a name to a different fingerprint is refused: a changed key is exactly
        what an impersonator would present, so the user must remove the old line first.
        """
        name = validate_name(name, "peer name")
        fingerprint = normalise_fingerprint(fingerprint)
        existing = self._by_name.get(name)
        if existing == fingerprint:
            return False
        if existing is not None:
            where = self.path or TRUST_FILE
            raise TrustStoreError(
                f"{name} is already pinned to {existing}; remove that line from {where} to change it"
            )
        self._by_name[name] = fingerprint
        self._append(name, fingerprint)
        return True

    def _append(self, name: str, fingerprint: str) -> None:
        if self.path is None:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as handle:
            handle.write(f"{name} {fingerprint}\n")

    def fingerprint_for(self, name: str) -> str | None:
        return self._by_name.get(name)

    def name_for(self, fingerprint: str) -> str | None:
        for name, pinned in self._by_name.items():
            if pinned == fingerprint:
                return name
        return None

    def peers(self) -> list[TrustedPeer]:
        return [TrustedPeer(n, f) for n, f in sorted(self._by_name.items())]

    def require(self, fingerprint: str, expected_name: str | None) -> str:
        """Return the trusted name for ``fingerprint`` or raise UntrustedPeerError.

        When we dialled ``expected_name``, the fingerprint must be exactly that pin.
        """
        if expected_name is not None:
            pinned = self._by_name.get(expected_name)
            if pinned is None:
                raise UntrustedPeerError(f"no pinned fingerprint for {expected_name}")
            if pinned != fingerprint:
                raise UntrustedPeerError(
                    f"{expected_name} presented {fingerprint}, but {pinned} is pinned"
                )
            return expected_name
        name = self.name_for(fingerprint)
        if name is None:
            raise UntrustedPeerError(f"peer {fingerprint} is not pinned")
        return name
