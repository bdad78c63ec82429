"""End to end: a session moves between two replicas of bob without a new handshake
(docs/ha.md). The replicas share bob's identity and one local nonce store (one SQLite
file, ``[ha] path``); alice knows both addresses (``--peer bob=R1,R2``). The same flows run
against a real etcd cluster in tests/e2e/test_ha_failover.py.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pqtunnel.handshake import InitiatorHandshake
from pqtunnel.wire import FrameDecoder, Kind, encode_frame
from pqtunneld.stores import load_identity
from tests.nodes import Daemon, init_node, local_replicas, pq


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[dict]:
    alice_home, fp_alice = init_node(tmp_path, "alice")
    homes, fp_bob = local_replicas(tmp_path, ("alice", fp_alice))
    replicas = [Daemon(home).start() for home in homes]
    pq("trust", "bob", fp_bob, home=alice_home)
    addresses = ",".join(f"127.0.0.1:{r.port}" for r in replicas)
    alice = Daemon(alice_home, ["--peer", f"bob={addresses}"]).start()
    try:
        yield {"replicas": replicas, "alice": alice, "alice_home": alice_home}
    finally:
        for daemon in [alice, *replicas]:
            daemon.kill()


def ping_bob(alice_home: Path) -> None:
    result = pq("ping", "bob", home=alice_home)
    assert result.returncode == 0, result.stderr


def only_session(daemon: Daemon) -> dict:
    sessions = daemon.sessions()
    assert len(sessions) == 1, sessions
    return sessions[0]


def serving(lab: dict) -> tuple[Daemon, Daemon]:
    """(the replica holding alice's session, the other one)."""
    first, second = lab["replicas"]
    return (first, second) if first.sessions() else (second, first)


def test_a_replica_seals_from_a_reserved_block_and_says_so(lab: dict) -> None:
    ping_bob(lab["alice_home"])
    at_replica = only_session(serving(lab)[0])
    start, end = at_replica["block"]
    assert 0 <= start < end and at_replica["replica"] in ("r1", "r2")
    assert at_replica["resumed"] is False and at_replica["migrations"] == 0
    at_alice = only_session(lab["alice"])
    assert at_alice["session_id"] == at_replica["session_id"] and len(at_alice["session_id"]) == 16
    assert at_alice["block"] is None  # alice is no replica: her counters are her own


def test_when_the_serving_replica_is_killed_the_session_continues_on_the_other(lab: dict) -> None:
    ping_bob(lab["alice_home"])
    before = only_session(lab["alice"])
    dead, live = serving(lab)
    dead.kill()
    lab["alice"].wait_for_log("moved to replica")
    ping_bob(lab["alice_home"])
    after = only_session(lab["alice"])
    assert after["session_id"] == before["session_id"]
    assert after["resumed"] is True and after["migrations"] == 1
    assert after["replica"] == only_session(live)["replica"]
    taken = only_session(live)
    assert taken["session_id"] == before["session_id"] and taken["migrations"] == 1
    shown = pq("sessions", home=live.home).stdout
    assert f"session {before['session_id']} | replica {taken['replica']} | moved 1 time | counter block [" in shown
    assert "Traceback" not in lab["alice"].logs() + live.logs()


def test_a_session_closed_by_its_replica_is_not_resumed_but_handshaken_anew(lab: dict) -> None:
    ping_bob(lab["alice_home"])
    before = only_session(lab["alice"])
    dead, _ = serving(lab)
    dead.stop()  # SIGTERM: the replica closes its sessions with CLOSE, so they are over
    lab["alice"].wait_for_log("peer closed the session")
    ping_bob(lab["alice_home"])
    after = only_session(lab["alice"])
    assert after["session_id"] != before["session_id"] and after["migrations"] == 0


def exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` to a replica and return its first answer (a handshake frame)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        return sock.recv(65536)


def test_a_hello_one_replica_accepted_is_refused_as_a_replay_by_the_other(lab: dict) -> None:
    r1, r2 = lab["replicas"]
    hello = InitiatorHandshake(load_identity(lab["alice_home"]), lambda peer: "bob").start(int(time.time() * 1000))
    assert FrameDecoder().feed(exchange(r1.port, hello))[0].kind is Kind.RESPONSE
    answer = FrameDecoder().feed(exchange(r2.port, hello))[0]
    assert answer.kind is Kind.ALERT and b"replay" in bytes(answer.body)
    r2.wait_for_log("HELLO replayed: another replica of this node accepted it already")


def test_a_resume_for_an_unknown_session_is_refused_with_a_reason_and_the_replica_serves_on(lab: dict) -> None:
    r1, _ = lab["replicas"]
    forged = encode_frame(Kind.RECORD, b"\x42" * 8 + (7).to_bytes(8, "big") + b"\x00" * 33)
    answer = FrameDecoder().feed(exchange(r1.port, forged))[0]
    assert answer.kind is Kind.ALERT and b"unknown session" in bytes(answer.body)
    r1.wait_for_log("RESUME of session 4242424242424242")
    ping_bob(lab["alice_home"])
