"""The transition-record vector reproduced from docs/PROTOCOL.md's layout (not from the code's
helpers): the body is the documented msgpack map, the classical signature is Ed25519 over
the classical label and the body, both ML-DSA/Ed25519 halves verify over the hybrid label."""

from __future__ import annotations

import json

import msgpack
from cryptography.hazmat.primitives import serialization

from pqtunnel.crypto.backend import CryptographyBackend, ed25519_verify, sha256
from pqtunnel.identity import MLDSA_CONTEXT
from pqtunnel.transition import verify_transition
from tests.vectors.transition_vectors import INPUTS, TRANSITION_VECTOR, generate, host_key, identity

VECTOR = json.loads(TRANSITION_VECTOR.read_text())


def test_the_body_is_the_documented_msgpack_map_byte_for_byte() -> None:
    node = identity()
    spki = host_key().public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    hashes = {alg: sha256(key) for alg, key in node.public.pq_keys.items()}
    body = msgpack.packb({"v": 1, "kind": "ssh", "name": INPUTS["name"], "fp": VECTOR["fingerprint"], "key": spki,
                          "nb": INPUTS["not_before"], "na": INPUTS["not_after"], "ed": node.public.ed25519,
                          "h": hashes, "pq": node.public.pq_keys["ML-DSA-65"]}, use_bin_type=True)
    assert body.hex() == VECTOR["body"] == generate()["body"]
    assert node.fingerprint == VECTOR["fingerprint"]


def test_the_classical_signature_is_ed25519_over_the_classical_label_and_body() -> None:
    body = bytes.fromhex(VECTOR["body"])
    signature = host_key().sign(b"pqtunnel/1 transition classical\x00" + body)
    assert signature.hex() == VECTOR["classical_signature"] == generate()["classical_signature"]


def test_the_recorded_record_carries_both_hybrid_halves_and_verifies() -> None:
    record = bytes.fromhex(VECTOR["record"])
    outer = msgpack.unpackb(record, raw=False)
    assert outer["body"].hex() == VECTOR["body"]
    message = b"pqtunnel/1 transition hybrid\x00" + outer["body"]
    node = identity()
    assert ed25519_verify(node.public.ed25519, outer["sig"]["ed"], message)
    assert CryptographyBackend().mldsa_verify("ML-DSA-65", node.public.pq_keys["ML-DSA-65"], outer["sig"]["pq"],
                                              message, MLDSA_CONTEXT)
    assert verify_transition(record, VECTOR["fingerprint"], INPUTS["not_before"], CryptographyBackend()).name == "bob"
