"""Pins added to ``known_peers`` while the daemon runs count at the next handshake.

``pqtunnel trust`` tells a running daemon itself (control socket); this covers the rest: a
line appended by hand or by configuration management, or a ``trust`` run while the control
socket could not be reached. Before a handshake the node asks whether the file changed (one
``stat``) and only then reads it again. New pins are added to the node's pin table, which
its Policy holds by reference. A pin removed or changed in the file is *not* applied here:
dropping trust while sessions run is the job of ``pqtunnel reload`` (which re-judges them).
"""

from __future__ import annotations

import os
from pathlib import Path

from pqtunnel.errors import TrustStoreError
from pqtunnel.trust import TrustStore

from .logs import LOG
from .stores import KnownPeersFile

Signature = tuple[int, int, int] | None


class KnownPeersWatch:
    """Remembers the ``known_peers`` it last read, and reads it again once it changed."""

    def __init__(self, home: Path) -> None:
        self.file = KnownPeersFile(home)
        self._seen = self._signature()

    def _signature(self) -> Signature:
        try:
            info = os.stat(self.file.path)
        except OSError:
            return None
        return info.st_ino, info.st_size, info.st_mtime_ns

    def new_pins(self, trust: TrustStore) -> list[str]:
        """Add the file's new pins to ``trust``; returns their names (nothing if unchanged)."""
        signature = self._signature()
        if signature == self._seen:
            return []
        self._seen = signature
        try:
            pins = self.file.pins()
        except TrustStoreError as exc:
            LOG.warning("known_peers changed but cannot be used: %s (the pins in force stay)", exc)
            return []
        added = []
        for peer in pins:
            try:
                if trust.pin(peer.name, peer.fingerprint):
                    added.append(peer.name)
            except TrustStoreError as exc:  # a changed pin: only a reload may replace it
                LOG.warning("known_peers: %s; run pqtunnel reload to apply a changed pin", exc)
        if added:
            LOG.info("known_peers changed: now pinned %s", ", ".join(added))
        return added
