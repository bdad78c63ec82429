"""End to end: real daemon processes on loopback, driven only through the CLI."""

from __future__ import annotations

import json
import signal
import socket
import struct
import time
from pathlib import Path
from typing import Iterator

import pytest

from pqtunneld.cpufeatures import hardware_aeads
from tests.nodes import Daemon, init_node, pq


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[dict]:
    """alice and bob with pinned trust both ways; carol exists but nobody trusts her."""
    alice, fp_alice = init_node(tmp_path, "alice")
    bob, fp_bob = init_node(tmp_path, "bob")
    carol, fp_carol = init_node(tmp_path, "carol")
    assert pq("trust", "bob", fp_bob, home=alice).returncode == 0
    assert pq("trust", "alice", fp_alice, home=bob).returncode == 0
    assert pq("trust", "bob", fp_bob, home=carol).returncode == 0
    daemons: list[Daemon] = []

    def start(home: Path, *extra: str) -> Daemon:
        daemon = Daemon(home, list(extra)).start()
        daemons.append(daemon)
        return daemon

    yield {"alice": alice, "bob": bob, "carol": carol, "fp": {"alice": fp_alice, "bob": fp_bob, "carol": fp_carol},
           "start": start, "tmp": tmp_path}
    for daemon in daemons:
        daemon.kill()


def test_pinned_peers_hold_a_hybrid_session(cluster: dict) -> None:
    bob = cluster["start"](cluster["bob"])
    alice = cluster["start"](cluster["alice"], "--peer", f"bob=127.0.0.1:{bob.port}")
    ping = pq("ping", "bob", home=cluster["alice"])
    assert ping.returncode == 0, ping.stderr
    assert "X25519+ML-KEM-768" in ping.stdout and "ms" in ping.stdout
    (session,) = alice.sessions()
    assert session["peer"] == "bob"
    assert session["fingerprint"] == cluster["fp"]["bob"]
    assert session["kem"] == "X25519+ML-KEM-768"
    assert session["signature"] == "Ed25519+ML-DSA-65"
    assert session["aead"] == hardware_aeads()[0].label  # both nodes run on this CPU: its faster AEAD
    assert session["direction"] == "outbound"
    (mirror,) = bob.sessions()
    assert mirror["peer"] == "alice" and mirror["session_id"] == session["session_id"]
    assert mirror["fingerprint"] == cluster["fp"]["alice"]


def test_an_untrusted_node_is_refused(cluster: dict) -> None:
    bob = cluster["start"](cluster["bob"])
    cluster["start"](cluster["carol"], "--peer", f"bob=127.0.0.1:{bob.port}")
    ping = pq("ping", "bob", "--timeout", "5", home=cluster["carol"])
    assert ping.returncode != 0
    assert "untrusted" in ping.stderr
    assert ping.stderr.count("\n") == 1 and "Traceback" not in ping.stderr
    logs = bob.wait_for_log("is not pinned")
    assert cluster["fp"]["carol"] in logs
    assert bob.sessions() == []


def test_a_wrong_pinned_fingerprint_is_refused_before_revealing_ourselves(cluster: dict) -> None:
    bob = cluster["start"](cluster["bob"])
    # carol claims to be reachable where alice expects bob: alice pinned bob, carol answers.
    carol = cluster["start"](cluster["carol"])
    alice = cluster["start"](cluster["alice"], "--peer", f"bob=127.0.0.1:{carol.port}")
    ping = pq("ping", "bob", "--timeout", "5", home=cluster["alice"])
    assert ping.returncode != 0
    assert f"presented {cluster['fp']['carol']}" in ping.stderr
    assert alice.sessions() == [] and carol.sessions() == []
    assert bob.sessions() == []


def test_ping_to_an_unknown_peer_fails_with_one_line(cluster: dict) -> None:
    cluster["start"](cluster["alice"])
    result = pq("ping", "nobody", home=cluster["alice"])
    assert result.returncode == 1
    assert result.stderr.startswith("pqtunnel: error: unknown peer 'nobody'")


def test_ping_to_an_unreachable_peer_fails_fast(cluster: dict) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    cluster["start"](cluster["alice"], "--peer", f"bob=127.0.0.1:{dead_port}")
    result = pq("ping", "bob", "--timeout", "5", home=cluster["alice"])
    assert result.returncode == 1
    assert "refused" in result.stderr.lower()


def _hostile_connections(port: int) -> None:
    """Garbage, an oversized frame, a truncated HELLO and a peer that vanishes mid-frame."""
    payloads = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        struct.pack(">IB", 50_000_000, 0x01),
        struct.pack(">IB", 2, 0x01) + b"\x01",
        struct.pack(">IB", 1200, 0x01) + b"\x01\x02" + b"\x00" * 100,
    ]
    for payload in payloads:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(payload)
            if payload is payloads[-1]:
                continue  # vanish mid-frame without waiting for an answer
            sock.settimeout(2)
            try:
                while sock.recv(4096):
                    pass
            except (socket.timeout, ConnectionResetError):
                pass


def test_bad_input_closes_only_that_connection(cluster: dict) -> None:
    config = cluster["tmp"] / "bob.toml"
    config.write_text("[timers]\nhandshake_timeout = 1\n")
    bob = cluster["start"](cluster["bob"], "--config", str(config))
    alice = cluster["start"](cluster["alice"], "--peer", f"bob=127.0.0.1:{bob.port}")
    assert pq("ping", "bob", home=cluster["alice"]).returncode == 0
    _hostile_connections(bob.port)
    silent = socket.create_connection(("127.0.0.1", bob.port))
    logs = bob.wait_for_log("handshake did not finish within 1 s")
    silent.close()
    assert "unknown frame kind 0x2f" in logs  # "GET /": a length, then "/"
    assert "exceeds the limit" in logs
    assert "HELLO is truncated" in logs
    assert "peer closed the connection during the handshake" in logs
    assert "Traceback" not in logs
    assert pq("ping", "bob", home=cluster["alice"]).returncode == 0
    assert len(alice.sessions()) == 1


def test_sigterm_shuts_down_cleanly_and_tells_the_peer(cluster: dict) -> None:
    bob = cluster["start"](cluster["bob"])
    alice = cluster["start"](cluster["alice"], "--peer", f"bob=127.0.0.1:{bob.port}")
    assert pq("ping", "bob", home=cluster["alice"]).returncode == 0
    assert bob.stop(signal.SIGTERM) == 0
    assert not (cluster["bob"] / "control.sock").exists()
    alice.wait_for_log("peer closed the session: peer is shutting down")
    assert "Traceback" not in bob.logs() + alice.logs()


def test_a_killed_peer_is_noticed_and_the_session_comes_back(cluster: dict) -> None:
    bob = cluster["start"](cluster["bob"], "--listen", "127.0.0.1:0")
    port = bob.port
    alice = cluster["start"](cluster["alice"], "--peer", f"bob=127.0.0.1:{port}")
    assert pq("ping", "bob", home=cluster["alice"]).returncode == 0
    bob.kill()
    alice.wait_for_log("session down: bob")
    cluster["start"](cluster["bob"], "--listen", f"127.0.0.1:{port}")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if pq("ping", "bob", "--timeout", "3", home=cluster["alice"]).returncode == 0:
            break
    else:
        raise AssertionError(alice.logs())
    assert alice.logs().count("session up: bob") >= 2


def test_cli_user_mistakes_give_one_line_errors(tmp_path: Path) -> None:
    cases = [
        (["id"], tmp_path / "missing", "does not exist"),
        (["status"], tmp_path / "missing", "no daemon is running"),
        (["trust", "bob", "not-a-fingerprint"], None, "not a pqtunnel fingerprint"),
        (["up", "--listen", "127.0.0.1:notaport"], None, "is not a number"),
        (["up", "--peer", "bob"], None, "expected NAME=HOST:PORT"),
    ]
    home, _ = init_node(tmp_path, "alice")
    for args, case_home, expected in cases:
        result = pq(*args, home=case_home or home)
        assert result.returncode == 1, (args, result.stdout)
        assert expected in result.stderr, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    again = pq("init", "--name", "alice", home=home)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
    (home / "identity.key").chmod(0o644)
    insecure = pq("id", home=home)
    assert insecure.returncode == 1 and "chmod 600" in insecure.stderr


def test_ca_mode_end_to_end_with_revocation(tmp_path: Path) -> None:
    """No pins at all: both nodes trust a network CA; revoking alice's certificate locks her out."""
    ca_dir = tmp_path / "ca"
    assert pq("ca", "init", "--name", "corp", "--ca-dir", str(ca_dir)).returncode == 0
    homes = {}
    for name in ("alice", "bob"):
        home, fingerprint = init_node(tmp_path, name)
        signed = pq("ca", "sign", "--ca-dir", str(ca_dir), "--name", name, "--fingerprint", fingerprint,
                    "--groups", "agents", "--out", str(home / "node.cert"))
        assert signed.returncode == 0, signed.stderr
        (home / "config.toml").write_text(f'[ca]\npublic = "{ca_dir / "identity.pub"}"\nrevoked = "{ca_dir / "revoked"}"\n')
        homes[name] = home
    bob = Daemon(homes["bob"]).start()
    alice = Daemon(homes["alice"], ["--peer", f"bob=127.0.0.1:{bob.port}"]).start()
    try:
        assert pq("ping", "bob", home=homes["alice"]).returncode == 0
        (session,) = bob.sessions()
        assert session["peer"] == "alice" and session["trust"] == "ca"
        serial = json.loads(pq("ca", "show", str(homes["alice"] / "node.cert")).stdout)["serial"]
        assert pq("ca", "revoke", "--ca-dir", str(ca_dir), serial).returncode == 0
        alice.stop()
        alice = Daemon(homes["alice"], ["--peer", f"bob=127.0.0.1:{bob.port}"]).start()
        refused = pq("ping", "bob", "--timeout", "5", home=homes["alice"])
        assert refused.returncode == 1 and "untrusted" in refused.stderr
        bob.wait_for_log(f"(serial {serial}) is revoked")
    finally:
        alice.kill()
        bob.kill()
