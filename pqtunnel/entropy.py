"""The one source of randomness in the library, injectable so tests reproduce vectors.

Every secret the library creates (ephemeral keys, KEM seeds, identity seeds, cookie
secrets, certificate serials) is drawn through an ``Entropy`` passed in by the caller.
``SystemEntropy`` is the default and the only place the library touches the OS's random
number generator; tests substitute fixed values.
"""

from __future__ import annotations

import secrets


class Entropy:
    """Source of secrets. Subclasses override ``random_bytes`` (or the specific draws)."""

    def random_bytes(self, size: int) -> bytes:
        return secrets.token_bytes(size)

    def x25519_private(self) -> bytes:
        return self.random_bytes(32)

    def kem_seed(self) -> bytes:
        return self.random_bytes(64)


class SystemEntropy(Entropy):
    """The operating system's CSPRNG (``secrets``)."""


SYSTEM_ENTROPY = SystemEntropy()
