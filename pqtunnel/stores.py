"""Store interfaces: where the library's long-lived state is kept between runs.

The library is sans-IO: it holds identities, pins and CA state in memory and never opens a
file. An application persists that state by implementing these protocols; the daemon's
file-backed implementations are in ``pqtunneld.stores`` (``daemon/stores.py``), and tests
may use in-memory ones. Stores for further state (counter leases, resumption tickets,
replay state) are declared here as they are added.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol, runtime_checkable

from .ca import Certificate
from .entropy import SYSTEM_ENTROPY, Entropy
from .identity import Identity, PublicIdentity
from .trust import TrustedPeer


@runtime_checkable
class IdentityStore(Protocol):
    """Keeps this node's private identity."""

    def load(self) -> Identity:
        """The stored identity; IdentityError when there is none or it is unusable or unsafe."""
        ...

    def create(self, name: str, entropy: Entropy = SYSTEM_ENTROPY) -> Identity:
        """Generate and keep a new identity; IdentityExistsError rather than replace one."""
        ...


@runtime_checkable
class PinStore(Protocol):
    """Keeps the pinned peers (``TrustStore.from_peers(store.pins())`` is the live table)."""

    def pins(self) -> list[TrustedPeer]:
        """Every pin, in the order they were added (a later pin for a name wins)."""
        ...

    def add(self, name: str, fingerprint: str) -> bool:
        """Persist a pin; False if it was already there, PinConflictError if the name has another."""
        ...


@runtime_checkable
class CaStore(Protocol):
    """A node's view of its network CA: the CA key, the revocation list and its own certificate."""

    def ca_public(self) -> PublicIdentity | None:
        """The CA public key peers' certificates must be signed by (None: no CA configured)."""
        ...

    def revoked(self) -> Collection[str]:
        """The revoked serials now; CertificateError if the list cannot be known (fail closed)."""
        ...

    def own_certificate(self) -> Certificate | None:
        """The certificate this node presents in handshakes (None: it has none)."""
        ...
