"""Prometheus metrics (operations issue): off by default; with [metrics] listen, /metrics
serves pqtunnel_* series that move with the node's events."""

from __future__ import annotations

import socket
import urllib.request
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


def test_metrics_follow_sessions_and_streams(tmp_path: Path) -> None:
    alice_home, fp_alice = init_node(tmp_path, "alice")
    bob_home, fp_bob = init_node(tmp_path, "bob")
    pq("trust", "bob", fp_bob, home=alice_home)
    pq("trust", "alice", fp_alice, home=bob_home)
    port = free_port()
    (bob_home / "config.toml").write_text(f'[metrics]\nlisten = "127.0.0.1:{port}"\n[services]\necho = {{ exec = ["cat"] }}\n')
    bob = Daemon(bob_home).start()
    alice = Daemon(alice_home, ["--peer", f"bob=127.0.0.1:{bob.port}"]).start()
    try:
        assert pq("ping", "bob", home=alice_home).returncode == 0
        echoed = pq("connect", "bob/echo", home=alice_home, input=b"hi\n")
        assert echoed.returncode == 0
        denied = pq("connect", "bob/nothing", home=alice_home)
        assert denied.returncode != 0
        values = scrape(port)
        assert values['pqtunnel_sessions{suite="hybrid"}'] == 1
        assert values['pqtunnel_handshakes_total{result="up"}'] == 1
        assert values['pqtunnel_streams_total{decision="allowed"}'] == 1
        assert values['pqtunnel_streams_total{decision="denied"}'] == 1
        alice.stop()
        bob.wait_for_log("session down: alice")
        after = scrape(port)
        assert after['pqtunnel_sessions{suite="hybrid"}'] == 0
        assert after['pqtunnel_session_bytes_total{direction="in",peer="alice"}'] > 0
    finally:
        alice.kill()
        bob.kill()


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
