"""Spec for the key model (pqtunnel/identity.py) and the pin table (pqtunnel/trust.py), without files.

The files they are stored in are specified in tests/unit/test_stores.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pqtunnel.crypto import CryptographyBackend
from tests.conftest import CountingEntropy
from pqtunnel.errors import IdentityError, TrustStoreError, UntrustedPeerError, UserError
from pqtunnel.identity import FINGERPRINT_PREFIX, Identity, normalise_fingerprint
from pqtunnel.trust import PinConflictError, TrustedPeer, TrustStore


# --- generating ------------------------------------------------------------------------------------------


def test_generate_draws_every_seed_from_the_injected_entropy() -> None:
    entropy = CountingEntropy()
    identity = Identity.generate("Alice", entropy)
    assert entropy.draws == 4  # Ed25519, ML-DSA-65, ML-DSA-87, X25519
    assert identity.name == "alice"
    assert {identity.ed25519_seed, identity.x25519_static, *identity.pq_seeds.values()} == {
        bytes([n]) * 32 for n in (1, 2, 3, 4)}
    assert Identity.generate("alice", CountingEntropy()) == identity


def test_public_keys_are_derived_with_the_given_backend() -> None:
    class CountingBackend(CryptographyBackend):
        derived = 0

        def mldsa_public_key(self, algorithm: str, seed: bytes) -> bytes:
            CountingBackend.derived += 1
            return super().mldsa_public_key(algorithm, seed)

    identity = Identity.generate("alice", CountingEntropy(), backend=CountingBackend())
    assert CountingBackend.derived == 2
    assert identity.fingerprint == Identity.generate("alice", CountingEntropy()).fingerprint


def test_generate_refuses_a_bad_name() -> None:
    with pytest.raises(UserError):
        Identity.generate("-bad-name-", CountingEntropy())


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


def test_pinning_in_memory_returns_whether_the_pin_is_new(alice: Identity) -> None:
    store = TrustStore()
    assert store.pin("Alice", alice.fingerprint.upper()) is True
    assert store.pin("alice", alice.fingerprint) is False
    assert store.peers() == [TrustedPeer("alice", alice.fingerprint)]


def test_re_pinning_a_name_in_memory_is_refused(alice: Identity, mallory: Identity) -> None:
    store = TrustStore({"alice": alice.fingerprint})
    with pytest.raises(TrustStoreError, match="already pinned") as refused:
        store.pin("alice", mallory.fingerprint)
    assert isinstance(refused.value, PinConflictError)
    assert store.fingerprint_for("alice") == alice.fingerprint


def test_a_table_from_stored_pins_lets_later_pins_win(alice: Identity, bob: Identity) -> None:
    store = TrustStore.from_peers([TrustedPeer("alice", bob.fingerprint), TrustedPeer("alice", alice.fingerprint)])
    assert store.fingerprint_for("alice") == alice.fingerprint
