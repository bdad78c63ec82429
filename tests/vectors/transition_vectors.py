"""The transition-record vector (docs/PROTOCOL.md, "Transition records"): fixed seeds for the
node's identity and its Ed25519 host key, fixed times. The body and the classical Ed25519
signature are deterministic and reproduced byte for byte; ML-DSA signing is randomised, so
the vector records the complete record, whose signatures must verify. Run
``python3 -m tests.vectors.transition_vectors`` to regenerate ``transition_ssh_ed25519.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from pqtunnel.crypto.backend import CryptographyBackend
from pqtunnel.identity import Identity

HERE = Path(__file__).resolve().parent
TRANSITION_VECTOR = HERE / "transition_ssh_ed25519.json"
INPUTS: dict[str, Any] = {
    "name": "bob",
    "ed25519_seed": "01" * 32,
    "mldsa65_seed": "02" * 32,
    "mldsa87_seed": "03" * 32,
    "x25519_static": "04" * 32,
    "host_key_seed": "05" * 32,
    "not_before": 1_800_000_000,
    "not_after": 1_831_536_000,
}


def identity() -> Identity:
    return Identity(name=INPUTS["name"], ed25519_seed=bytes.fromhex(INPUTS["ed25519_seed"]),
                    pq_seeds={"ML-DSA-65": bytes.fromhex(INPUTS["mldsa65_seed"]),
                              "ML-DSA-87": bytes.fromhex(INPUTS["mldsa87_seed"])},
                    x25519_static=bytes.fromhex(INPUTS["x25519_static"]))


def host_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(INPUTS["host_key_seed"]))


def generate() -> dict[str, Any]:
    from pqtunnel.transition import make_transition

    node = identity()
    record = make_transition(node, host_key(), CryptographyBackend(), kind="ssh",
                             not_before=INPUTS["not_before"], not_after=INPUTS["not_after"])
    return {"inputs": INPUTS, "fingerprint": node.fingerprint, "body": record.body.hex(),
            "classical_signature": record.signature["classical"].hex(), "record": record.encode().hex()}


if __name__ == "__main__":
    TRANSITION_VECTOR.write_text(json.dumps(generate(), indent=1) + "\n")
