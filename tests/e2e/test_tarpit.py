"""A tarpit among a peer's addresses (hardening issue, finding 4): an address that accepts TCP
and never answers must not delay the session with the real node.

Anyone on the LAN can advertise a peer's public name and fingerprint with extra addresses;
static `--peer NAME=A,B` lists are the same shape. Candidates are dialled in a staggered race
and the first authenticated session wins, so a tarpit costs one stagger step, not a 10 s
handshake timeout per address with growing backoff.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nodes import Daemon, init_node, pq


@pytest.fixture
def tarpits() -> Iterator[list[int]]:
    """Three listeners that accept connections and never say a word."""
    listeners = []
    for _ in range(3):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        listeners.append(sock)
    yield [s.getsockname()[1] for s in listeners]
    for sock in listeners:
        sock.close()


def test_tarpit_addresses_listed_first_do_not_delay_the_real_peer(tmp_path: Path, tarpits: list[int]) -> None:
    alice_home, alice_fp = init_node(tmp_path, "alice")
    bob_home, bob_fp = init_node(tmp_path, "bob")
    assert pq("trust", "bob", bob_fp, home=alice_home).returncode == 0
    assert pq("trust", "alice", alice_fp, home=bob_home).returncode == 0
    bob = Daemon(bob_home).start()
    candidates = ",".join([*(f"127.0.0.1:{port}" for port in tarpits), f"127.0.0.1:{bob.port}"])
    alice = Daemon(alice_home, ["--peer", f"bob={candidates}"]).start()
    try:
        started = time.monotonic()
        ping = pq("ping", "bob", "--timeout", "8", home=alice_home)
        elapsed = time.monotonic() - started
        assert ping.returncode == 0, ping.stderr
        assert elapsed < 5, f"the session took {elapsed:.1f} s behind three tarpits (a handshake timeout is 10 s)"
        port = bob.port
        bob.kill()  # the session drops; the next race starts with the address that worked
        bob = Daemon(bob_home, ["--listen", f"127.0.0.1:{port}"]).start()
        alice.wait_for_log("session up: bob", timeout=20)
    finally:
        alice.kill()
        bob.kill()
    assert "Traceback" not in alice.logs()


def test_a_peer_listed_with_several_addresses_is_reached_through_any_that_works(tmp_path: Path) -> None:
    alice_home, alice_fp = init_node(tmp_path, "alice")
    bob_home, bob_fp = init_node(tmp_path, "bob")
    assert pq("trust", "bob", bob_fp, home=alice_home).returncode == 0
    assert pq("trust", "alice", alice_fp, home=bob_home).returncode == 0
    bob = Daemon(bob_home).start()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connection refused
    (alice_home / "config.toml").write_text(f'[peers]\nbob = ["127.0.0.1:{dead_port}", "127.0.0.1:{bob.port}"]\n')
    alice = Daemon(alice_home).start()
    try:
        assert pq("ping", "bob", "--timeout", "8", home=alice_home).returncode == 0
        peers = json.loads(pq("peers", "--json", home=alice_home).stdout)
        (row,) = [p for p in peers if p["name"] == "bob"]
        assert row["addresses"] == [f"127.0.0.1:{dead_port}", f"127.0.0.1:{bob.port}"]
        assert row["session"] == "up"
    finally:
        alice.kill()
        bob.kill()
