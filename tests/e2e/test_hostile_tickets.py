"""Hostile use of resumption tickets against a node without [ha], which keeps the tickets it
grants in its own memory (daemon/tickets.py GrantedInMemory, docs/ha.md "Tickets").

alice holds a ticket from bob; the tests replay her RESUME_HELLO byte for byte, on two
connections at once, after bob's restart, and as mallory (another peer bob trusts). Each
time bob must answer RESUME_ACCEPT at most once, and a refusal must not burn the ticket
for its honest holder.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pqtunnel.identity import Identity
from pqtunnel.tickets import ResumeInitiator
from pqtunnel.wire import FrameDecoder, Kind
from pqtunneld.stores import load_identity
from tests.e2e.test_tickets_e2e import alice_ticket, wait_for
from tests.nodes import Daemon, hostile_lab


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[dict]:
    """hostile_lab once alice holds a ticket from bob and has stopped (her ticket unused)."""
    with hostile_lab(tmp_path, "") as lab:
        alice: Daemon = lab["alice"]
        wait_for(lambda: alice.status()["tickets"]["held"].get("bob") == 1)
        alice.stop()
        lab["extra"] = []
        yield lab
        for daemon in lab["extra"]:
            daemon.kill()


def resume_hello(lab: dict, identity: Identity | None = None) -> bytes:
    """alice's ticket in a RESUME_HELLO, sent by ``identity`` (alice herself by default)."""
    who = identity or load_identity(lab["alice_home"])
    return ResumeInitiator(who, alice_ticket(lab["alice_home"]), lambda peer: "bob").start(int(time.time() * 1000))


def offer(port: int, hello: bytes, barrier: threading.Barrier | None = None) -> Kind:
    """Send one RESUME_HELLO on a new connection; the kind of the first frame answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        if barrier is not None:
            barrier.wait()
        sock.sendall(hello)
        return FrameDecoder().feed(sock.recv(65536))[0].kind


def test_a_captured_resume_hello_replayed_byte_for_byte_is_refused(lab: dict) -> None:
    hello = resume_hello(lab)
    assert offer(lab["port"], hello) is Kind.RESUME_ACCEPT
    assert offer(lab["port"], hello) is Kind.ALERT
    lab["daemon"].wait_for_log("ticket refused: ticket")
    assert "Traceback" not in lab["daemon"].logs()


def test_one_resume_hello_on_many_connections_at_once_is_accepted_once(lab: dict) -> None:
    hello = resume_hello(lab)
    barrier = threading.Barrier(4)
    answers: list[Kind] = []
    threads = [threading.Thread(target=lambda: answers.append(offer(lab["port"], hello, barrier))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(answers) == sorted([Kind.RESUME_ACCEPT] + [Kind.ALERT] * 3)


def test_after_a_restart_a_ticket_is_unknown_even_unused(lab: dict) -> None:
    hello = resume_hello(lab)
    bob: Daemon = lab["daemon"]
    bob.stop()
    restarted = Daemon(bob.home).start()
    lab["extra"].append(restarted)
    assert offer(restarted.port, hello) is Kind.ALERT
    restarted.wait_for_log("is unknown (used, expired, or never ours)")


def test_another_peer_cannot_redeem_alices_ticket_nor_burn_it(lab: dict) -> None:
    """mallory holds alice's ticket (its secret too) but signs nothing as alice: the MAC binds
    the initiator's identity, and her failed try leaves the ticket usable by alice."""
    assert offer(lab["port"], resume_hello(lab, lab["mallory"])) is Kind.ALERT
    lab["daemon"].wait_for_log("RESUME_HELLO MAC does not verify")
    assert offer(lab["port"], resume_hello(lab)) is Kind.RESUME_ACCEPT
