"""The version a user and an operator see: the installed package and the wire protocol."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from pqtunnel.handshake import PROTOCOL_VERSION

PACKAGE = "pqtunnel"


def package_version() -> str:
    """The installed distribution's version (pyproject.toml), "unknown" when run from a bare checkout."""
    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return "unknown"


def version_line() -> str:
    """``pqtunnel --version``: e.g. ``pqtunnel 0.1.0 (protocol 1)``."""
    return f"{PACKAGE} {package_version()} (protocol {PROTOCOL_VERSION})"
