"""Spec for node identities on disk (pqtunnel/identity.py) and pinned trust (pqtunnel/trust.py)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pqtunnel.errors import (
    IdentityError,
    IdentityExistsError,
    InsecureKeyFileError,
    TrustStoreError,
    UntrustedPeerError,
    UserError,
)
from pqtunnel.identity import (
    FINGERPRINT_PREFIX,
    KEY_FILE,
    PUB_FILE,
    Identity,
    create_identity,
    load_identity,
    normalise_fingerprint,
)
from pqtunnel.trust import TRUST_FILE, TrustStore


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "node"


# --- creating and loading ------------------------------------------------------------------------------


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


# --- fingerprints -----------------------------------------------------------------------------------------


def test_fingerprints_differ_between_identities_and_have_the_documented_form(alice: Identity, bob: Identity) -> None:
    assert alice.fingerprint != bob.fingerprint
    for fingerprint in (alice.fingerprint, bob.fingerprint):
        assert fingerprint.startswith(FINGERPRINT_PREFIX) and len(fingerprint) == len(FINGERPRINT_PREFIX) + 32
        assert normalise_fingerprint(fingerprint) == fingerprint


def test_a_fingerprint_commits_to_every_public_signing_key(alice: Identity) -> None:
    """Changing any one seed (Ed25519, ML-DSA-65, ML-DSA-87) changes the fingerprint."""
    base = dict(name=alice.name, ed25519_seed=alice.ed25519_seed, pq_seeds=dict(alice.pq_seeds),
                x25519_static=alice.x25519_static)
    assert Identity(**base).fingerprint == alice.fingerprint
    assert Identity(**{**base, "ed25519_seed": bytes(32)}).fingerprint != alice.fingerprint
    for algorithm in ("ML-DSA-65", "ML-DSA-87"):
        seeds = {**alice.pq_seeds, algorithm: bytes(32)}
        assert Identity(**{**base, "pq_seeds": seeds}).fingerprint != alice.fingerprint


def test_a_fingerprint_is_normalised_to_lower_case_without_whitespace(alice: Identity) -> None:
    assert normalise_fingerprint(f"  {alice.fingerprint.upper()}\n") == alice.fingerprint


@pytest.mark.parametrize(
    "text",
    ["", "pq1:", "pq1:" + "a" * 31, "pq1:" + "a" * 33, "pq2:" + "a" * 32, "a" * 36, "pq1:" + "1" * 32,
     "pq1:" + "a" * 31 + "!", "pq1 " + "a" * 32, "pq1:" + "a" * 16 + " " + "a" * 15],
    ids=["empty", "prefix-only", "short", "long", "wrong-prefix", "no-prefix", "not-base32", "punctuation",
         "space-instead-of-colon", "inner-space"],
)
def test_normalise_fingerprint_rejects_garbage(text: str) -> None:
    with pytest.raises(IdentityError, match="not a pqtunnel fingerprint"):
        normalise_fingerprint(text)


@given(st.text(max_size=60))
def test_normalise_fingerprint_either_returns_a_canonical_fingerprint_or_refuses(text: str) -> None:
    try:
        value = normalise_fingerprint(text)
    except IdentityError:
        return
    assert value.startswith(FINGERPRINT_PREFIX) and len(value) == 36
    assert set(value[4:]) <= set("abcdefghijklmnopqrstuvwxyz234567")
    assert normalise_fingerprint(value) == value


# --- trust store ------------------------------------------------------------------------------------------


def test_a_pin_is_written_to_disk_and_reloaded(home: Path, alice: Identity, bob: Identity) -> None:
    home.mkdir()
    store = TrustStore.load(home)
    assert store.peers() == []
    assert store.pin("alice", alice.fingerprint) is True
    assert store.pin("Bob", bob.fingerprint.upper()) is True
    reloaded = TrustStore.load(home)
    assert reloaded.fingerprint_for("alice") == alice.fingerprint
    assert reloaded.fingerprint_for("bob") == bob.fingerprint
    assert reloaded.name_for(bob.fingerprint) == "bob"
    assert [p.name for p in reloaded.peers()] == ["alice", "bob"]
    assert mode_of(home / TRUST_FILE) == 0o600


def test_pinning_the_same_fingerprint_again_is_a_no_op(home: Path, alice: Identity) -> None:
    home.mkdir()
    store = TrustStore.load(home)
    store.pin("alice", alice.fingerprint)
    assert store.pin("alice", alice.fingerprint) is False
    assert (home / TRUST_FILE).read_text().count(alice.fingerprint) == 1


def test_re_pinning_a_name_to_another_fingerprint_is_refused(home: Path, alice: Identity, mallory: Identity) -> None:
    home.mkdir()
    store = TrustStore.load(home)
    store.pin("alice", alice.fingerprint)
    before = (home / TRUST_FILE).read_text()
    with pytest.raises(TrustStoreError, match="already pinned"):
        store.pin("alice", mallory.fingerprint)
    assert (home / TRUST_FILE).read_text() == before
    assert TrustStore.load(home).fingerprint_for("alice") == alice.fingerprint
    assert store.fingerprint_for("alice") == alice.fingerprint


def test_pinning_refuses_a_bad_name_or_fingerprint(alice: Identity) -> None:
    store = TrustStore()
    with pytest.raises(UserError):
        store.pin("not a name", alice.fingerprint)
    with pytest.raises(IdentityError):
        store.pin("alice", "pq1:nonsense")
    assert store.peers() == []


def test_require_enforces_the_pin_for_a_dialled_name(alice: Identity, mallory: Identity) -> None:
    store = TrustStore({"alice": alice.fingerprint})
    assert store.require(alice.fingerprint, "alice") == "alice"
    with pytest.raises(UntrustedPeerError, match="is pinned"):
        store.require(mallory.fingerprint, "alice")  # someone else answering as alice
    with pytest.raises(UntrustedPeerError, match="no pinned fingerprint"):
        store.require(alice.fingerprint, "carol")  # a name we never pinned, even for a known key


def test_require_without_a_dialled_name_looks_the_peer_up_by_fingerprint(alice: Identity, mallory: Identity) -> None:
    store = TrustStore({"alice-laptop": alice.fingerprint})
    assert store.require(alice.fingerprint, None) == "alice-laptop"
    with pytest.raises(UntrustedPeerError, match="not pinned"):
        store.require(mallory.fingerprint, None)


def test_the_trust_file_ignores_comments_and_blank_lines(home: Path, alice: Identity) -> None:
    home.mkdir()
    (home / TRUST_FILE).write_text(f"# pinned peers\n\nalice {alice.fingerprint.upper()}  # laptop\n   \n")
    store = TrustStore.load(home)
    assert store.fingerprint_for("alice") == alice.fingerprint


@pytest.mark.parametrize(
    "line",
    ["alice", "alice pq1:bad", "-alice- {fp}", "alice {fp} extra"],
    ids=["missing-fingerprint", "bad-fingerprint", "bad-name", "extra-field"],
)
def test_a_malformed_trust_file_names_the_line(line: str, home: Path, alice: Identity) -> None:
    home.mkdir()
    (home / TRUST_FILE).write_text(f"# ok\nbob {alice.fingerprint}\n" + line.format(fp=alice.fingerprint) + "\n")
    with pytest.raises(TrustStoreError, match=f"{TRUST_FILE}:3"):
        TrustStore.load(home)


def test_a_missing_trust_file_is_an_empty_store(home: Path) -> None:
    home.mkdir()
    assert TrustStore.load(home).peers() == []
