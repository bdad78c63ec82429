"""Prometheus metrics (operations issue): off by default; with [metrics] listen, /metrics
serves pqtunnel_* series that move with the node's events."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.nodes import Daemon, init_node, pq


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("pqtunnel_"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


@dataclass
class MeteredBob:
    """bob's daemon serving /metrics, and a caller's daemon with bob as its ``--peer``."""

    bob: Daemon
    caller: Daemon
    caller_home: Path
    metrics_port: int

    def scrape(self) -> dict[str, float]:
        return scrape(self.metrics_port)


@contextmanager
def metered_bob(tmp_path: Path, caller: str = "alice", *, config: str = "",
                trusted: bool = True) -> Iterator[MeteredBob]:
    """bob with ``[metrics] listen`` (plus ``config``) and ``caller`` dialling him; both pin
    each other unless ``trusted`` is False, so a test reads as what /metrics must show."""
    bob_home, fp_bob = init_node(tmp_path, "bob")
    caller_home, fp_caller = init_node(tmp_path, caller)
    if trusted:
        pq("trust", caller, fp_caller, home=bob_home)
        pq("trust", "bob", fp_bob, home=caller_home)
    port = free_port()
    (bob_home / "config.toml").write_text(f'[metrics]\nlisten = "127.0.0.1:{port}"\n{config}')
    bob = Daemon(bob_home).start()
    try:
        dialer = Daemon(caller_home, ["--peer", f"bob=127.0.0.1:{bob.port}"]).start()
        try:
            yield MeteredBob(bob, dialer, caller_home, port)
        finally:
            dialer.kill()
    finally:
        bob.kill()


def test_metrics_follow_sessions_and_streams(tmp_path: Path) -> None:
    with metered_bob(tmp_path, config='[services]\necho = { exec = ["cat"] }\n') as lab:
        assert pq("ping", "bob", home=lab.caller_home).returncode == 0
        echoed = pq("connect", "bob/echo", home=lab.caller_home, input=b"hi\n")
        assert echoed.returncode == 0
        denied = pq("connect", "bob/nothing", home=lab.caller_home)
        assert denied.returncode != 0
        values = lab.scrape()
        assert values['pqtunnel_sessions{suite="hybrid"}'] == 1
        assert values['pqtunnel_handshakes_total{result="up"}'] == 1
        assert values['pqtunnel_streams_total{decision="allowed"}'] == 1
        assert values['pqtunnel_streams_total{decision="denied"}'] == 1
        took = values['pqtunnel_handshake_seconds_sum{direction="inbound",result="up"}']
        assert values['pqtunnel_handshake_seconds_count{direction="inbound",result="up"}'] == 1 and 0 < took < 10
        assert values['pqtunnel_handshake_seconds_bucket{direction="inbound",le="10.0",result="up"}'] == 1
        assert values['pqtunnel_store_seconds_count{operation="health",store="local"}'] >= 1  # checked at start
        lab.caller.stop()
        lab.bob.wait_for_log("session down: alice")
        after = lab.scrape()
        assert after['pqtunnel_sessions{suite="hybrid"}'] == 0
        assert after['pqtunnel_session_bytes_total{direction="in",peer="alice"}'] > 0


def test_metrics_are_off_by_default(tmp_path: Path) -> None:
    home, _ = init_node(tmp_path, "solo")
    daemon = Daemon(home).start()
    try:
        assert "metrics on" not in daemon.logs()
    finally:
        daemon.kill()


def test_json_logs_are_one_object_per_line_with_event_fields(tmp_path: Path) -> None:
    import json

    alice_home, fp_alice = init_node(tmp_path, "alice")
    bob_home, fp_bob = init_node(tmp_path, "bob")
    pq("trust", "bob", fp_bob, home=alice_home)
    pq("trust", "alice", fp_alice, home=bob_home)
    bob = Daemon(bob_home, ["--log-format", "json"]).start()
    alice = Daemon(alice_home, ["--peer", f"bob=127.0.0.1:{bob.port}"]).start()
    try:
        assert pq("ping", "bob", home=alice_home).returncode == 0
        bob.wait_for_log('"session_up"')
    finally:
        alice.kill()
        bob.kill()
    lines = [json.loads(line) for line in bob.logs().splitlines() if line.strip()]
    (up,) = [line for line in lines if line.get("event") == "session_up"]
    assert up["peer"] == "alice" and up["kem"] == "X25519+ML-KEM-768" and up["level"] == "info"


def test_a_refused_handshake_is_timed_under_its_fault(tmp_path: Path) -> None:
    with metered_bob(tmp_path, "mallory", trusted=False) as lab:  # bob never pins mallory
        assert pq("ping", "bob", home=lab.caller_home).returncode != 0
        lab.bob.wait_for_log("handshake with unknown peer")
        values = lab.scrape()
        assert values['pqtunnel_handshake_seconds_count{direction="inbound",result="failed_peer"}'] >= 1
        assert 'pqtunnel_handshake_seconds_count{direction="inbound",result="up"}' not in values


async def test_nonce_reservations_and_store_latency_are_counted_by_result(tmp_path: Path) -> None:
    """A real LeaseKeeper on a real SQLite store (granted) and on an etcd endpoint where
    nothing listens (unanswered), its events fed to the node's metrics as the bus would."""
    import trio

    from pqlab.leaseworker import lab_codec
    from pqtunnel import events
    from pqtunnel.leases import CounterLease
    from pqtunneld.leasekeeper import LeaseKeeper
    from pqtunneld.metrics import NodeMetrics
    from pqtunneld.etcd import EtcdGateway
    from pqtunneld.noncestore import EtcdNonceStore, open_nonce_store

    metrics = NodeMetrics()
    seen: list[events.Event] = []

    def emit(event: events.Event) -> None:
        seen.append(event)
        metrics.observe(event)

    local = open_nonce_store("local", codec=lab_codec("metrics"), path=tmp_path / "nonces.sqlite")
    dead = EtcdNonceStore(EtcdGateway((f"http://127.0.0.1:{free_port()}",), deadline=0.3), lab_codec("metrics"))
    try:
        async with trio.open_nursery() as nursery:
            granted = LeaseKeeper(CounterLease.fresh("k", block_size=8, low_water=2), local, emit)
            unanswered = LeaseKeeper(CounterLease.fresh("k", block_size=8, low_water=2), dead, emit)
            await nursery.start(granted.run)
            await nursery.start(unanswered.run)
            for _ in range(20):  # 20 counters from blocks of 8: three reservations at least
                await granted.next_counter()
            with trio.move_on_after(2.0):  # gives up after 0.3 s, retries after a pause
                await unanswered.next_counter()
            nursery.cancel_scope.cancel()
    finally:
        await local.aclose()
        await dead.aclose()
    sample = metrics.registry.get_sample_value
    assert sample("pqtunnel_nonce_reservations_total", {"store": "local", "result": "granted"}) >= 3
    assert sample("pqtunnel_nonce_reservations_total", {"store": "etcd", "result": "unanswered"}) >= 1
    assert sample("pqtunnel_nonce_reservations_total", {"store": "local", "result": "unanswered"}) is None
    reserve = {"store": "local", "operation": "reserve"}
    assert sample("pqtunnel_store_seconds_count", reserve) >= 3 and sample("pqtunnel_store_seconds_sum", reserve) > 0
    reserved = [e for e in seen if isinstance(e, events.CounterBlockReserved)]
    assert {e.result for e in reserved} == {"granted", "unanswered"} and all(e.key == "k" for e in reserved)


def test_a_replica_counts_the_counter_blocks_its_sessions_reserve(tmp_path: Path) -> None:
    """With [ha], a session seals only with reserved counters: bob's /metrics shows the
    reservations granted by the local store and how long the store took."""
    with metered_bob(tmp_path, config='[ha]\nstore = "local"\n') as lab:
        assert pq("ping", "bob", home=lab.caller_home).returncode == 0
        values = lab.scrape()
        assert values['pqtunnel_nonce_reservations_total{result="granted",store="local"}'] >= 1
        assert values['pqtunnel_store_seconds_count{operation="reserve",store="local"}'] >= 1
