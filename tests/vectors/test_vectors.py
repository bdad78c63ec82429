"""Test vectors: the classical Noise XX base against the published cacophony vectors, and our
own XXhfs vectors (docs/PROTOCOL.md) reproduced byte for byte."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from pqtunnel.crypto.suites import SUITES
from pqtunnel.noisestate import NoiseState
from tests.vectors.handshake_vectors import replay, vector_path

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
