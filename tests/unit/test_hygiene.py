"""Spec for file and exec hygiene (issue 13, finding 10): files that decide whom we trust or
what we run must not be writable by others; hostile file contents give one-line errors;
exec services get a minimal environment, never the daemon's own; ``[limits]`` is checked."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from pqtunnel.errors import CaError, ConfigError, IdentityError, TrustStoreError
from pqtunnel.identity import Identity
from pqtunneld.config import ExecService, ResourceLimits, load_config
from pqtunneld.services import exec_environment
from pqtunneld.stores import KnownPeersFile, create_identity, load_identity, load_revocations, read_certificate_file

pytestmark = pytest.mark.unit


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "node"
    home.mkdir(mode=0o700)
    return home


def write_config(home: Path, text: str, mode: int = 0o644) -> Path:
    path = home / "config.toml"
    path.write_text(text)
    os.chmod(path, mode)
    return path


# --- who may write the files -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o666, 0o646, 0o664, 0o620])
def test_a_config_file_others_may_write_is_refused_with_the_fix(home: Path, mode: int) -> None:
    path = write_config(home, "[node]\n", mode)
    with pytest.raises(ConfigError) as refused:
        load_config(home)
    assert str(refused.value) == (f"config file {path} is writable by group or others (mode {mode:04o}); "
                                  f"run: chmod go-w {path}")


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o444])
def test_a_config_file_only_its_owner_may_write_is_read(home: Path, mode: int) -> None:
    write_config(home, '[node]\nlisten = "127.0.0.1:9"\n', mode)
    assert load_config(home).listen.port == 9


def test_a_pin_file_others_may_write_is_refused_with_the_fix(home: Path, alice: Identity) -> None:
    store = KnownPeersFile(home)
    store.add("alice", alice.fingerprint)
    os.chmod(store.path, 0o666)
    with pytest.raises(TrustStoreError, match=r"is writable by group or others \(mode 0666\); run: chmod go-w "):
        store.pins()
    os.chmod(store.path, 0o644)
    assert [peer.name for peer in store.pins()] == ["alice"]


# --- hostile contents: one line, never a traceback ------------------------------------------------------


def test_a_deeply_nested_key_file_is_a_one_line_error(home: Path) -> None:
    create_identity(home, "bob")
    (home / "identity.key").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(IdentityError, match="nested too deeply"):
        load_identity(home)


def test_a_pin_file_that_is_not_utf8_is_a_one_line_error(home: Path) -> None:
    path = home / "known_peers"
    path.write_bytes(b"alice pq1:\xff\xfe\n")
    os.chmod(path, 0o600)
    with pytest.raises(TrustStoreError, match=f"{path} is not UTF-8 text"):
        KnownPeersFile(home).pins()


def test_a_deeply_nested_config_file_is_a_one_line_error(home: Path) -> None:
    write_config(home, "a = " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(home)


def test_ca_files_that_are_not_text_are_one_line_errors(tmp_path: Path) -> None:
    binary = tmp_path / "garbage"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(CaError, match="is not UTF-8 text"):
        load_revocations(binary)
    with pytest.raises(CaError, match="is not text"):
        read_certificate_file(binary)


# --- exec services: a minimal environment ----------------------------------------------------------------


def test_an_exec_service_sees_path_lang_home_and_its_own_env_only() -> None:
    daemon_env = {"PATH": "/opt/bin:/usr/bin", "LANG": "de_DE.UTF-8", "HOME": "/elsewhere",
                  "DEMO_CLOUD_API_KEY": "secret", "PQTUNNEL_HOME": "/var/lib/pqtunnel"}
    env = exec_environment(ExecService(("server",), (("API_URL", "http://127.0.0.1:9"),)), daemon_env)
    assert set(env) == {"PATH", "LANG", "HOME", "API_URL"}
    assert env["PATH"] == "/opt/bin:/usr/bin" and env["LANG"] == "de_DE.UTF-8"
    assert env["HOME"] == os.path.expanduser("~"), "the home of the daemon's user, not $HOME"
    assert env["API_URL"] == "http://127.0.0.1:9"


def test_an_exec_service_may_override_the_minimal_environment() -> None:
    env = exec_environment(ExecService(("server",), (("PATH", "/srv/tools"),)), {})
    assert env["PATH"] == "/srv/tools" and env["LANG"] == "C.UTF-8"


def test_exec_env_in_the_config(home: Path) -> None:
    write_config(home, '[services]\ntools = { exec = ["server"], env = { B = "2", A = "1" } }\n')
    assert load_config(home).services["tools"] == ExecService(("server",), (("A", "1"), ("B", "2")))


@pytest.mark.parametrize("service, message", [
    ('{ exec = ["server"], env = { A = 1 } }', "env must be a table of strings"),
    ('{ exec = ["server"], env = "A=1" }', "env must be a table of strings"),
    ('{ exec = ["server"], env = { "A=B" = "1" } }', "is not a valid environment variable name"),
    ('{ exec = ["server"], enviroment = { A = "1" } }', "unknown setting(s) enviroment"),
])
def test_a_bad_exec_env_is_a_one_line_error(home: Path, service: str, message: str) -> None:
    write_config(home, f"[services]\ntools = {service}\n")
    with pytest.raises(ConfigError) as refused:
        load_config(home)
    assert message in str(refused.value) and "services.tools" in str(refused.value)


# --- [limits] ------------------------------------------------------------------------------------------


def test_limits_default_to_the_documented_values(home: Path) -> None:
    limits = load_config(home).limits
    assert limits == ResourceLimits()
    assert (limits.streams_per_session, limits.exec_processes, limits.exec_processes_per_peer) == (256, 64, 16)
    assert (limits.buffered_bytes, limits.buffered_bytes_per_session) == (256 << 20, 64 << 20)
    assert (limits.handshakes, limits.handshakes_per_address) == (128, 8)


def test_limits_are_read_from_the_config(home: Path) -> None:
    write_config(home, "[limits]\nstreams_per_session = 32\nexec_processes_per_peer = 2\n")
    limits = load_config(home).limits
    assert limits.streams_per_session == 32 and limits.exec_processes_per_peer == 2 and limits.handshakes == 128


@pytest.mark.parametrize("line, message", [
    ("streams_per_session = 0", "limits.streams_per_session must be a positive integer"),
    ("handshakes = -1", "limits.handshakes must be a positive integer"),
    ('buffered_bytes = "64 MiB"', "limits.buffered_bytes must be a positive integer"),
    ("exec_processes = true", "limits.exec_processes must be a positive integer"),
    ("max_streams = 10", "unknown setting limits.max_streams (known: streams_per_session,"),
])
def test_a_bad_limit_is_a_one_line_error(home: Path, line: str, message: str) -> None:
    write_config(home, f"[limits]\n{line}\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(home)

