"""A HELLO flood against a real daemon: the attacker's source is rationed, honest peers are not.

The flood comes from its own loopback address (127.0.0.9) and sends genuine-looking HELLOs,
each new to the replay cache, one connection each, following RETRYs like an honest
initiator. The daemon may sign for it only as long as that source's budget lasts (burst
plus refill, pqtunnel/admission.py); everything beyond is answered with a cheap RETRY or
ALERT busy. A pinned peer dialling from another address still gets its session, and the
log says what happened in a bounded number of lines.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pytest

from pqlab.flood import flood
from pqtunnel.admission import AdmissionLimits
from pqtunneld.eventlog import LOG_BURST
from tests.nodes import Daemon, init_node, pq

FLOOD_SOURCE = "127.0.0.9"
KNOCKS = 60


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[dict]:
    bob_home, fp_bob = init_node(tmp_path, "bob")
    alice_home, fp_alice = init_node(tmp_path, "alice")
    pq("trust", "alice", fp_alice, home=bob_home)
    pq("trust", "bob", fp_bob, home=alice_home)
    bob = Daemon(bob_home, ["--listen", "0.0.0.0:0"]).start()  # reachable from every 127.0.0.0/8 source
    started: list[Daemon] = [bob]
    try:
        yield {"bob": bob, "alice_home": alice_home, "started": started}
    finally:
        for daemon in started:
            daemon.kill()


def test_a_hello_flood_from_one_source_is_rationed_and_an_honest_peer_still_connects(nodes: dict) -> None:
    bob: Daemon = nodes["bob"]
    started = time.monotonic()
    tally = flood(bob.port, source=FLOOD_SOURCE, count=KNOCKS)
    elapsed = time.monotonic() - started

    limits = AdmissionLimits()
    allowance = limits.source_burst + limits.source_per_s * elapsed + 1
    assert tally.sent == KNOCKS
    assert tally.signed <= allowance, f"bob signed {tally.signed} times for one source in {elapsed:.2f} s: {tally.answers}"
    refused = {answer: n for answer, n in tally.answers.items() if answer not in ("response", "retry+response")}
    assert sum(refused.values()) >= KNOCKS - allowance
    assert set(refused) <= {"busy", "retry+busy"}, f"every refusal is a RETRY or an ALERT busy, not a crash: {refused}"

    alice = Daemon(nodes["alice_home"], ["--peer", f"bob=127.0.0.1:{bob.port}"]).start()
    nodes["started"].append(alice)
    ping = pq("ping", "bob", home=alice.home)
    assert ping.returncode == 0, ping.stderr

    handshakes = bob.status()["handshakes"]
    assert handshakes["busy"] + handshakes["refused_at_accept"] == sum(refused.values())
    assert handshakes["admitted"] == tally.signed + 1, "the flood's signatures plus alice's"

    flood_lines = [line for line in bob.logs().splitlines() if f"at {FLOOD_SOURCE}:" in line and "failed" in line]
    assert len(flood_lines) <= LOG_BURST + 1, f"{KNOCKS} failed handshakes, {len(flood_lines)} log lines"
