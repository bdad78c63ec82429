"""A peer link in the daemon: the pure ``pqtunnel.peers.Link`` plus the trio signals its redial task waits on."""

from __future__ import annotations

import trio

from pqtunnel.session import Session

from pqtunnel.errors import PqtunnelError, UserError
from pqtunnel.peers import Link

from .config import Address


class UnknownPeerError(UserError):
    """No address is known for the peer and it has no session."""


class PeerUnreachableError(PqtunnelError):
    """The peer could not be reached or authenticated in time."""


class PeerAuthenticationError(PeerUnreachableError):
    """The peer was reached, but the handshake failed (untrusted, refused, tampered)."""


class PeerLink(Link[Address]):
    """A peer we dial: the pure ``Link`` state plus the trio signals its redial task waits on.

    Static links come from ``--peer``/config; mDNS links from discovery. An mDNS link may
    have several candidate addresses (e.g. two nodes claim one name): all of them are
    dialled in a staggered race, and only the handshake decides who the peer is.
    """

    def __init__(self, name: str, *addresses: Address, source: str = "static") -> None:
        super().__init__(name=name, candidates=list(addresses), source=source)
        self.wake = trio.Event()
        self.changed = trio.Event()
        self.scope = trio.CancelScope()
        self.attempts: set[trio.CancelScope] = set()
        """Dial attempts not yet established: drop_link cancels them, never a live session."""
        self.dropped = False
        self.resumable: Session | None = None
        """The session whose connection was lost (not closed): resumed on another replica first."""

    def new_scope(self) -> trio.CancelScope:
        """A fresh cancel scope for the next wait or dial (a scope can be entered only once)."""
        self.scope = trio.CancelScope()
        if self.dropped:
            self.scope.cancel()
        return self.scope

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def failed(self, reason: str, *, handshake: bool = False) -> None:
        super().failed(reason, handshake=handshake)
        self.notify()
