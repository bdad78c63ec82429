"""Pinned trust (like ssh's known_hosts or WireGuard's peer list): name -> fingerprint.

A name is only ever believed when the handshake proves the pinned fingerprint; discovery
and the peer's own claim are hints, never proof. ``TrustStore`` is the in-memory pin
table; persisting pins is a ``PinStore``'s job (``pqtunnel.stores``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .errors import TrustStoreError, UntrustedPeerError
from .identity import normalise_fingerprint
from .names import validate_name


class PinConflictError(TrustStoreError):
    """A name is already pinned to another fingerprint (a changed key is what an impersonator shows)."""


@dataclass(frozen=True)
class TrustedPeer:
    name: str
    fingerprint: str


class TrustStore:
    """The pinned peers of one node: a name -> fingerprint table with the pinning rules."""

    def __init__(self, peers: dict[str, str] | None = None) -> None:
        self._by_name: dict[str, str] = dict(peers or {})

    @classmethod
    def from_peers(cls, peers: Iterable[TrustedPeer]) -> TrustStore:
        """The table a ``PinStore`` holds (later entries win, as in a file read top down)."""
        return cls({peer.name: peer.fingerprint for peer in peers})

    def pin(self, name: str, fingerprint: str) -> bool:
        """Pin ``name``; returns False if it was already pinned to this fingerprint.

        Re-pinning a name to a different fingerprint is refused: a changed key is exactly
        what an impersonator would present, so the user must remove the old pin first.
        """
        name = validate_name(name, "peer name")
        fingerprint = normalise_fingerprint(fingerprint)
        existing = self._by_name.get(name)
        if existing == fingerprint:
            return False
        if existing is not None:
            raise PinConflictError(f"{name} is already pinned to {existing}; remove that pin to change it")
        self._by_name[name] = fingerprint
        return True

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
