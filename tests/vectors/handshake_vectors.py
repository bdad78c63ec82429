"""Deterministic pqtunnel vectors: generate them, and replay them byte for byte.

* ``handshake_{classical,hybrid,pq_strong}.json``: one complete handshake per suite;
* ``handshake_hybrid_retry.json``: a hybrid handshake with a RETRY (cookie) in the middle,
  the initiator's two ML-KEM keys from seeds whose halves differ (d != z);
* ``rekey_hybrid.json``: the hybrid handshake's session, key confirmation, one in-band
  rekey (docs/PROTOCOL.md 5.1) and a DATA record each way under the new keys.

ML-KEM encapsulation and ML-DSA signing are randomised, so a vector records their outputs;
replaying injects the recorded values (after checking them with the real primitives:
a signature must verify, and a recorded encapsulation that does not match the key it is
for makes the peer derive other keys, so the replay fails). Entropy is a fixed sequence
per side; a draw beyond it fails, which proves for instance that the responder never uses
an ML-KEM seed. Run ``python3 -m tests.vectors.handshake_vectors`` to regenerate the files
(new randomness: every hash in docs/PROTOCOL.md then changes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pqtunnel.crypto.backend import CryptographyBackend, sha256
from pqtunnel.crypto.suites import HYBRID, SUITES, suite_by_name
from pqtunnel.handshake import CookieJar, Entropy, HandshakeConfig, InitiatorHandshake, ResponderHandshake
from pqtunnel.identity import Identity
from pqtunnel.session import Session
from pqtunnel.wire import FrameDecoder

HERE = Path(__file__).parent
TIMESTAMP_MS = 1_795_000_000_000
RETRY_MS = TIMESTAMP_MS + 7
"""When the initiator receives the RETRY and sends its second HELLO (wall clock)."""
PEER_ADDRESS = "192.0.2.1"
COOKIE_SECRET = bytes([0x60]) * 32
SESSION_MS = 1_000
"""The monotonic clock of the rekey vector (it appears in the PING record)."""


def fill(byte: int, size: int = 32) -> bytes:
    return bytes([byte]) * size


def fixed_identity(name: str, filler: int) -> Identity:
    return Identity(name=name, ed25519_seed=fill(filler),
                    pq_seeds={"ML-DSA-65": fill(filler + 1), "ML-DSA-87": fill(filler + 2)},
                    x25519_static=fill(filler + 3))


INITIATOR_E = fill(0x41)
INITIATOR_KEM_SEED = fill(0x42, 64)
RESPONDER_E = fill(0x51)
RETRY_KEM_SEEDS = (fill(0x42) + fill(0x43), fill(0x44) + fill(0x45))
"""d || z for the first and the retried HELLO's ML-KEM key: d != z, so a swap is caught."""
REKEY_INITIATOR_E = fill(0x61)
REKEY_KEM_SEED = fill(0x62) + fill(0x63)
REKEY_RESPONDER_E = fill(0x71)


class SequenceEntropy(Entropy):
    """Hands out the given X25519 keys and ML-KEM seeds in order, and nothing more."""

    def __init__(self, x25519: list[bytes], kem_seeds: list[bytes]) -> None:
        self._x25519, self._kem_seeds = list(x25519), list(kem_seeds)

    def x25519_private(self) -> bytes:
        if not self._x25519:
            raise AssertionError("an X25519 key was drawn that the vector does not define")
        return self._x25519.pop(0)

    def kem_seed(self) -> bytes:
        if not self._kem_seeds:
            raise AssertionError("an ML-KEM seed was drawn that the vector does not define")
        return self._kem_seeds.pop(0)

    def random_bytes(self, size: int) -> bytes:
        raise AssertionError("the vectors use no other randomness")


class RecordingBackend(CryptographyBackend):
    """Real primitives, remembering the randomised outputs for the vector; optionally replaying
    a recorded prefix first (the rekey vector reuses the hybrid vector's handshake)."""

    def __init__(self, encapsulations: list[tuple[bytes, bytes]] | None = None,
                 signatures: list[bytes] | None = None) -> None:
        self._replay_encapsulations = list(encapsulations or [])
        self._replay_signatures = list(signatures or [])
        self.encapsulations: list[tuple[bytes, bytes]] = []
        self.signatures: list[bytes] = []

    def kem_encapsulate(self, algorithm: str, public_key: bytes) -> tuple[bytes, bytes]:
        if self._replay_encapsulations:
            result = self._replay_encapsulations.pop(0)
        else:
            result = super().kem_encapsulate(algorithm, public_key)
        self.encapsulations.append(result)
        return result

    def mldsa_sign(self, algorithm: str, seed: bytes, message: bytes, context: bytes) -> bytes:
        if self._replay_signatures:
            signature = self._replay_signatures.pop(0)
        else:
            signature = super().mldsa_sign(algorithm, seed, message, context)
        self.signatures.append(signature)
        return signature


class ReplayingBackend(CryptographyBackend):
    """Returns recorded encapsulations and signatures, after checking the signatures verify."""

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


def _pair(suite_name: str, backend_i: CryptographyBackend, backend_r: CryptographyBackend, *,
          initiator_entropy: SequenceEntropy, responder_entropy: SequenceEntropy,
          **responder_kwargs: Any) -> tuple[InitiatorHandshake, ResponderHandshake]:
    config = HandshakeConfig(allowed_suites=(suite_by_name(suite_name),))
    alice, bob = fixed_identity("alice", 0x10), fixed_identity("bob", 0x20)
    initiator = InitiatorHandshake(alice, lambda peer: "bob", config=config, backend=backend_i,
                                   entropy=initiator_entropy)
    responder = ResponderHandshake(bob, lambda peer: "alice", peer_address=PEER_ADDRESS, config=config,
                                   backend=backend_r, entropy=responder_entropy, **responder_kwargs)
    return initiator, responder


def _summary(suite_name: str, messages: list[bytes], step_i: Any, step_r: Any) -> dict[str, Any]:
    assert step_i.result is not None and step_r.result is not None
    result = step_i.result
    return {
        "protocol_name": result.suite.noise_name.decode(),
        "suite": suite_name,
        "timestamp_ms": TIMESTAMP_MS,
        "messages": [m.hex() for m in messages],
        "handshake_hash": result.handshake_hash.hex(),
        "responder_handshake_hash": step_r.result.handshake_hash.hex(),
        "session_id": result.session_id.hex(),
        "initiator_to_responder_key": result.send_key.hex(),
        "responder_to_initiator_key": result.recv_key.hex(),
        "rekey_chain": result.rekey_chain.hex(),
        "initiator_fingerprint": fixed_identity("alice", 0x10).fingerprint,
        "responder_fingerprint": fixed_identity("bob", 0x20).fingerprint,
    }


def run_handshake(suite_name: str, backend_i: CryptographyBackend, backend_r: CryptographyBackend) -> dict[str, Any]:
    initiator, responder = _pair(suite_name, backend_i, backend_r,
                                 initiator_entropy=SequenceEntropy([INITIATOR_E], [INITIATOR_KEM_SEED]),
                                 responder_entropy=SequenceEntropy([RESPONDER_E], []))
    messages = [initiator.start(TIMESTAMP_MS)]
    decoder = FrameDecoder()
    (hello,) = decoder.feed(messages[0])
    messages.append(responder.receive(hello, TIMESTAMP_MS).to_send)
    (response,) = decoder.feed(messages[1])
    step_i = initiator.receive(response, TIMESTAMP_MS)
    messages.append(step_i.to_send)
    (finish,) = decoder.feed(messages[2])
    step_r = responder.receive(finish, TIMESTAMP_MS)
    return _summary(suite_name, messages, step_i, step_r)


def run_retry_handshake(backend_i: CryptographyBackend, backend_r: CryptographyBackend) -> dict[str, Any]:
    """HELLO, RETRY (the responder requires a cookie), HELLO again (same e, new ML-KEM key,
    the cookie echoed), RESPONSE, FINISH."""
    initiator, responder = _pair("hybrid", backend_i, backend_r,
                                 initiator_entropy=SequenceEntropy([INITIATOR_E], list(RETRY_KEM_SEEDS)),
                                 responder_entropy=SequenceEntropy([RESPONDER_E], []),
                                 cookies=CookieJar(COOKIE_SECRET), require_cookie=True)
    decoder = FrameDecoder()
    messages = [initiator.start(TIMESTAMP_MS)]
    messages.append(responder.receive(decoder.feed(messages[-1])[0], TIMESTAMP_MS).to_send)  # RETRY
    messages.append(initiator.receive(decoder.feed(messages[-1])[0], RETRY_MS).to_send)  # HELLO with cookie
    messages.append(responder.receive(decoder.feed(messages[-1])[0], RETRY_MS).to_send)  # RESPONSE
    step_i = initiator.receive(decoder.feed(messages[-1])[0], RETRY_MS)
    messages.append(step_i.to_send)  # FINISH
    step_r = responder.receive(decoder.feed(messages[-1])[0], RETRY_MS)
    vector = _summary("hybrid", messages, step_i, step_r)
    vector.update(retry_ms=RETRY_MS, peer_address=PEER_ADDRESS, cookie_secret=COOKIE_SECRET.hex(),
                  kem_seeds=[seed.hex() for seed in RETRY_KEM_SEEDS])
    return vector


def run_rekey(backend_i: CryptographyBackend, backend_r: CryptographyBackend) -> dict[str, Any]:
    """The hybrid vector's handshake through two Sessions, then every record both ways:
    key confirmation (PING, PONG), one rekey started by the initiator, DATA each way."""
    initiator, responder = _pair("hybrid", backend_i, backend_r,
                                 initiator_entropy=SequenceEntropy([INITIATOR_E, REKEY_INITIATOR_E],
                                                                   [INITIATOR_KEM_SEED, REKEY_KEM_SEED]),
                                 responder_entropy=SequenceEntropy([RESPONDER_E, REKEY_RESPONDER_E], []))
    a, b = Session(initiator, now_ms=SESSION_MS), Session(responder, now_ms=SESSION_MS)
    a.start(SESSION_MS, TIMESTAMP_MS)
    b.receive_data(a.data_to_send(), SESSION_MS, TIMESTAMP_MS)
    a.receive_data(b.data_to_send(), SESSION_MS, TIMESTAMP_MS)
    b.receive_data(a.data_to_send(), SESSION_MS, TIMESTAMP_MS)
    records: list[tuple[str, bytes]] = []

    def deliver(sender: Session, receiver: Session) -> None:
        data = sender.data_to_send()
        records.append(("I" if sender is a else "R", data))
        receiver.receive_data(data, SESSION_MS)

    deliver(b, a)  # PING: the responder's first record confirms the keys
    deliver(a, b)  # PONG
    chain = a.result.rekey_chain if a.result else b""
    a.start_rekey(SESSION_MS)
    deliver(a, b)  # REKEY_INIT
    deliver(b, a)  # REKEY_RESP (under B's old send key; B then switches)
    deliver(a, b)  # REKEY_DONE (under A's old send key; A then switches)
    a.send(b"hello", SESSION_MS)
    deliver(a, b)
    b.send(b"hi", SESSION_MS)
    deliver(b, a)
    assert a.epoch == b.epoch == 1
    return {
        "suite": "hybrid",
        "session_ms": SESSION_MS,
        "rekey_chain": chain.hex(),
        "initiator_rekey_x25519": REKEY_INITIATOR_E.hex(),
        "initiator_rekey_kem_seed": REKEY_KEM_SEED.hex(),
        "responder_rekey_x25519": REKEY_RESPONDER_E.hex(),
        "new_rekey_chain": a._chain.hex(),
        "records": [[sender, data.hex()] for sender, data in records],
    }


def generate(suite_name: str) -> dict[str, Any]:
    recorder = RecordingBackend()
    vector = run_handshake(suite_name, recorder, recorder)
    return _with_randomness(vector, recorder)


def generate_retry() -> dict[str, Any]:
    recorder = RecordingBackend()
    return _with_randomness(run_retry_handshake(recorder, recorder), recorder)


def generate_rekey(hybrid: dict[str, Any]) -> dict[str, Any]:
    """Reuses the hybrid vector's recorded handshake randomness, records the rekey's."""
    recorder = RecordingBackend(*_randomness(hybrid))
    return _with_randomness(run_rekey(recorder, recorder), recorder)


def _with_randomness(vector: dict[str, Any], recorder: RecordingBackend) -> dict[str, Any]:
    # Interleaved in call order: the responder encapsulates and signs, then the initiator signs.
    vector["encapsulations"] = [[ss.hex(), ct.hex()] for ss, ct in recorder.encapsulations]
    vector["signatures"] = [s.hex() for s in recorder.signatures]
    return vector


def _randomness(vector: dict[str, Any]) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
    encapsulations = [(bytes.fromhex(ss), bytes.fromhex(ct)) for ss, ct in vector["encapsulations"]]
    return encapsulations, [bytes.fromhex(s) for s in vector["signatures"]]


def replay(vector: dict[str, Any]) -> dict[str, Any]:
    backend = ReplayingBackend(*_randomness(vector))
    return run_handshake(vector["suite"], backend, backend)


def replay_retry(vector: dict[str, Any]) -> dict[str, Any]:
    backend = ReplayingBackend(*_randomness(vector))
    return run_retry_handshake(backend, backend)


def replay_rekey(vector: dict[str, Any]) -> dict[str, Any]:
    backend = ReplayingBackend(*_randomness(vector))
    return run_rekey(backend, backend)


def vector_path(suite_name: str) -> Path:
    return HERE / f"handshake_{suite_name.replace('-', '_')}.json"


RETRY_VECTOR = HERE / "handshake_hybrid_retry.json"
REKEY_VECTOR = HERE / "rekey_hybrid.json"


def kem_public_key_hash(seed: bytes) -> str:
    """SHA-256 of the ML-KEM-768 encapsulation key made from a 64-byte seed d || z."""
    return sha256(CryptographyBackend().kem_keypair(HYBRID.kem or "", seed).public_bytes()).hex()


def _write(path: Path, vector: dict[str, Any]) -> None:
    path.write_text(json.dumps(vector, indent=1) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    for name in SUITES:
        _write(vector_path(name), generate(name))
    _write(RETRY_VECTOR, generate_retry())
    _write(REKEY_VECTOR, generate_rekey(json.loads(vector_path("hybrid").read_text())))
