"""Test vectors: the classical Noise XX base against the published cacophony vectors, and our
own XXhfs vectors (docs/PROTOCOL.md) reproduced byte for byte."""

from __future__ import annotations

import hashlib
import hmac
import json

import msgpack
import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from noise.functions.hash import hkdf

from pqtunnel.crypto.backend import CryptographyBackend, x25519_dh, x25519_public
from pqtunnel.crypto.suites import Aead
from pqtunnel.records import ContentType, RecordLayer

from pqtunnel.crypto.suites import SUITES
from pqtunnel.noisestate import NoiseState
from tests.vectors.handshake_vectors import (
    REKEY_VECTOR,
    RETRY_VECTOR,
    kem_public_key_hash,
    replay,
    replay_rekey,
    replay_retry,
    vector_path,
)

# Noise_XX_25519_ChaChaPoly_BLAKE2s from the cacophony test-vector suite (as shipped by snow
# and noiseprotocol): prologue "John Galt", fixed static and ephemeral keys.
CACOPHONY_XX = {
    "prologue": "4a6f686e2047616c74",
    "init_static": "e61ef9919cde45dd5f82166404bd08e38bceb5dfdfded0a34c8df7ed542214d1",
    "init_ephemeral": "893e28b9dc6ca8d611ab664754b8ceb7bac5117349a4439a6b0569da977c464a",
    "resp_static": "4a3acbfdb163dec651dfa3194dece676d437029c62a408b4c5ea9114246e4893",
    "resp_ephemeral": "bbdb4cdbd309f1a1f2e1456967fe288cadd6f712d65dc7b7793d5e63da6b375b",
    "handshake_hash": "6c4c56cf71612f72d05ceb96c0155e6f4ea54a26b504c93de632a2db4a49d200",
    "messages": [
        ("4c756477696720766f6e204d69736573",
         "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c79444c756477696720766f6e204d69736573"),
        ("4d757272617920526f746862617264",
         "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f1448088437c365eb362a1c991b0557fe8a7fb187d"
         "99346765d93ec63db6c1b01504ebeec55a2298d2dbff80eff034d20595153f63a196a6cead1e11b2bb13e336fa13616d"
         "d3e8b0a070c882ed3f1a78c7c06c93"),
        ("462e20412e20486179656b",
         "46c3307de83b014258717d97781c1f50936d8b7d50c0722a1739654d10392d415b670c114f79b9a4f80541570f77ce88"
         "802efa4220cff733e7b5668ba38059ec904b4b8eef9448085faf51"),
        ("4361726c204d656e676572", "d5e83adfaac5dc324a68f1862df54549e56d209fba707205f328b2"),
        ("4a65616e2d426170746973746520536179", "d102c9029b1f55c788f561ba7737afbccef9c9f1bf2f238167fd40ba9c1c134867"),
        ("457567656e2042f6686d20766f6e2042617765726b", "cb1ce80960382c6d5d5e740ffb724d1432f0310b200fb6f8424120f506092744baa415e155"),
    ],
}


def _state(initiator: bool) -> NoiseState:
    v = CACOPHONY_XX
    prefix = "init" if initiator else "resp"
    return NoiseState(b"Noise_XX_25519_ChaChaPoly_BLAKE2s", initiator=initiator,
                      static_private=bytes.fromhex(v[f"{prefix}_static"]),
                      ephemeral_private=bytes.fromhex(v[f"{prefix}_ephemeral"]),
                      prologue=bytes.fromhex(v["prologue"]))


def _transport(key: bytes, nonce: int, payload: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(b"\0" * 4 + nonce.to_bytes(8, "little"), payload, b"")


def test_classical_xx_token_engine_matches_cacophony_vectors() -> None:
    """Our token processing (shared by XXhfs) reproduces every published message and key."""
    msgs = [(bytes.fromhex(p), bytes.fromhex(c)) for p, c in CACOPHONY_XX["messages"]]
    initiator, responder = _state(True), _state(False)

    m1 = initiator.write_e() + initiator.encrypt_and_hash(msgs[0][0])
    assert m1 == msgs[0][1]
    responder.read_e(m1[:32])
    assert responder.decrypt_and_hash(m1[32:]) == msgs[0][0]

    m2 = responder.write_e()
    responder.ee()
    m2 += responder.write_s()
    responder.es()
    m2 += responder.encrypt_and_hash(msgs[1][0])
    assert m2 == msgs[1][1]
    initiator.read_e(m2[:32])
    initiator.ee()
    initiator.read_s(m2[32:80])
    initiator.es()
    assert initiator.decrypt_and_hash(m2[80:]) == msgs[1][0]

    m3 = initiator.write_s()
    initiator.se()
    m3 += initiator.encrypt_and_hash(msgs[2][0])
    assert m3 == msgs[2][1]
    responder.read_s(m3[:48])
    responder.se()
    assert responder.decrypt_and_hash(m3[48:]) == msgs[2][0]

    assert initiator.h.hex() == responder.h.hex() == CACOPHONY_XX["handshake_hash"]
    i2r, r2i = initiator.split()
    assert _transport(r2i, 0, msgs[3][0]) == msgs[3][1]
    assert _transport(i2r, 0, msgs[4][0]) == msgs[4][1]
    assert _transport(r2i, 1, msgs[5][0]) == msgs[5][1]


@pytest.mark.parametrize("suite_name", list(SUITES))
def test_pqtunnel_handshake_vectors_reproduce_byte_for_byte(suite_name: str) -> None:
    vector = json.loads(vector_path(suite_name).read_text())
    reproduced = replay(vector)
    for key, value in reproduced.items():
        assert value == vector[key], key
    assert vector["handshake_hash"] == vector["responder_handshake_hash"]


def test_vector_replay_refuses_a_signature_from_another_transcript() -> None:
    """The replaying backend is not a rubber stamp: it verifies what it injects."""
    vector = json.loads(vector_path("hybrid").read_text())
    vector["signatures"] = list(reversed(vector["signatures"]))
    with pytest.raises(AssertionError):
        replay(vector)


RECORD_KEY = bytes.fromhex("11ff529bc396c356e2647dc54bcbd091d6431720526adf7130fb949b7cf8495a")
RECORD_SESSION = bytes.fromhex("7af42160e00a9e08")
RECORD_VECTORS = {
    "chacha20-poly1305": "00000027107af42160e00a9e080000000000000005fca78f61274a44fc155ac4fc82880404738e499c544d",
    "aes-256-gcm": "00000027107af42160e00a9e080000000000000005e3ed94a2fe6e38cabcd71aa6b6481a4cbf87c5ba855d",
}


@pytest.mark.parametrize("aead_label", list(RECORD_VECTORS))
def test_record_vector_from_docs(aead_label: str) -> None:
    """docs/PROTOCOL.md: DATA "hello" with counter 5 under the hybrid vector's i2r key."""
    from pqtunnel.crypto.suites import Aead
    from pqtunnel.records import ContentType, RecordLayer

    aead = Aead.from_label(aead_label)
    sender = RecordLayer(aead, RECORD_KEY, RECORD_KEY, RECORD_SESSION, first_send_counter=5)
    frame = sender.seal(ContentType.DATA, b"hello")
    assert frame.hex() == RECORD_VECTORS[aead_label]
    receiver = RecordLayer(aead, RECORD_KEY, RECORD_KEY, RECORD_SESSION)
    assert receiver.open(frame[5:]) == (ContentType.DATA, b"hello")


# --- RETRY and cookie (docs/PROTOCOL.md 4.2) ----------------------------------------------------------


def _frames(vector: dict) -> list[bytes]:
    return [bytes.fromhex(m) for m in vector["messages"]]


def _hello_parts(frame: bytes) -> tuple[bytes, bytes, dict]:
    """(e, e1, payload) of a hybrid HELLO frame, cut as section 4.1 says."""
    body = frame[5:]
    return body[2:34], body[34:34 + 1184], msgpack.unpackb(body[34 + 1184:], raw=False)


def test_the_retry_vector_reproduces_byte_for_byte() -> None:
    vector = json.loads(RETRY_VECTOR.read_text())
    reproduced = replay_retry(vector)
    for key, value in reproduced.items():
        assert value == vector[key], key
    assert [m[4] for m in _frames(vector)] == [0x01, 0x04, 0x01, 0x02, 0x03]  # HELLO RETRY HELLO RESPONSE FINISH


def test_the_retry_cookie_is_the_documented_mac_over_the_answered_hellos_ephemeral_key() -> None:
    """Recomputed from section 4.2 alone: issued_ms || HMAC-SHA256(secret, label || issued_ms ||
    suite id || e || client IP)[0:16]; the retried HELLO carries the same e and echoes it."""
    vector = json.loads(RETRY_VECTOR.read_text())
    hello, retry, retried = _frames(vector)[:3]
    e, _, _ = _hello_parts(hello)
    issued = vector["timestamp_ms"].to_bytes(8, "big")
    mac = hmac.new(bytes.fromhex(vector["cookie_secret"]),
                   b"pqtunnel/1 cookie\x00" + issued + bytes([2]) + e + vector["peer_address"].encode(),
                   hashlib.sha256).digest()[:16]
    cookie = issued + mac
    assert retry[5:] == msgpack.packb({"suite": 2, "cookie": cookie}, use_bin_type=True)
    retried_e, _, payload = _hello_parts(retried)
    assert retried_e == e
    assert payload == {"v": [1], "suites": [2], "aeads": [1, 2], "ts": vector["retry_ms"], "retry": {"cookie": cookie}}


def test_the_64_byte_ml_kem_seed_is_d_then_z() -> None:
    """FIPS 203 KeyGen_internal(d, z): the encapsulation key depends on d only, the implicit
    rejection secret on z only. The vector's seeds have d != z, so both halves are pinned:
    each HELLO's e1 is the key from d || z (not z || d), and decapsulating an invalid
    ciphertext yields J(z || c) = SHAKE256(z || c)[0:32]."""
    vector = json.loads(RETRY_VECTOR.read_text())
    hello, _, retried = _frames(vector)[:3]
    for frame, seed_hex in zip((hello, retried), vector["kem_seeds"]):
        seed = bytes.fromhex(seed_hex)
        d, z = seed[:32], seed[32:]
        assert d != z
        _, e1, _ = _hello_parts(frame)
        assert hashlib.sha256(e1).hexdigest() == kem_public_key_hash(d + z) != kem_public_key_hash(z + d)
        invalid = bytes(1088)
        rejected = CryptographyBackend().kem_keypair("ML-KEM-768", seed).decapsulate(invalid)
        assert rejected == hashlib.shake_256(z + invalid).digest(32)
    seed = bytes.fromhex(MLKEM_SEED_VECTOR["seed"])
    key = CryptographyBackend().kem_keypair("ML-KEM-768", seed)
    assert hashlib.sha256(key.public_bytes()).hexdigest() == MLKEM_SEED_VECTOR["ek_sha256"]
    assert key.decapsulate(bytes(1088)).hex() == MLKEM_SEED_VECTOR["rejection_secret_for_zero_ciphertext"]


MLKEM_SEED_VECTOR = {  # docs/PROTOCOL.md 4.8
    "seed": "42" * 32 + "43" * 32,  # d = 0x42 x 32, z = 0x43 x 32
    "ek_sha256": "8cde1b49992415b527e361f52465634978fcc488d6f541c4a1fec97fd14b4661",
    "rejection_secret_for_zero_ciphertext": "098c4ee6514b50aa2709790ea3f537f52f8e16b5459b5b9daf49ff8b991bf5f7",
}


# --- rekey (docs/PROTOCOL.md 4.6 and 5.1) ---------------------------------------------------------------


def test_the_rekey_vector_reproduces_byte_for_byte() -> None:
    vector = json.loads(REKEY_VECTOR.read_text())
    reproduced = replay_rekey(vector)
    for key, value in reproduced.items():
        assert value == vector[key], key
    hybrid = json.loads(vector_path("hybrid").read_text())
    assert vector["rekey_chain"] == hybrid["rekey_chain"]


def _open(key: bytes, session_id: bytes, frame: bytes) -> tuple[ContentType, bytes]:
    """Open one RECORD frame with ``key`` (a fresh record layer: counters do not matter here)."""
    content_type, data = RecordLayer(Aead.CHACHA20_POLY1305, key, key, session_id).open(frame[5:])
    return content_type, bytes(data)


def test_the_rekey_keys_follow_the_documented_derivation() -> None:
    """Recomputed from section 5.1 alone: chain', k_i2r', k_r2i' = HKDF(chain, label || eA ||
    eB || X25519(a, eB) || ss, 3) with Noise's HMAC-BLAKE2s HKDF; REKEY_RESP and DONE travel
    under the old keys, the DATA records after them under the new ones."""
    vector = json.loads(REKEY_VECTOR.read_text())
    hybrid = json.loads(vector_path("hybrid").read_text())
    session_id = bytes.fromhex(hybrid["session_id"])
    i2r, r2i = bytes.fromhex(hybrid["initiator_to_responder_key"]), bytes.fromhex(hybrid["responder_to_initiator_key"])
    frames = [bytes.fromhex(data) for _, data in vector["records"]]
    assert [sender for sender, _ in vector["records"]] == ["R", "I", "I", "R", "I", "I", "R"]
    assert [_open(key, session_id, frame)[0] for key, frame in zip((r2i, i2r, i2r, r2i, i2r), frames)] == [
        ContentType.PING, ContentType.PONG, ContentType.REKEY_INIT, ContentType.REKEY_RESP, ContentType.REKEY_DONE]

    a = bytes.fromhex(vector["initiator_rekey_x25519"])
    _, init = _open(i2r, session_id, frames[2])
    assert init[:32] == x25519_public(a) and len(init) == 32 + 1184
    _, resp = _open(r2i, session_id, frames[3])
    e_b, ciphertext = resp[:32], resp[32:]
    assert e_b == x25519_public(bytes.fromhex(vector["responder_rekey_x25519"]))
    ss, recorded_ciphertext = (bytes.fromhex(x) for x in vector["encapsulations"][1])
    assert ciphertext == recorded_ciphertext
    kem_key = CryptographyBackend().kem_keypair("ML-KEM-768", bytes.fromhex(vector["initiator_rekey_kem_seed"]))
    assert kem_key.public_bytes() == init[32:] and kem_key.decapsulate(ciphertext) == ss

    material = b"pqtunnel/1 rekey\x00" + x25519_public(a) + e_b + x25519_dh(a, e_b) + ss
    chain, new_i2r, new_r2i = hkdf(bytes.fromhex(vector["rekey_chain"]), material, 3,
                                   lambda key, data: hmac.new(key, data, hashlib.blake2s).digest())
    assert chain.hex() == vector["new_rekey_chain"]
    assert _open(new_i2r, session_id, frames[5]) == (ContentType.DATA, b"hello")
    assert _open(new_r2i, session_id, frames[6]) == (ContentType.DATA, b"hi")


# --- session handover between replicas (docs/PROTOCOL.md 5.2) ------------------------------------------

HANDOVER_VECTORS = {
    "resume": (9, "RESUME", bytes(range(16)),
               "00000032107af42160e00a9e0800000000000000090edd7612f6443dd185a6beeba8ba79f736854c5183f80a7b09145105ebdd80bd52"),
    "resumed": (65536, "RESUMED", bytes(range(32)) + b"r2",
                "00000044107af42160e00a9e080000000000010000c85dd59dfa201c7816d9dbe5f501f6eaa9f8bb372df07efa7649"
                "10978e2f02e6bb325a35c25f2658ac36411be4ebeaf750cc4a"),
    "resume_confirm": (10, "RESUME_CONFIRM", bytes(range(16, 32)),
                       "00000032107af42160e00a9e08000000000000000a6aae74b3dc9a1cfe780e8c8aea136f91cb5760cb36332c967201"
                       "c4a2636f5a6cc6"),
}


@pytest.mark.parametrize("name", list(HANDOVER_VECTORS))
def test_resume_record_vectors_from_docs(name: str) -> None:
    """RESUME (challenge 00..0f, counter 9), RESUMED (the echo, the replica's challenge 10..1f
    and "r2", counter 65536) and RESUME_CONFIRM (10..1f echoed, counter 10)."""
    from pqtunnel.crypto.suites import Aead
    from pqtunnel.records import ContentType, RecordLayer

    counter, content, body, expected = HANDOVER_VECTORS[name]
    sender = RecordLayer(Aead.CHACHA20_POLY1305, RECORD_KEY, RECORD_KEY, RECORD_SESSION, first_send_counter=counter)
    assert sender.seal(ContentType[content], body).hex() == expected


def test_wrapped_snapshot_vector_from_docs() -> None:
    """A snapshot wrapped with salt 5a.., wrap key 00..1f, namespace "SHA256:example"."""
    import hashlib

    from pqtunnel.crypto.suites import Aead
    from pqtunnel.entropy import Entropy
    from pqtunnel.handover import SessionSnapshot, StateWrapper

    class Salt(Entropy):
        def random_bytes(self, size: int) -> bytes:
            return b"\x5a" * size

    wrapper = StateWrapper("SHA256:example", bytes(range(32)), Salt())
    snapshot = SessionSnapshot(RECORD_SESSION, "hybrid", Aead.CHACHA20_POLY1305, {"n": "alice"}, "alice", b"", b"",
                               RECORD_KEY, RECORD_KEY, b"c" * 32, 0, 0, 1_700_000_000_000)
    blob = wrapper.wrap(snapshot)
    assert blob.startswith(b"pqtunnel-session/1" + b"\x5a" * 32) and len(blob) == 283
    assert hashlib.sha256(blob).hexdigest() == WRAPPED_SNAPSHOT_SHA256


WRAPPED_SNAPSHOT_SHA256 = "25e46834d8338c702ca739991ef9c77cd029587b99d399388f7d2d65c26645b3"
