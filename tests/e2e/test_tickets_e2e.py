"""End to end: resumption tickets (docs/ha.md, docs/PROTOCOL.md 4.10).

bob grants alice a ticket in every session he answers; alice keeps it, wrapped, in her own
store, so it survives her restart; her next dial resumes with it in one round trip instead
of a full handshake. A ticket is used at most once, also when two replicas of bob sharing
one store are offered the same RESUME_HELLO at the same moment.
"""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from pqtunnel.handover import StateWrapper
from pqtunnel.stores import StoreCodec
from pqtunnel.tickets import ClientTicket, ResumeInitiator, unwrap_client_ticket
from pqtunnel.wire import FrameDecoder, Kind
from pqtunneld.noncestore import SqliteNonceStore
from pqtunneld.stores import load_identity
from tests.nodes import Daemon, init_node, local_replicas, pq


def wait_for(check, timeout: float = 10.0) -> None:  # noqa: ANN001 - a predicate
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def ping(home: Path) -> None:
    result = pq("ping", "bob", home=home)
    assert result.returncode == 0, result.stderr


def session_with_bob(daemon: Daemon) -> dict:
    return next(s for s in daemon.sessions() if s["peer"] == "bob")


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[dict]:
    bob_home, fp_bob = init_node(tmp_path, "bob")
    alice_home, fp_alice = init_node(tmp_path, "alice")
    pq("trust", "alice", fp_alice, home=bob_home)
    pq("trust", "bob", fp_bob, home=alice_home)
    bob = Daemon(bob_home).start()
    lab = {"bob": bob, "alice_home": alice_home, "extra": ["--peer", f"bob=127.0.0.1:{bob.port}"], "daemons": [bob]}

    def start_alice() -> Daemon:
        alice = Daemon(alice_home, lab["extra"]).start()
        lab["daemons"].append(alice)
        return alice

    lab["start_alice"] = start_alice
    yield lab
    for daemon in lab["daemons"]:
        daemon.kill()


def test_a_ticket_survives_the_clients_restart_and_resumes_without_a_full_handshake(pair: dict) -> None:
    alice = pair["start_alice"]()
    ping(pair["alice_home"])
    assert session_with_bob(alice)["handshake"] == "full"
    wait_for(lambda: alice.status()["tickets"]["held"].get("bob") == 1)
    alice.stop()
    alice = pair["start_alice"]()
    assert alice.status()["tickets"]["held"] == {"bob": 1}  # loaded from her store
    ping(pair["alice_home"])
    resumed = session_with_bob(alice)
    assert resumed["handshake"] == "ticket" and resumed["resumed"] is True
    at_bob = next(s for s in pair["bob"].sessions() if s["peer"] == "alice")
    assert at_bob["handshake"] == "ticket" and at_bob["session_id"] == resumed["session_id"]
    wait_for(lambda: alice.status()["tickets"]["held"].get("bob") == 1)  # the used one went, a new one came
    assert "Traceback" not in alice.logs() + pair["bob"].logs()


def test_a_ticket_bob_no_longer_knows_costs_one_full_handshake_and_no_error(pair: dict) -> None:
    """bob has no [ha]: the tickets he grants live in his memory only, never on his disk, so
    after his restart alice's ticket is unknown and her dial costs one full handshake."""
    alice = pair["start_alice"]()
    ping(pair["alice_home"])
    wait_for(lambda: alice.status()["tickets"]["held"].get("bob") == 1)
    alice.stop()
    bob = pair["bob"]
    with sqlite3.connect(bob.home / "nonces.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM states WHERE state_id LIKE 'ticket.%'").fetchone()[0] == 0
    port = bob.port
    bob.stop()
    bob = Daemon(bob.home, ["--listen", f"127.0.0.1:{port}"]).start()  # same address: alice dials it again
    pair["daemons"].append(bob)
    alice = pair["start_alice"]()
    assert alice.status()["tickets"]["held"] == {"bob": 1}
    ping(pair["alice_home"])
    assert session_with_bob(alice)["handshake"] == "full"
    bob.wait_for_log("ticket refused: ticket")
    assert "did not resume with our ticket" in alice.logs() and "full handshake instead" in alice.logs()
    assert "handshake with bob" not in alice.logs()  # the dial went on: nothing failed
    assert "Traceback" not in alice.logs() + bob.logs()


def alice_ticket(alice_home: Path) -> ClientTicket:
    """The ticket alice keeps in her store, read the way her daemon reads it."""
    identity = load_identity(alice_home)

    async def read() -> ClientTicket:
        store = SqliteNonceStore(alice_home / "nonces.sqlite", StoreCodec.for_identity(identity))
        try:
            (store_id,) = await store.list_states("client-ticket.")
            blob = await store.get_state(store_id)
            assert blob is not None
            return unwrap_client_ticket(StateWrapper.for_identity(identity), store_id, blob)
        finally:
            await store.aclose()

    return trio.run(read)


def test_one_ticket_offered_to_two_replicas_at_once_is_accepted_by_exactly_one(tmp_path: Path) -> None:
    alice_home, fp_alice = init_node(tmp_path, "alice")
    homes, fp_bob = local_replicas(tmp_path, ("alice", fp_alice))
    replicas = [Daemon(home).start() for home in homes]
    pq("trust", "bob", fp_bob, home=alice_home)
    alice = Daemon(alice_home, ["--peer", f"bob=127.0.0.1:{replicas[0].port}"]).start()
    try:
        ping(alice_home)
        wait_for(lambda: alice.status()["tickets"]["held"].get("bob") == 1)
        alice.stop()
        hello = ResumeInitiator(load_identity(alice_home), alice_ticket(alice_home), lambda peer: "bob").start(
            int(time.time() * 1000))
        answers: list[Kind] = []
        barrier = threading.Barrier(2)

        def offer(port: int) -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                barrier.wait()
                sock.sendall(hello)
                answers.append(FrameDecoder().feed(sock.recv(65536))[0].kind)

        threads = [threading.Thread(target=offer, args=(r.port,)) for r in replicas]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(answers) == sorted([Kind.RESUME_ACCEPT, Kind.ALERT])
    finally:
        alice.kill()
        for replica in replicas:
            replica.kill()
