"""Optional liboqs backend, used only when the liboqs C library is already installed.

``import oqs`` (liboqs-python) tries to git-clone and build liboqs when the shared library
is missing, which must never happen on a production host. So we look for the library
ourselves first and import ``oqs`` only once we know it will load.

Scope: identity keys are stored as FIPS 203/204 seeds, which liboqs cannot import, so this
backend supplies ML-KEM key generation, encapsulation and decapsulation and ML-DSA
verification; identity signing stays with ``cryptography``.
"""

from __future__ import annotations

import ctypes.util
import glob
import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailableError
from .backend import CryptographyBackend

_OQS_NAMES = {"ML-KEM-768": "ML-KEM-768", "ML-KEM-1024": "ML-KEM-1024", "ML-DSA-65": "ML-DSA-65", "ML-DSA-87": "ML-DSA-87"}


def find_liboqs() -> Path | None:
    """Locate ``liboqs.so`` the way liboqs-python would, without importing it."""
    roots = [os.environ.get("OQS_INSTALL_PATH", ""), str(Path.home() / "_oqs")]
    for root in filter(None, roots):
        for pattern in ("lib/liboqs.so*", "lib64/liboqs.so*"):
            hits = sorted(glob.glob(os.path.join(root, pattern)))
            if hits:
                return Path(hits[0])
    found = ctypes.util.find_library("oqs")
    return Path(found) if found else None


def liboqs_status() -> str:
    """One line saying whether the backend can load, for ``pqtunnel status`` and test skips."""
    library = find_liboqs()
    if library is None:
        return "liboqs C library not installed"
    if importlib.util.find_spec("oqs") is None:
        return f"liboqs found at {library} but the liboqs-python package is not installed"
    return f"available ({library})"


def _import_oqs() -> Any:
    library = find_liboqs()
    if library is None or importlib.util.find_spec("oqs") is None:
        raise BackendUnavailableError(f"the liboqs backend is unavailable: {liboqs_status()}")
    if library.parent.name.startswith("lib") and "OQS_INSTALL_PATH" not in os.environ:
        os.environ["OQS_INSTALL_PATH"] = str(library.parent.parent)
    return importlib.import_module("oqs")


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

    def __init__(self) -> None:
        self._oqs = _import_oqs()

    def kem_keypair(self, algorithm: str, seed: bytes) -> OqsKemKey:  # type: ignore[override]
        return OqsKemKey(self._oqs, algorithm)

    def kem_encapsulate(self, algorithm: str, public_key: bytes) -> tuple[bytes, bytes]:
        with self._oqs.KeyEncapsulation(_OQS_NAMES[algorithm]) as kem:
            ciphertext, secret = kem.encap_secret(public_key)
        return bytes(secret), bytes(ciphertext)

    def mldsa_verify(self, algorithm: str, public_key: bytes, signature: bytes, message: bytes, context: bytes) -> bool:
        with self._oqs.Signature(_OQS_NAMES[algorithm]) as sig:
            return bool(sig.verify_with_ctx_str(message, signature, context, public_key))
