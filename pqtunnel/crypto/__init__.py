"""Crypto suites and backends. Primitives come from ``cryptography``; liboqs is optional.

Choosing a backend is the application's decision (the daemon takes the name from
``PQTUNNEL_CRYPTO_BACKEND`` and locates liboqs in ``pqtunneld.backends``); the library only
builds the backend it is named.
"""

from __future__ import annotations

from typing import Any

from ..errors import BackendUnavailableError, ConfigError
from .backend import CryptographyBackend
from .suites import (
    CLASSICAL,
    DEFAULT_AEADS,
    DEFAULT_ALLOWED_SUITES,
    DEFAULT_SUITE,
    HYBRID,
    PQ_STRONG,
    SUITES,
    Aead,
    Suite,
    suite_by_name,
)


BACKEND_NAMES = ("cryptography", "liboqs")


def load_backend(name: str = "cryptography", oqs: Any | None = None) -> CryptographyBackend:
    """Return the named backend; ``liboqs`` needs the ``oqs`` module, imported by the caller.

    The library never imports ``oqs`` itself: without the C library that import tries to
    download and build liboqs, so only a caller that has located liboqs may hand it in.
    """
    if name == "cryptography":
        return CryptographyBackend()
    if name == "liboqs":
        if oqs is None:
            raise BackendUnavailableError("the liboqs backend is unavailable: no oqs module was supplied")
        from .oqs_backend import OqsBackend

        return OqsBackend(oqs)
    raise ConfigError(f"unknown crypto backend {name!r}; choose 'cryptography' or 'liboqs'")


__all__ = [
    "BACKEND_NAMES",
    "CLASSICAL",
    "DEFAULT_AEADS",
    "DEFAULT_ALLOWED_SUITES",
    "DEFAULT_SUITE",
    "HYBRID",
    "PQ_STRONG",
    "SUITES",
    "Aead",
    "CryptographyBackend",
    "Suite",
    "load_backend",
    "suite_by_name",
]
