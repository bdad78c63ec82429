"""Node identity: a hybrid Ed25519 + ML-DSA signing identity and the node's X25519 static key.

The identity signs the handshake transcript, which has absorbed the X25519 static key, so
the static key is bound to the identity by the identity's own signature each handshake.
This module is the key model only (sans-IO): where identities are kept is an
``IdentityStore`` (``pqtunnel.stores``); the daemon's file store is ``pqtunneld.stores``.
"""

from __future__ import annotations

import base64
from dataclasses import InitVar, dataclass, field
from functools import cached_property
from typing import Any

from .crypto import backend as prim
from .crypto.suites import Suite
from .entropy import SYSTEM_ENTROPY, Entropy
from .errors import IdentityError, MalformedHandshakeError
from .names import validate_name

SEED_SIZE = 32
FINGERPRINT_PREFIX = "pq1:"
_FINGERPRINT_LABEL = b"pqtunnel fingerprint v1\x00"
MLDSA_CONTEXT = b"pqtunnel-v1"
PQ_ALGORITHMS = ("ML-DSA-65", "ML-DSA-87")


def fingerprint_from_parts(ed25519: bytes, pq_key_hashes: dict[str, bytes]) -> str:
    """Short printable hash over Ed25519 and both ML-DSA public keys (by their SHA-256)."""
    digest = prim.sha256(
        _FINGERPRINT_LABEL + ed25519 + pq_key_hashes["ML-DSA-65"] + pq_key_hashes["ML-DSA-87"]
    )
    return FINGERPRINT_PREFIX + base64.b32encode(digest[:20]).decode().lower()


def normalise_fingerprint(text: str) -> str:
    """Accept a fingerprint in any case; raise IdentityError if it cannot be one."""
    value = text.strip().lower()
    body = value.removeprefix(FINGERPRINT_PREFIX)
    if not value.startswith(FINGERPRINT_PREFIX) or len(body) != 32:
        raise IdentityError(f"not a pqtunnel fingerprint: {text!r} (expected {FINGERPRINT_PREFIX} and 32 characters)")
    try:
        base64.b32decode(body.upper())
    except ValueError:
        raise IdentityError(f"not a pqtunnel fingerprint: {text!r} (bad base32)") from None
    return value


@dataclass(frozen=True)
class PublicIdentity:
    """What a peer learns about us: keys and the fingerprint they hash to."""

    name: str
    ed25519: bytes
    pq_keys: dict[str, bytes] = field(hash=False)

    @property
    def pq_key_hashes(self) -> dict[str, bytes]:
        return {alg: prim.sha256(key) for alg, key in self.pq_keys.items()}

    @cached_property
    def fingerprint(self) -> str:
        """Computed once: every event, audit line and policy check of a session reads it."""
        return fingerprint_from_parts(self.ed25519, self.pq_key_hashes)

    def to_wire(self, suite: Suite) -> dict[str, Any]:
        """The handshake encoding: full key only for the suite's ML-DSA, hashes for the rest."""
        wire: dict[str, Any] = {"n": self.name, "ed": self.ed25519, "h": self.pq_key_hashes}
        if suite.pq_signature is not None:
            wire["pq"] = self.pq_keys[suite.pq_signature]
        return wire


@dataclass(frozen=True)
class WireIdentity:
    """A peer identity as received in a handshake: enough to verify and fingerprint it."""

    claimed_name: str
    ed25519: bytes
    pq_key_hashes: dict[str, bytes] = field(hash=False)
    pq_key: bytes | None
    certificate: bytes | None = field(default=None, hash=False, compare=False, repr=False)
    transition: bytes | None = field(default=None, hash=False, compare=False, repr=False)

    @cached_property
    def fingerprint(self) -> str:
        """Computed once: every event, audit line and policy check of a session reads it."""
        return fingerprint_from_parts(self.ed25519, self.pq_key_hashes)

    @classmethod
    def from_wire(cls, wire: Any, suite: Suite) -> WireIdentity:
        """Validate shape and sizes; the PQ key must match its committed hash."""
        if not isinstance(wire, dict):
            raise MalformedHandshakeError("identity is not a map")
        name, ed, hashes, pq = wire.get("n"), wire.get("ed"), wire.get("h"), wire.get("pq")
        if not isinstance(name, str) or not 1 <= len(name) <= 63:
            raise MalformedHandshakeError("identity name missing or too long")
        if not isinstance(ed, bytes) or len(ed) != prim.ED25519_KEY_SIZE:
            raise MalformedHandshakeError("identity Ed25519 key missing or wrong size")
        if not isinstance(hashes, dict) or set(hashes) != set(PQ_ALGORITHMS):
            raise MalformedHandshakeError("identity ML-DSA key hashes missing")
        if not all(isinstance(v, bytes) and len(v) == 32 for v in hashes.values()):
            raise MalformedHandshakeError("identity ML-DSA key hash has the wrong size")
        if suite.pq_signature is None:
            pq = None
        else:
            if not isinstance(pq, bytes) or len(pq) != prim.PQ_PUBLIC_KEY_SIZES[suite.pq_signature]:
                raise MalformedHandshakeError(f"identity {suite.pq_signature} key missing or wrong size")
            if prim.sha256(pq) != hashes[suite.pq_signature]:
                raise MalformedHandshakeError(f"identity {suite.pq_signature} key does not match its hash")
        return cls(claimed_name=name, ed25519=ed, pq_key_hashes=dict(hashes), pq_key=pq)

    def verify(self, backend: prim.CryptographyBackend, suite: Suite, message: bytes, signatures: Any) -> bool:
        """True only if every signature the suite requires verifies (hybrid: both halves)."""
        if not isinstance(signatures, dict) or not isinstance(signatures.get("ed"), bytes):
            return False
        if not prim.ed25519_verify(self.ed25519, signatures["ed"], message):
            return False
        if suite.pq_signature is None:
            return True
        pq_sig = signatures.get("pq")
        if not isinstance(pq_sig, bytes) or self.pq_key is None:
            return False
        return backend.mldsa_verify(suite.pq_signature, self.pq_key, pq_sig, message, MLDSA_CONTEXT)


@dataclass(frozen=True)
class Identity:
    """The node's private identity. Seeds only: every key is re-derivable from 32 bytes.

    ``backend`` derives the ML-DSA public keys from their seeds; the default primitives are
    used when none is given (every backend derives the same keys).
    """

    name: str
    ed25519_seed: bytes
    pq_seeds: dict[str, bytes] = field(hash=False, repr=False)
    x25519_static: bytes = field(repr=False)
    public: PublicIdentity = field(init=False, compare=False)
    backend: InitVar[prim.CryptographyBackend | None] = None

    def __post_init__(self, backend: prim.CryptographyBackend | None) -> None:
        backend = backend or prim.CryptographyBackend()
        public = PublicIdentity(
            name=self.name,
            ed25519=prim.ed25519_public(self.ed25519_seed),
            pq_keys={alg: backend.mldsa_public_key(alg, seed) for alg, seed in self.pq_seeds.items()},
        )
        object.__setattr__(self, "public", public)

    @property
    def fingerprint(self) -> str:
        return self.public.fingerprint

    @cached_property
    def static_public(self) -> bytes:
        return prim.x25519_public(self.x25519_static)

    @classmethod
    def generate(cls, name: str, entropy: Entropy = SYSTEM_ENTROPY,
                 backend: prim.CryptographyBackend | None = None) -> Identity:
        """A fresh identity; seeds come from ``entropy`` so tests can make it reproducible."""
        return cls(
            name=validate_name(name),
            ed25519_seed=entropy.random_bytes(SEED_SIZE),
            pq_seeds={alg: entropy.random_bytes(SEED_SIZE) for alg in PQ_ALGORITHMS},
            x25519_static=entropy.random_bytes(SEED_SIZE),
            backend=backend,
        )

    def sign(self, backend: prim.CryptographyBackend, suite: Suite, message: bytes) -> dict[str, bytes]:
        """Hybrid signature: Ed25519 always, plus the suite's ML-DSA."""
        signatures = {"ed": prim.ed25519_sign(self.ed25519_seed, message)}
        if suite.pq_signature is not None:
            seed = self.pq_seeds[suite.pq_signature]
            signatures["pq"] = backend.mldsa_sign(suite.pq_signature, seed, message, MLDSA_CONTEXT)
        return signatures
