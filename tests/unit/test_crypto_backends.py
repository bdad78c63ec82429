"""Crypto backends: the default works; the optional liboqs backend never triggers a build.

The library builds the backend it is named (``pqtunnel.crypto.load_backend``); the daemon
chooses the name (``PQTUNNEL_CRYPTO_BACKEND``) and locates liboqs (``pqtunneld.backends``).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from pqtunnel.crypto import CryptographyBackend, load_backend
from pqtunnel.crypto.backend import mldsa_signing_key
from pqtunnel.errors import BackendUnavailableError, ConfigError, UserError
from pqtunneld.backends import find_liboqs, liboqs_status, open_backend
from pqtunneld.config import BACKEND_ENV, load_config

LIBOQS_AVAILABLE = find_liboqs() is not None and importlib.util.find_spec("oqs") is not None


def test_default_backend_runs_ml_kem_and_ml_dsa() -> None:
    backend = load_backend("cryptography")
    key = backend.kem_keypair("ML-KEM-768", b"\x01" * 64)
    secret, ciphertext = backend.kem_encapsulate("ML-KEM-768", key.public_bytes())
    assert key.decapsulate(ciphertext) == secret
    public = backend.mldsa_public_key("ML-DSA-65", b"\x02" * 32)
    signature = backend.mldsa_sign("ML-DSA-65", b"\x02" * 32, b"msg", b"ctx")
    assert backend.mldsa_verify("ML-DSA-65", public, signature, b"msg", b"ctx")
    assert not backend.mldsa_verify("ML-DSA-65", public, signature, b"other", b"ctx")


def test_a_signing_key_is_expanded_once_per_seed_and_still_signs_for_that_seed_only() -> None:
    backend = CryptographyBackend()
    seed, other = bytes(range(32)), bytes(range(1, 33))
    assert mldsa_signing_key("ML-DSA-65", seed) is mldsa_signing_key("ML-DSA-65", seed)
    for message in (b"first", b"second"):
        signature = backend.mldsa_sign("ML-DSA-65", seed, message, b"ctx")
        assert backend.mldsa_verify("ML-DSA-65", backend.mldsa_public_key("ML-DSA-65", seed), signature, message, b"ctx")
        assert not backend.mldsa_verify("ML-DSA-65", backend.mldsa_public_key("ML-DSA-65", other), signature,
                                        message, b"ctx")
    assert backend.mldsa_public_key("ML-DSA-87", seed) != backend.mldsa_public_key("ML-DSA-65", seed)


def test_unknown_backend_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown crypto backend"):
        load_backend("openssl3000")
    with pytest.raises(ConfigError, match="unknown crypto backend"):
        open_backend("openssl3000")


def test_the_library_ignores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the daemon reads PQTUNNEL_CRYPTO_BACKEND; the library builds what it is named."""
    monkeypatch.setenv(BACKEND_ENV, "openssl3000")
    assert type(load_backend()) is CryptographyBackend


def test_the_daemon_takes_the_backend_name_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert load_config(tmp_path).crypto_backend == "cryptography"
    monkeypatch.setenv(BACKEND_ENV, "liboqs")
    assert load_config(tmp_path).crypto_backend == "liboqs"


def test_the_library_never_imports_oqs_itself() -> None:
    """Without a module handed in, asking the library for liboqs is refused, not attempted."""
    code = (
        "import sys\n"
        "from pqtunnel.crypto import load_backend\n"
        "from pqtunnel.errors import BackendUnavailableError\n"
        "try:\n    load_backend('liboqs')\nexcept BackendUnavailableError as e:\n    print('refused:', e)\n"
        "print('oqs imported:', 'oqs' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "refused: the liboqs backend is unavailable" in out
    assert "oqs imported: False" in out


def test_asking_for_liboqs_without_the_library_fails_cleanly_and_never_imports_oqs() -> None:
    """Importing ``oqs`` without liboqs would try to download and build it: we must not."""
    if LIBOQS_AVAILABLE:
        pytest.skip("liboqs is installed here; this test covers hosts without it")
    code = (
        "import sys\n"
        "from pqtunneld.backends import open_backend\n"
        "from pqtunnel.errors import BackendUnavailableError\n"
        "try:\n    open_backend('liboqs')\nexcept BackendUnavailableError as e:\n    print('refused:', e)\n"
        "print('oqs imported:', 'oqs' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "refused: the liboqs backend is unavailable" in out
    assert "oqs imported: False" in out
    assert liboqs_status() in out


@pytest.mark.liboqs
@pytest.mark.skipif(not LIBOQS_AVAILABLE, reason=f"liboqs backend tests did not run: {liboqs_status()}")
def test_liboqs_interoperates_with_the_default_backend() -> None:
    oqs_backend = open_backend("liboqs")
    default = load_backend("cryptography")
    key = default.kem_keypair("ML-KEM-768", b"\x03" * 64)
    secret, ciphertext = oqs_backend.kem_encapsulate("ML-KEM-768", key.public_bytes())
    assert key.decapsulate(ciphertext) == secret
    public = default.mldsa_public_key("ML-DSA-65", b"\x04" * 32)
    signature = default.mldsa_sign("ML-DSA-65", b"\x04" * 32, b"msg", b"pqtunnel-v1")
    assert oqs_backend.mldsa_verify("ML-DSA-65", public, signature, b"msg", b"pqtunnel-v1")


def test_backend_unavailable_is_reported_as_a_one_line_user_error() -> None:
    assert issubclass(BackendUnavailableError, UserError)
