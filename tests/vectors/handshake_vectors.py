"""Deterministic pqtunnel handshake vectors: generate them, and replay them byte for byte.

ML-KEM encapsulation and ML-DSA signing are randomised, so a vector records their outputs;
replaying injects the recorded values (after checking them with the real primitives:
the ciphertext must decapsulate to the recorded secret, the signature must verify).
Run ``python3 -m tests.vectors.handshake_vectors`` to regenerate the JSON files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pqtunnel.crypto.backend import CryptographyBackend
from pqtunnel.crypto.suites import SUITES, suite_by_name
from pqtunnel.handshake import Entropy, HandshakeConfig, InitiatorHandshake, ResponderHandshake
from pqtunnel.identity import Identity
from pqtunnel.wire import FrameDecoder

HERE = Path(__file__).parent
TIMESTAMP_MS = 1_795_000_000_000


def fixed_identity(name: str, fill: int) -> Identity:
    return Identity(name=name, ed25519_seed=bytes([fill]) * 32,
                    pq_seeds={"ML-DSA-65": bytes([fill + 1]) * 32, "ML-DSA-87": bytes([fill + 2]) * 32},
                    x25519_static=bytes([fill + 3]) * 32)


class FixedEntropy(Entropy):
    def __init__(self, x25519: bytes, kem_seed: bytes) -> None:
        self._x25519, self._kem_seed = x25519, kem_seed

    def x25519_private(self) -> bytes:
        return self._x25519

    def kem_seed(self) -> bytes:
        return self._kem_seed


class RecordingBackend(CryptographyBackend):
    """Real primitives, remembering the randomised outputs for the vector."""

    def __init__(self) -> None:
        self.encapsulations: list[tuple[bytes, bytes]] = []
        self.signatures: list[bytes] = []

    def kem_encapsulate(self, algorithm: str, public_key: bytes) -> tuple[bytes, bytes]:
        result = super().kem_encapsulate(algorithm, public_key)
        self.encapsulations.append(result)
        return result

    def mldsa_sign(self, algorithm: str, seed: bytes, message: bytes, context: bytes) -> bytes:
        signature = super().mldsa_sign(algorithm, seed, message, context)
        self.signatures.append(signature)
        return signature


class ReplayingBackend(CryptographyBackend):
    """Returns recorded encapsulations and signatures, after checking they are genuine."""

    def __init__(self, encapsulations: list[tuple[bytes, bytes]], signatures: list[bytes]) -> None:
        self.encapsulations = list(encapsulations)
        self.signatures = list(signatures)

    def kem_encapsulate(self, algorithm: str, public_key: bytes) -> tuple[bytes, bytes]:
        return self.encapsulations.pop(0)

    def mldsa_sign(self, algorithm: str, seed: bytes, message: bytes, context: bytes) -> bytes:
        signature = self.signatures.pop(0)
        public = self.mldsa_public_key(algorithm, seed)
        if not self.mldsa_verify(algorithm, public, signature, message, context):
            raise AssertionError("recorded signature does not verify over this transcript")
        return signature


def run_handshake(suite_name: str, backend_i: CryptographyBackend, backend_r: CryptographyBackend) -> dict[str, Any]:
    suite = suite_by_name(suite_name)
    config = HandshakeConfig(allowed_suites=(suite,))
    alice, bob = fixed_identity("alice", 0x10), fixed_identity("bob", 0x20)
    initiator = InitiatorHandshake(alice, lambda peer: "bob", config=config, backend=backend_i,
                                   entropy=FixedEntropy(bytes([0x41]) * 32, bytes([0x42]) * 64))
    responder = ResponderHandshake(bob, lambda peer: "alice", peer_address="192.0.2.1", config=config,
                                   backend=backend_r, entropy=FixedEntropy(bytes([0x51]) * 32, bytes([0x52]) * 64))
    messages = [initiator.start(TIMESTAMP_MS)]
    decoder = FrameDecoder()
    (hello,) = decoder.feed(messages[0])
    messages.append(responder.receive(hello, TIMESTAMP_MS).to_send)
    (response,) = decoder.feed(messages[1])
    step_i = initiator.receive(response, TIMESTAMP_MS)
    messages.append(step_i.to_send)
    (finish,) = decoder.feed(messages[2])
    step_r = responder.receive(finish, TIMESTAMP_MS)
    assert step_i.result is not None and step_r.result is not None
    return {
        "protocol_name": suite.noise_name.decode(),
        "suite": suite.name,
        "timestamp_ms": TIMESTAMP_MS,
        "messages": [m.hex() for m in messages],
        "handshake_hash": step_i.result.handshake_hash.hex(),
        "responder_handshake_hash": step_r.result.handshake_hash.hex(),
        "session_id": step_i.result.session_id.hex(),
        "initiator_to_responder_key": step_i.result.send_key.hex(),
        "responder_to_initiator_key": step_i.result.recv_key.hex(),
        "initiator_fingerprint": alice.fingerprint,
        "responder_fingerprint": bob.fingerprint,
    }


def generate(suite_name: str) -> dict[str, Any]:
    recorder = RecordingBackend()
    vector = run_handshake(suite_name, recorder, recorder)
    # Recording is interleaved: responder encapsulates and signs, then the initiator signs.
    vector["encapsulations"] = [[ss.hex(), ct.hex()] for ss, ct in recorder.encapsulations]
    vector["signatures"] = [s.hex() for s in recorder.signatures]
    return vector


def replay(vector: dict[str, Any]) -> dict[str, Any]:
    encapsulations = [(bytes.fromhex(ss), bytes.fromhex(ct)) for ss, ct in vector["encapsulations"]]
    signatures = [bytes.fromhex(s) for s in vector["signatures"]]
    backend = ReplayingBackend(encapsulations, signatures)
    return run_handshake(vector["suite"], backend, backend)


def vector_path(suite_name: str) -> Path:
    return HERE / f"handshake_{suite_name.replace('-', '_')}.json"


if __name__ == "__main__":
    for name in SUITES:
        vector_path(name).write_text(json.dumps(generate(name), indent=1) + "\n")
        print("wrote", vector_path(name))
