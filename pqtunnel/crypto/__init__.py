"""Crypto suites and backends. Primitives come from ``cryptography``; liboqs is optional."""

from __future__ import annotations

import os

from ..errors import ConfigError
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


def load_backend(name: str | None = None) -> CryptographyBackend:
    """Return the named backend (``cryptography`` default, ``liboqs`` optional)."""
    name = name or os.environ.get("PQTUNNEL_CRYPTO_BACKEND", "cryptography")
    if name == "cryptography":
        return CryptographyBackend()
    if name == "liboqs":
        from .oqs_backend import OqsBackend

        return OqsBackend()
    raise ConfigError(f"unknown crypto backend {name!r}; choose 'cryptography' or 'liboqs'")


__all__ = [
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
