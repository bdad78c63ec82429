"""A hostile peer against the migration path of a real daemon.

Bob trusts alice's SSH host key (``pqtunnel trust --ssh-known-hosts``) and alice signed a
transition record with it. Mallory, pinned nowhere, drives the handshake by hand over a
real socket: she presents alice's genuine record with her own hybrid identity, or a
malformed ``transition`` field, or a record for alice signed with alice's stolen SSH key
after alice already migrated. Bob must refuse her without pinning anything, log no
traceback, and still accept alice's record from alice.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pytest
import trio

from pqtunnel.crypto.backend import CryptographyBackend
from pqtunnel.errors import HandshakeRefusedError
from pqtunnel.handshake import InitiatorHandshake
from pqtunnel.identity import Identity
from pqtunnel.transition import MAX_TRANSITION, make_transition
from pqtunnel.tunnel import Established, Tunnel
from pqtunneld.migration import read_ssh_private_key
from pqtunneld.stores import load_identity
from tests.e2e.test_migration import host_key, known_hosts, migrated_node, pins, trust_hosts
from tests.nodes import Daemon, init_node

pytestmark = pytest.mark.e2e


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[dict]:
    """Bob's daemon, anchored on alice's SSH key; alice's identity and record; mallory's identity."""
    alice_key = host_key(tmp_path, "alice")
    alice_home, _ = migrated_node(tmp_path, "alice", alice_key)
    bob_home, _ = init_node(tmp_path, "bob")
    mallory_home, _ = init_node(tmp_path, "mallory")
    trust_hosts(bob_home, known_hosts(tmp_path / "bob_known_hosts", {"alice": alice_key}))
    bob = Daemon(bob_home).start()
    try:
        yield {"bob": bob, "bob_home": bob_home, "alice": load_identity(alice_home),
               "record": (alice_home / "transition.rec").read_bytes(), "mallory": load_identity(mallory_home)}
    finally:
        bob.kill()


def handshake(port: int, identity: Identity, transition: bytes | None) -> bool:
    """Whether bob completes a real handshake with ``identity`` presenting ``transition``."""
    async def run() -> bool:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        now = lambda: int(time.monotonic() * 1000)  # noqa: E731
        tunnel = Tunnel(InitiatorHandshake(identity, lambda peer: "bob", transition=transition), now_ms=now())
        tunnel.start(now(), int(time.time() * 1000))
        await stream.send_all(b"".join(tunnel.buffers_to_send()))
        with trio.move_on_after(5):
            while data := await stream.receive_some(65536):
                events = tunnel.receive_data(data, now(), int(time.time() * 1000))
                await stream.send_all(b"".join(tunnel.buffers_to_send()))
                if any(isinstance(e, Established) for e in events):
                    await trio.sleep(0.3)  # bob may still refuse after his side finished
                    return not tunnel.closed
        return False
    try:
        return trio.run(run)
    except HandshakeRefusedError:  # bob's alert after our FINISH: he does not trust us
        return False


def wait_for_log(lab: dict, text: str, seconds: float = 5.0) -> str:
    """Bob's log once it holds ``text`` (he writes the refusal after hanging up on us)."""
    deadline = time.monotonic() + seconds
    while text not in (logs := lab["bob"].logs()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return logs


def assert_no_traceback(lab: dict) -> None:
    logs = lab["bob"].logs()
    assert "Traceback" not in logs and "internal error" not in logs, logs


def test_alices_own_record_from_alice_is_accepted_and_pinned(lab: dict) -> None:
    assert handshake(lab["bob"].port, lab["alice"], lab["record"])
    time.sleep(0.3)
    assert lab["alice"].fingerprint in pins(lab["bob_home"])


def test_alices_genuine_record_replayed_with_mallorys_identity_is_refused(lab: dict) -> None:
    assert not handshake(lab["bob"].port, lab["mallory"], lab["record"])
    assert lab["mallory"].fingerprint not in pins(lab["bob_home"])
    assert "alice" not in pins(lab["bob_home"])
    refusal = f"transition record for alice belongs to {lab['alice'].fingerprint}"
    assert refusal in wait_for_log(lab, refusal)
    assert_no_traceback(lab)


@pytest.mark.parametrize("field", [b"\xc1" * 64, b"\x80", b"\x00" * (MAX_TRANSITION + 1)],
                         ids=["garbage", "empty-map", "oversized"])
def test_a_malformed_transition_field_is_refused_without_a_traceback(lab: dict, field: bytes) -> None:
    assert not handshake(lab["bob"].port, lab["mallory"], field)
    assert "failed: transition" in wait_for_log(lab, "failed: transition")  # a one-line refusal naming it
    assert lab["mallory"].fingerprint not in pins(lab["bob_home"])
    assert_no_traceback(lab)
    assert handshake(lab["bob"].port, lab["alice"], lab["record"])  # bob still serves alice


def test_a_stolen_ssh_key_cannot_move_an_already_pinned_name_to_another_identity(lab: dict, tmp_path: Path) -> None:
    assert handshake(lab["bob"].port, lab["alice"], lab["record"])  # alice migrates and is pinned
    now = int(time.time())
    stolen = read_ssh_private_key(tmp_path / "ssh_host_alice")
    forged = make_transition(lab["mallory"], stolen, CryptographyBackend(), kind="ssh",
                             not_before=now - 60, not_after=now + 3600, name="alice").encode()
    assert not handshake(lab["bob"].port, lab["mallory"], forged)
    refusal = "transition record claims alice, which is pinned to another key"
    assert refusal in wait_for_log(lab, refusal)
    assert f"alice {lab['alice'].fingerprint}" in pins(lab["bob_home"])
    assert lab["mallory"].fingerprint not in pins(lab["bob_home"])
    assert_no_traceback(lab)
