"""Spec for the daemon's file-backed stores (daemon/stores.py): every file format and file check.

Identity key files (0600, refused when group/world-readable), known_peers, CA directories,
certificate files and revocation lists. The key model they store is tested in
tests/unit/test_identity.py and tests/unit/test_ca.py without touching a file.
"""

from __future__ import annotations

import ast
import json
import os
import stat
import time
from pathlib import Path

import pytest

from pqtunnel.ca import CaVerifier
from pqtunnel.crypto import CryptographyBackend
from tests.conftest import CountingEntropy
from pqtunnel.errors import (
    CaError,
    CertificateError,
    IdentityError,
    IdentityExistsError,
    InsecureKeyFileError,
    TrustStoreError,
    UserError,
)
from pqtunnel.identity import Identity
from pqtunnel.stores import CaStore, IdentityStore, PinStore
from pqtunnel.trust import PinConflictError
from pqtunneld.stores import (
    KEY_FILE,
    PUB_FILE,
    REVOKED_FILE,
    TRUST_FILE,
    CaDirectory,
    CaFiles,
    IdentityFile,
    KnownPeersFile,
    RevocationFile,
    create_identity,
    load_ca_public,
    load_identity,
    load_trust,
    read_certificate_file,
    write_certificate_file,
)

NOW = 1_800_000_000
LIBRARY = Path(__file__).resolve().parents[2] / "pqtunnel"
PURE_MODULES = ["identity.py", "trust.py", "ca.py", "stores.py", "crypto/__init__.py", "crypto/backend.py",
                "crypto/suites.py", "crypto/oqs_backend.py"]
IO_MODULES = {"os", "stat", "pathlib", "secrets", "time", "json", "socket", "trio", "ctypes", "glob", "importlib",
              "subprocess", "shutil", "tempfile"}


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "node"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CaDirectory:
    return CaDirectory.create(tmp_path_factory.mktemp("ca") / "ca", "corp")


@pytest.fixture(scope="module")
def node() -> Identity:
    return Identity.generate("bob")


# --- the library side stays sans-IO ------------------------------------------------------------------


@pytest.mark.parametrize("module", PURE_MODULES)
def test_the_key_model_modules_import_nothing_that_does_io(module: str) -> None:
    tree = ast.parse((LIBRARY / module).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert not imported & IO_MODULES, f"pqtunnel/{module} imports {sorted(imported & IO_MODULES)}"
    calls = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert "open" not in calls


def test_the_file_stores_implement_the_library_protocols(home: Path, ca: CaDirectory) -> None:
    assert isinstance(IdentityFile(home), IdentityStore)
    assert isinstance(KnownPeersFile(home), PinStore)
    assert isinstance(CaFiles(ca.directory / PUB_FILE, None, ca.revocation_path), CaStore)


# --- identity files ----------------------------------------------------------------------------------


def test_create_identity_writes_an_owner_only_key_file(home: Path) -> None:
    identity = create_identity(home, "Alice")
    assert identity.name == "alice"
    assert mode_of(home / KEY_FILE) == 0o600
    assert mode_of(home) == 0o700
    public = json.loads((home / PUB_FILE).read_text())
    assert public["fingerprint"] == identity.fingerprint and public["name"] == "alice"
    key_text = (home / KEY_FILE).read_text()
    assert all(secret not in json.dumps(public) for secret in json.loads(key_text).values() if isinstance(secret, str)
               and len(secret) > 20)


def test_create_identity_refuses_to_overwrite(home: Path) -> None:
    first = create_identity(home, "alice")
    before = (home / KEY_FILE).read_bytes()
    with pytest.raises(IdentityExistsError, match="refusing to overwrite"):
        create_identity(home, "alice")
    assert (home / KEY_FILE).read_bytes() == before
    assert load_identity(home).fingerprint == first.fingerprint


def test_a_loaded_identity_is_the_created_one(home: Path) -> None:
    created = create_identity(home, "alice")
    loaded = load_identity(home)
    assert loaded == created
    assert loaded.fingerprint == created.fingerprint == load_identity(home).fingerprint
    assert loaded.static_public == created.static_public


def test_the_identity_store_draws_its_seeds_from_the_given_entropy(tmp_path: Path) -> None:
    first = IdentityFile(tmp_path / "a").create("alice", CountingEntropy())
    second = IdentityFile(tmp_path / "b").create("alice", CountingEntropy())
    assert first.fingerprint == second.fingerprint
    assert IdentityFile(tmp_path / "b").load() == first


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o610])
def test_a_key_file_readable_by_others_is_refused(mode: int, home: Path) -> None:
    create_identity(home, "alice")
    os.chmod(home / KEY_FILE, mode)
    with pytest.raises(InsecureKeyFileError) as refused:
        load_identity(home)
    assert "chmod 600" in str(refused.value)
    assert str(home / KEY_FILE) in str(refused.value)
    assert isinstance(refused.value, IdentityError)


def test_a_read_only_owner_key_file_is_accepted(home: Path) -> None:
    created = create_identity(home, "alice")
    os.chmod(home / KEY_FILE, 0o400)
    assert load_identity(home).fingerprint == created.fingerprint


def test_a_missing_home_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="does not exist.*pqtunnel init"):
        load_identity(tmp_path / "nowhere")


def test_a_home_without_an_identity_is_a_clear_error(home: Path) -> None:
    home.mkdir()
    with pytest.raises(IdentityError, match="no identity.*pqtunnel init"):
        load_identity(home)


def _write_key(home: Path, text: str) -> None:
    home.mkdir(exist_ok=True)
    fd = os.open(home / KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


@pytest.mark.parametrize(
    ("contents", "message"),
    [
        ("this is not json", "cannot read"),
        ("", "cannot read"),
        ("[1, 2, 3]", "unknown format"),
        ('{"version": 2}', "unknown format"),
        ('{"version": 1, "name": "alice"}', "malformed"),
    ],
    ids=["not-json", "empty", "not-a-map", "future-version", "missing-fields"],
)
def test_a_malformed_key_file_is_a_clear_error(contents: str, message: str, home: Path) -> None:
    _write_key(home, contents)
    with pytest.raises(IdentityError, match=message) as refused:
        load_identity(home)
    assert str(home / KEY_FILE) in str(refused.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [("ed25519_seed", "not base64!"), ("ed25519_seed", "AAAA"), ("ml_dsa_65_seed", 42), ("x25519_static", None),
     ("name", "-bad-name-"), ("name", 42)],
)
def test_a_key_file_with_a_bad_field_is_a_clear_error(field: str, value, home: Path) -> None:
    create_identity(home, "alice")
    data = json.loads((home / KEY_FILE).read_text())
    data[field] = value
    (home / KEY_FILE).write_text(json.dumps(data))
    with pytest.raises(UserError) as refused:
        load_identity(home)
    assert isinstance(refused.value, IdentityError), f"{field}={value!r} gave {type(refused.value).__name__}: {refused.value}"
    assert "malformed" in str(refused.value)


# --- known_peers ---------------------------------------------------------------------------------------


def test_a_pin_is_written_to_disk_and_reloaded(home: Path, alice: Identity, bob: Identity) -> None:
    home.mkdir()
    store = KnownPeersFile(home)
    assert store.pins() == []
    assert store.add("alice", alice.fingerprint) is True
    assert store.add("Bob", bob.fingerprint.upper()) is True
    reloaded = load_trust(home)
    assert reloaded.fingerprint_for("alice") == alice.fingerprint
    assert reloaded.fingerprint_for("bob") == bob.fingerprint
    assert reloaded.name_for(bob.fingerprint) == "bob"
    assert [p.name for p in reloaded.peers()] == ["alice", "bob"]
    assert mode_of(home / TRUST_FILE) == 0o600


def test_pinning_the_same_fingerprint_again_is_a_no_op(home: Path, alice: Identity) -> None:
    home.mkdir()
    store = KnownPeersFile(home)
    store.add("alice", alice.fingerprint)
    assert store.add("alice", alice.fingerprint) is False
    assert (home / TRUST_FILE).read_text().count(alice.fingerprint) == 1


def test_re_pinning_a_name_to_another_fingerprint_is_refused(home: Path, alice: Identity, mallory: Identity) -> None:
    home.mkdir()
    store = KnownPeersFile(home)
    store.add("alice", alice.fingerprint)
    before = (home / TRUST_FILE).read_text()
    with pytest.raises(TrustStoreError, match="already pinned") as refused:
        store.add("alice", mallory.fingerprint)
    assert isinstance(refused.value, PinConflictError)
    assert str(home / TRUST_FILE) in str(refused.value)
    assert (home / TRUST_FILE).read_text() == before
    assert load_trust(home).fingerprint_for("alice") == alice.fingerprint


def test_pinning_refuses_a_bad_name_or_fingerprint_without_writing(home: Path, alice: Identity) -> None:
    home.mkdir()
    store = KnownPeersFile(home)
    with pytest.raises(UserError):
        store.add("not a name", alice.fingerprint)
    with pytest.raises(IdentityError):
        store.add("alice", "pq1:nonsense")
    assert not (home / TRUST_FILE).exists()


def test_the_trust_file_ignores_comments_and_blank_lines(home: Path, alice: Identity) -> None:
    home.mkdir()
    (home / TRUST_FILE).write_text(f"# pinned peers\n\nalice {alice.fingerprint.upper()}  # laptop\n   \n")
    assert load_trust(home).fingerprint_for("alice") == alice.fingerprint


@pytest.mark.parametrize(
    "line",
    ["alice", "alice pq1:bad", "-alice- {fp}", "alice {fp} extra"],
    ids=["missing-fingerprint", "bad-fingerprint", "bad-name", "extra-field"],
)
def test_a_malformed_trust_file_names_the_line(line: str, home: Path, alice: Identity) -> None:
    home.mkdir()
    (home / TRUST_FILE).write_text(f"# ok\nbob {alice.fingerprint}\n" + line.format(fp=alice.fingerprint) + "\n")
    with pytest.raises(TrustStoreError, match=f"{TRUST_FILE}:3"):
        load_trust(home)


def test_a_missing_trust_file_is_an_empty_store(home: Path) -> None:
    home.mkdir()
    assert load_trust(home).peers() == []


# --- CA directory and certificate files -------------------------------------------------------------------


def test_ca_init_refuses_to_overwrite(ca: CaDirectory) -> None:
    with pytest.raises(CaError, match="already exists"):
        CaDirectory.create(ca.directory, "again")


def test_a_ca_directory_has_an_empty_revocation_list_and_loads_back(ca: CaDirectory) -> None:
    assert (ca.directory / REVOKED_FILE).read_text() == ""
    assert CaDirectory.load(ca.directory).identity == ca.identity


def test_a_directory_without_a_ca_is_a_clear_error_suggesting_ca_init(tmp_path: Path) -> None:
    with pytest.raises(CaError, match=f"no CA key in {tmp_path}; create one with: pqtunnel ca init --name NAME "
                                      f"--ca-dir {tmp_path}$"):
        CaDirectory.load(tmp_path)
    with pytest.raises(CaError, match=f"CA directory {tmp_path / 'missing'} does not exist; create one with: "
                                      "pqtunnel ca init"):
        CaDirectory.load(tmp_path / "missing")


def test_the_ca_public_key_file_round_trips_and_must_match_its_fingerprint(ca: CaDirectory, tmp_path: Path) -> None:
    assert load_ca_public(ca.directory / PUB_FILE) == ca.identity.public
    data = json.loads((ca.directory / PUB_FILE).read_text())
    data["fingerprint"] = Identity.generate("other").fingerprint
    forged = tmp_path / "forged.pub"
    forged.write_text(json.dumps(data))
    with pytest.raises(CaError, match="does not match its stated fingerprint"):
        load_ca_public(forged)
    with pytest.raises(CaError, match="cannot read CA public key"):
        load_ca_public(tmp_path / "missing.pub")


def test_armored_files_round_trip_and_bad_files_are_clear_errors(ca: CaDirectory, node: Identity,
                                                                 tmp_path: Path) -> None:
    cert = ca.sign("bob", node.fingerprint, not_before=NOW, not_after=NOW + 60)
    path = tmp_path / "node.cert"
    write_certificate_file(path, cert)
    assert read_certificate_file(path).serial == cert.serial
    path.write_text("-----BEGIN PQTUNNEL CERTIFICATE-----\nnot base64!\n")
    with pytest.raises(CaError, match="not a pqtunnel certificate") as refused:
        read_certificate_file(path)
    assert str(path) in str(refused.value)
    with pytest.raises(CaError, match="cannot read certificate"):
        read_certificate_file(tmp_path / "missing.cert")


def test_revoke_appends_once_and_refuses_a_non_serial(ca: CaDirectory) -> None:
    serial = "ab" * 16
    assert ca.revoke(serial.upper()) is True
    assert ca.revoke(serial) is False
    assert (ca.directory / REVOKED_FILE).read_text().count(serial) == 1
    with pytest.raises(CaError, match="not a certificate serial"):
        ca.revoke("12345")


# --- the revocation list a node checks ----------------------------------------------------------------------


def test_a_revoked_certificate_is_refused_even_while_running(ca: CaDirectory, node: Identity) -> None:
    cert = ca.sign("bob", node.fingerprint, not_before=NOW - 10, not_after=NOW + 3600)
    store = CaFiles(ca.directory / PUB_FILE, None, ca.revocation_path)
    checker = CaVerifier(store.ca_public(), CryptographyBackend(), store.revoked)
    assert checker.verify(cert.encode(), node.fingerprint, NOW).serial == cert.serial
    time.sleep(0.01)  # a distinct mtime for the edited list
    assert ca.revoke(cert.serial) is True
    assert ca.revoke(cert.serial) is False
    with pytest.raises(CertificateError, match="revoked"):
        checker.verify(cert.encode(), node.fingerprint, NOW)


def test_a_revocation_list_that_vanishes_fails_closed(tmp_path: Path, ca: CaDirectory, node: Identity) -> None:
    path = tmp_path / "revoked"
    path.write_text("# nothing revoked yet\n")
    revocations = RevocationFile(path)
    assert revocations.revoked() == frozenset()
    checker = CaVerifier(ca.identity.public, CryptographyBackend(), revocations.revoked)
    cert = ca.sign("bob", node.fingerprint, not_before=NOW - 10, not_after=NOW + 3600).encode()
    assert checker.verify(cert, node.fingerprint, NOW).name == "bob"
    path.unlink()
    with pytest.raises(CertificateError, match="missing: refusing CA certificates"):
        checker.verify(cert, node.fingerprint, NOW)


def test_a_configured_revocation_list_must_exist_at_start(tmp_path: Path, ca: CaDirectory) -> None:
    with pytest.raises(CaError, match="does not exist"):
        CaFiles(ca.directory / PUB_FILE, None, tmp_path / "revoked")
    assert CaFiles(None, None, tmp_path / "revoked").revoked() == frozenset()  # no CA: the list is unused


def test_revocation_lists_ignore_comments_blank_lines_and_case(tmp_path: Path) -> None:
    path = tmp_path / "revoked"
    path.write_text(f"# revoked\n\n{'AB' * 16}  # lost laptop\n{'cd' * 16}\n")
    assert RevocationFile(path).revoked() == {"ab" * 16, "cd" * 16}


def test_ca_files_without_settings_are_empty(ca: CaDirectory) -> None:
    store = CaFiles(None)
    assert store.ca_public() is None and store.own_certificate() is None and store.revoked() == frozenset()
