"""Primitive operations, implemented with ``cryptography`` (OpenSSL): nothing hand-rolled.

Everything above this module names algorithms by string ("ML-KEM-768", "ML-DSA-65") so an
alternative backend (liboqs) can supply the same operations.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa, mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from .suites import Aead


@dataclass(frozen=True)
class KemSizes:
    public_key: int
    ciphertext: int


KEM_SIZES = {"ML-KEM-768": KemSizes(1184, 1088), "ML-KEM-1024": KemSizes(1568, 1568)}
SIGNATURE_SIZES = {"ML-DSA-65": 3309, "ML-DSA-87": 4627, "Ed25519": 64}
PQ_PUBLIC_KEY_SIZES = {"ML-DSA-65": 1952, "ML-DSA-87": 2592}
X25519_KEY_SIZE = 32
ED25519_KEY_SIZE = 32


class KemPrivateKey(Protocol):
    def decapsulate(self, ciphertext: bytes) -> bytes: ...

    def public_bytes(self) -> bytes: ...


class CryptographyKemKey:
    """An ML-KEM decapsulation key generated from a 64-byte seed (FIPS 203 d||z)."""

    def __init__(self, algorithm: str, seed: bytes) -> None:
        cls = _MLKEM_PRIVATE[algorithm]
        self._key = cls.from_seed_bytes(seed)
        self.algorithm = algorithm

    def decapsulate(self, ciphertext: bytes) -> bytes:
        return self._key.decapsulate(ciphertext)

    def public_bytes(self) -> bytes:
        return self._key.public_key().public_bytes_raw()


_MLKEM_PRIVATE = {"ML-KEM-768": mlkem.MLKEM768PrivateKey, "ML-KEM-1024": mlkem.MLKEM1024PrivateKey}
_MLKEM_PUBLIC = {"ML-KEM-768": mlkem.MLKEM768PublicKey, "ML-KEM-1024": mlkem.MLKEM1024PublicKey}
_MLDSA_PRIVATE = {"ML-DSA-65": mldsa.MLDSA65PrivateKey, "ML-DSA-87": mldsa.MLDSA87PrivateKey}
_MLDSA_PUBLIC = {"ML-DSA-65": mldsa.MLDSA65PublicKey, "ML-DSA-87": mldsa.MLDSA87PublicKey}


class CryptographyBackend:
    """The default backend. Methods are small so tests can swap in deterministic variants."""

    name = "cryptography"

    def kem_keypair(self, algorithm: str, seed: bytes) -> CryptographyKemKey:
        return CryptographyKemKey(algorithm, seed)

    def kem_encapsulate(self, algorithm: str, public_key: bytes) -> tuple[bytes, bytes]:
        """Return ``(shared_secret, ciphertext)``; raises ValueError on a malformed key."""
        key = _MLKEM_PUBLIC[algorithm].from_public_bytes(public_key)
        return key.encapsulate()

    def mldsa_public_key(self, algorithm: str, seed: bytes) -> bytes:
        return mldsa_signing_key(algorithm, bytes(seed)).public_key().public_bytes_raw()

    def mldsa_sign(self, algorithm: str, seed: bytes, message: bytes, context: bytes) -> bytes:
        return mldsa_signing_key(algorithm, bytes(seed)).sign(message, context)

    def mldsa_verify(self, algorithm: str, public_key: bytes, signature: bytes, message: bytes, context: bytes) -> bool:
        try:
            _MLDSA_PUBLIC[algorithm].from_public_bytes(public_key).verify(signature, message, context)
        except (InvalidSignature, ValueError):
            return False
        return True


@functools.lru_cache(maxsize=4)
def mldsa_signing_key(algorithm: str, seed: bytes) -> mldsa.MLDSA65PrivateKey | mldsa.MLDSA87PrivateKey:
    """The expanded ML-DSA key of a seed, kept: expanding it costs about a quarter of a
    signature, and a responder signs with the same identity in every handshake. Bounded to
    the few identities a process signs with (a node has one)."""
    return _MLDSA_PRIVATE[algorithm].from_seed_bytes(seed)


X25519Key = x25519.X25519PrivateKey


def x25519_key(private: bytes) -> X25519Key:
    """The key object of raw private bytes. Loading computes the public key (a scalar
    multiplication), so a handshake that uses one key several times loads it once."""
    return x25519.X25519PrivateKey.from_private_bytes(private)


def x25519_public(private: bytes | X25519Key) -> bytes:
    key = x25519_key(private) if isinstance(private, bytes) else private
    return key.public_key().public_bytes_raw()


def x25519_dh(private: bytes | X25519Key, public: bytes) -> bytes:
    """Raw X25519; rejects the all-zero output of low-order points (ValueError)."""
    key = x25519_key(private) if isinstance(private, bytes) else private
    return key.exchange(x25519.X25519PublicKey.from_public_bytes(public))


def ed25519_public(seed: bytes) -> bytes:
    return ed25519.Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()


@functools.lru_cache(maxsize=4)
def ed25519_signing_key(seed: bytes) -> ed25519.Ed25519PrivateKey:
    """An identity's Ed25519 key, kept like its ML-DSA key (mldsa_signing_key): loading it
    derives the public key, once per handshake otherwise. Only identity seeds come here."""
    return ed25519.Ed25519PrivateKey.from_private_bytes(seed)


def ed25519_sign(seed: bytes, message: bytes) -> bytes:
    return ed25519_signing_key(seed).sign(message)


def ed25519_verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def make_aead(aead: Aead, key: bytes) -> ChaCha20Poly1305 | AESGCM:
    """One AEAD object per key: building it is the expensive part, reuse it per record."""
    return ChaCha20Poly1305(key) if aead is Aead.CHACHA20_POLY1305 else AESGCM(key)


__all__ = [
    "Aead",
    "CryptographyBackend",
    "InvalidTag",
    "KEM_SIZES",
    "PQ_PUBLIC_KEY_SIZES",
    "SIGNATURE_SIZES",
    "make_aead",
]
