"""Deterministic resumption-ticket vector (docs/PROTOCOL.md 4.10): generate it, replay it.

``resume_hybrid.json``: the hybrid handshake vector's session (its recorded randomness
replayed), bob issues a ticket (id ``0x81``×16, lifetime 86400 s) at ``ISSUE_MS``; an hour
later alice resumes with ephemeral ``0x91``×32, bob answers with ``0xa1``×32. Also the
ticket state wrapped for bob's store (salt ``0xb1``×32) and alice's client ticket wrapped
for hers (salt ``0xc1``×32). Nothing here is randomised beyond the hybrid vector, so the
whole file is reproduced byte for byte. Run ``python3 -m tests.vectors.ticket_vectors``
to regenerate it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pqtunnel.entropy import Entropy
from pqtunnel.handover import StateWrapper
from pqtunnel.handshake import HandshakeResult
from pqtunnel.tickets import (
    ResumeInitiator,
    ResumeResponder,
    accept_ticket_grant,
    issue_ticket,
    wrap_client_ticket,
    wrap_ticket,
)
from pqtunnel.wire import FrameDecoder
from tests.vectors.handshake_vectors import (
    INITIATOR_E,
    INITIATOR_KEM_SEED,
    RESPONDER_E,
    TIMESTAMP_MS,
    ReplayingBackend,
    SequenceEntropy,
    _pair,
    _randomness,
    fill,
    fixed_identity,
    vector_path,
)

TICKET_VECTOR = Path(__file__).parent / "resume_hybrid.json"
ISSUE_MS = TIMESTAMP_MS + 1_000
RESUME_MS = TIMESTAMP_MS + 3_600_000
LIFETIME_S = 86_400
TICKET_ID = fill(0x81, 16)
RESUME_INITIATOR_E = fill(0x91)
RESUME_RESPONDER_E = fill(0xA1)
STATE_SALT = fill(0xB1)
CLIENT_SALT = fill(0xC1)


class Draws(Entropy):
    """Hands out the given X25519 keys and random byte strings in order, and nothing more."""

    def __init__(self, x25519: list[bytes], random: list[bytes]) -> None:
        self._x25519, self._random = list(x25519), list(random)

    def x25519_private(self) -> bytes:
        if not self._x25519:
            raise AssertionError("an X25519 key was drawn that the vector does not define")
        return self._x25519.pop(0)

    def random_bytes(self, size: int) -> bytes:
        if not self._random or len(self._random[0]) != size:
            raise AssertionError(f"{size} random bytes were drawn that the vector does not define")
        return self._random.pop(0)

    def kem_seed(self) -> bytes:
        raise AssertionError("a resumption draws no ML-KEM seed")


def hybrid_session() -> tuple[HandshakeResult, HandshakeResult]:
    """The hybrid handshake vector, replayed: (alice's result, bob's result)."""
    hybrid = json.loads(vector_path("hybrid").read_text())
    backend = ReplayingBackend(*_randomness(hybrid))
    initiator, responder = _pair("hybrid", backend, backend,
                                 initiator_entropy=SequenceEntropy([INITIATOR_E], [INITIATOR_KEM_SEED]),
                                 responder_entropy=SequenceEntropy([RESPONDER_E], []))
    decoder = FrameDecoder()
    response = responder.receive(decoder.feed(initiator.start(TIMESTAMP_MS))[0], TIMESTAMP_MS).to_send
    step_i = initiator.receive(decoder.feed(response)[0], TIMESTAMP_MS)
    step_r = responder.receive(decoder.feed(step_i.to_send)[0], TIMESTAMP_MS)
    assert step_i.result is not None and step_r.result is not None
    assert step_i.result.session_id.hex() == hybrid["session_id"]
    return step_i.result, step_r.result


def run_resumption() -> dict[str, Any]:
    at_alice, at_bob = hybrid_session()
    alice, bob = fixed_identity("alice", 0x10), fixed_identity("bob", 0x20)
    state, grant = issue_ticket(at_bob, ISSUE_MS, lifetime_s=LIFETIME_S, entropy=Draws([], [TICKET_ID]))
    client = accept_ticket_grant(at_alice, grant, ISSUE_MS)
    initiator = ResumeInitiator(alice, client, lambda peer: "bob", entropy=Draws([RESUME_INITIATOR_E], []))
    responder = ResumeResponder(bob, state, lambda peer: "alice", entropy=Draws([RESUME_RESPONDER_E], []))
    decoder = FrameDecoder()
    hello = initiator.start(RESUME_MS)
    step_r = responder.receive(decoder.feed(hello)[0], RESUME_MS)
    step_i = initiator.receive(decoder.feed(step_r.to_send)[0], RESUME_MS)
    result, other = step_i.result, step_r.result
    assert result is not None and other is not None and result.send_key == other.recv_key
    state_blob = wrap_ticket(StateWrapper.for_identity(bob, Draws([], [STATE_SALT])), state)
    client_blob = wrap_client_ticket(StateWrapper.for_identity(alice, Draws([], [CLIENT_SALT])), client)
    return {
        "suite": "hybrid",
        "issue_ms": ISSUE_MS,
        "lifetime_s": LIFETIME_S,
        "resume_ms": RESUME_MS,
        "resumption_secret": at_alice.resumption_secret.hex(),
        "ticket_id": TICKET_ID.hex(),
        "psk": client.psk.hex(),
        "grant": grant.hex(),
        "initiator_x25519": RESUME_INITIATOR_E.hex(),
        "responder_x25519": RESUME_RESPONDER_E.hex(),
        "initiator_fingerprint": alice.fingerprint,
        "responder_fingerprint": bob.fingerprint,
        "messages": [hello.hex(), step_r.to_send.hex()],
        "handshake_hash": result.handshake_hash.hex(),
        "session_id": result.session_id.hex(),
        "initiator_to_responder_key": result.send_key.hex(),
        "responder_to_initiator_key": result.recv_key.hex(),
        "rekey_chain": result.rekey_chain.hex(),
        "next_resumption_secret": result.resumption_secret.hex(),
        "ticket_state_salt": STATE_SALT.hex(),
        "wrapped_ticket_state": {"bytes": len(state_blob), "sha256": hashlib.sha256(state_blob).hexdigest()},
        "client_ticket_salt": CLIENT_SALT.hex(),
        "wrapped_client_ticket": {"bytes": len(client_blob), "sha256": hashlib.sha256(client_blob).hexdigest()},
    }


if __name__ == "__main__":
    TICKET_VECTOR.write_text(json.dumps(run_resumption(), indent=1) + "\n")
    print("wrote", TICKET_VECTOR)
