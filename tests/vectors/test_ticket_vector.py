"""The resumption vector (docs/PROTOCOL.md 4.10): reproduced byte for byte by the library, and
every value recomputed from the document's formulas with no pqtunnel code but X25519."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import pytest
from noise.functions.hash import hkdf as noise_hkdf

from pqtunnel.crypto.backend import x25519_dh, x25519_public
from tests.vectors.ticket_vectors import TICKET_VECTOR, run_resumption

ALICE_STATIC = bytes([0x13]) * 32
"""alice's X25519 static key in every vector (fill byte 0x10 + 3)."""


@pytest.fixture(scope="module")
def vector() -> dict[str, Any]:
    return json.loads(TICKET_VECTOR.read_text())


def mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2s).digest()


def kdf(chaining_key: bytes, material: bytes) -> tuple[bytes, bytes]:
    first, second = noise_hkdf(chaining_key, material, 2, mac)
    return first, second


def blake2s(data: bytes) -> bytes:
    return hashlib.blake2s(data).digest()


def test_the_library_reproduces_the_resumption_vector_byte_for_byte(vector: dict[str, Any]) -> None:
    assert run_resumption() == vector


def test_the_resumption_follows_the_documented_formulas(vector: dict[str, Any]) -> None:
    ticket_id, secret = bytes.fromhex(vector["ticket_id"]), bytes.fromhex(vector["resumption_secret"])
    e_i, e_r = bytes.fromhex(vector["initiator_x25519"]), bytes.fromhex(vector["responder_x25519"])
    hello, accept = (bytes.fromhex(m) for m in vector["messages"])

    psk = kdf(secret, b"pqtunnel/1 ticket" + ticket_id)[0]
    assert psk.hex() == vector["psk"]
    assert vector["grant"] == "01" + ticket_id.hex() + vector["lifetime_s"].to_bytes(4, "big").hex()

    signed = b"\x01" + ticket_id + x25519_public(e_i) + vector["resume_ms"].to_bytes(8, "big")
    fps = b"".join(bytes([len(fp)]) + fp.encode() for fp in (vector["initiator_fingerprint"],
                                                             vector["responder_fingerprint"]))
    prologue = b"pqtunnel/1 resume\x00" + bytes([1, 2, 1]) + fps  # version 1, suite hybrid, ChaCha20-Poly1305
    ck, k_hello = kdf(psk, b"pqtunnel/1 resume")
    h = blake2s(prologue + signed)
    hello_mac = mac(k_hello, h)
    assert hello == (1 + len(signed) + 32).to_bytes(4, "big") + b"\x06" + signed + hello_mac

    e_r_public = x25519_public(e_r)
    h = blake2s(h + hello_mac + e_r_public)
    ck, k_accept = kdf(ck, x25519_dh(e_i, e_r_public) + x25519_dh(ALICE_STATIC, e_r_public) + h)
    accept_mac = mac(k_accept, h)
    assert accept == (1 + 64).to_bytes(4, "big") + b"\x07" + e_r_public + accept_mac

    h = blake2s(h + accept_mac)
    assert h.hex() == vector["handshake_hash"]
    assert hashlib.blake2s(b"pqtunnel/1 session id" + h, digest_size=8).hexdigest() == vector["session_id"]
    assert [k.hex() for k in kdf(ck, b"")] == [vector["initiator_to_responder_key"],
                                               vector["responder_to_initiator_key"]]
    assert kdf(ck, b"pqtunnel/1 rekey chain")[0].hex() == vector["rekey_chain"]
    assert kdf(ck, b"pqtunnel/1 resumption")[0].hex() == vector["next_resumption_secret"]
