"""Optional liboqs backend, used only when the liboqs C library is already installed.

``import oqs`` (liboqs-python) tries to git-clone and build liboqs when the shared library
is missing, which must never happen on a production host. So this module never imports it:
the application locates the library and imports ``oqs`` only once it knows it will load
(``pqtunneld.backends``), then hands the module to ``OqsBackend``.

Scope: identity keys are stored as FIPS 203/204 seeds, which liboqs cannot import, so this
backend supplies ML-KEM key generation, encapsulation and decapsulation and ML-DSA
verification; identity signing stays with ``cryptography``.
"""

from __future__ import annotations

from typing import Any

from .backend import CryptographyBackend

_OQS_NAMES = {"ML-KEM-768": "ML-KEM-768", "ML-KEM-1024": "ML-KEM-1024", "ML-DSA-65": "ML-DSA-65", "ML-DSA-87": "ML-DSA-87"}


class OqsKemKey:
    """An ML-KEM key pair held by liboqs (random generation: liboqs takes no seed)."""

    def __init__(self, oqs: Any, algorithm: str) -> None:
        self._kem = oqs.KeyEncapsulation(_OQS_NAMES[algorithm])
        self._public = bytes(self._kem.generate_keypair())
        self.algorithm = algorithm

    def decapsulate(self, ciphertext: bytes) -> bytes:
        return bytes(self._kem.decap_secret(ciphertext))

    def public_bytes(self) -> bytes:
        return self._public


class OqsBackend(CryptographyBackend):
    """ML-KEM and ML-DSA verification through liboqs; signing inherited from cryptography."""

    name = "liboqs"

    def __init__(self, oqs: Any) -> None:
        self._oqs = oqs

    def kem_keypair(self, algorithm: str, seed: bytes) -> OqsKemKey:  # type: ignore[override]
        return OqsKemKey(self._oqs, algorithm)

    def kem_encapsulate(self, algorithm: str, public_key: bytes) -> tuple[bytes, bytes]:
        with self._oqs.KeyEncapsulation(_OQS_NAMES[algorithm]) as kem:
            ciphertext, secret = kem.encap_secret(public_key)
        return bytes(secret), bytes(ciphertext)

    def mldsa_verify(self, algorithm: str, public_key: bytes, signature: bytes, message: bytes, context: bytes) -> bool:
        with self._oqs.Signature(_OQS_NAMES[algorithm]) as sig:
            return bool(sig.verify_with_ctx_str(message, signature, context, public_key))
