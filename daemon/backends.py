"""Which crypto backend the daemon runs, and finding liboqs without ever building it.

The library builds the backend it is told to (``pqtunnel.crypto.load_backend``). Choosing
one (``PQTUNNEL_CRYPTO_BACKEND``, read in ``config.py``) and probing the host for the liboqs
C library are host concerns, so they live here. ``import oqs`` (liboqs-python) tries to
git-clone and build liboqs when the shared library is missing, which must never happen on
a production host: we look for the library first and import ``oqs`` only once it will load.
"""

from __future__ import annotations

import ctypes.util
import glob
import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any

from pqtunnel.crypto import CryptographyBackend, load_backend
from pqtunnel.errors import BackendUnavailableError


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


def import_oqs() -> Any:
    """The ``oqs`` module, imported only once the C library is known to be there."""
    library = find_liboqs()
    if library is None or importlib.util.find_spec("oqs") is None:
        raise BackendUnavailableError(f"the liboqs backend is unavailable: {liboqs_status()}")
    if library.parent.name.startswith("lib") and "OQS_INSTALL_PATH" not in os.environ:
        os.environ["OQS_INSTALL_PATH"] = str(library.parent.parent)  # so oqs loads this copy, not a build
    return importlib.import_module("oqs")


def open_backend(name: str) -> CryptographyBackend:
    """The named backend; ConfigError for an unknown name, BackendUnavailableError without liboqs."""
    if name == "liboqs":
        return load_backend(name, import_oqs())
    return load_backend(name)
