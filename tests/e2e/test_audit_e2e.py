"""The audit end to end: real daemons write it, the CLI reads, verifies and reports it.

alice opens streams to bob (one allowed, one to a port bob does not allow, one to a service
bob does not have); bob's audit file must tell all of it, verify, survive a restart as a
chain across files, point at a line edited afterwards, and, when the audit is required but
cannot be written, bob must refuse new sessions instead of running unaudited.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from pqtunneld.cpufeatures import hardware_aeads
from tests.nodes import Daemon, init_node, pq

CLI = [sys.executable, "-m", "pqtunneld.cli"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def connect(home: Path, target: str, data: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*CLI, "connect", target, "--home", str(home)], input=data, capture_output=True, timeout=60)


def audit_json(home: Path, *args: str) -> list[dict]:
    result = pq("audit", *args, "--json", home=home)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def wait_for_audit_line(home: Path, text: str, timeout: float = 15.0) -> None:
    """Wait until the node's audit file holds ``text`` (lines are written when events happen)."""
    deadline = time.monotonic() + timeout
    while text not in ((home / "audit.jsonl").read_text() if (home / "audit.jsonl").exists() else ""):
        assert time.monotonic() < deadline, f"{text} not in {home / 'audit.jsonl'}"
        time.sleep(0.05)


def pair(tmp_path: Path, bob_config: str = "") -> tuple[Path, Path]:
    alice_home, fp_alice = init_node(tmp_path, "alice")
    bob_home, fp_bob = init_node(tmp_path, "bob")
    pq("trust", "bob", fp_bob, home=alice_home)
    pq("trust", "alice", fp_alice, home=bob_home)
    (bob_home / "config.toml").write_text('[services]\necho = { exec = ["cat"] }\n' + bob_config)
    return alice_home, bob_home


@pytest.fixture
def audited_run(tmp_path: Path) -> Iterator[dict]:
    """A finished run: alice's session to bob with an allowed, a port-denied and an
    unknown-service stream, both daemons stopped afterwards (the audit is read from disk)."""
    alice_home, bob_home = pair(tmp_path)
    bob = Daemon(bob_home).start()
    alice = Daemon(alice_home, ["--peer", f"bob=127.0.0.1:{bob.port}"]).start()
    try:
        echoed = connect(alice_home, "bob/echo", b"audit me\n")
        denied_port = connect(alice_home, "bob:9")
        unknown = connect(alice_home, "bob/nosuch")
        assert echoed.returncode == 0 and echoed.stdout == b"audit me\n", echoed.stderr
        assert denied_port.returncode != 0 and unknown.returncode != 0
        wait_for_audit_line(bob_home, '"event":"stream_closed"')
        alice.stop()
        bob.wait_for_log("session down: alice")
        bob.stop()
        yield {"alice_home": alice_home, "bob_home": bob_home, "bob": bob}
    finally:
        alice.kill()
        bob.kill()


def only(records: list[dict], **match: object) -> dict:
    found = [r for r in records if all(r.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, records)
    return found[0]


DEFAULT_AEAD = hardware_aeads()[0].label  # both nodes run on this CPU: its faster AEAD
HYBRID = {"suite": "hybrid", "kem": "X25519+ML-KEM-768", "signature": "Ed25519+ML-DSA-65", "aead": DEFAULT_AEAD}


def test_every_session_and_stream_event_is_one_audit_line(audited_run: dict) -> None:
    records = audit_json(audited_run["bob_home"])
    opened = records[0]
    assert opened["event"] == "audit_opened" and opened["chain"] == "new" and opened["node"] == "bob"
    up = only(records, event="session_up")
    assert up["peer"] == "alice" and up["decision"] == "allow" and up["fingerprint"].startswith("pq1:")
    assert {k: up[k] for k in HYBRID} == HYBRID and up["addr"].startswith("127.0.0.1:")
    allowed = only(records, event="stream_allowed")
    assert (allowed["service"], allowed["rule"], allowed["decision"]) == ("echo", "service:echo", "allow")
    assert {k: allowed[k] for k in HYBRID} == HYBRID
    port = only(records, event="stream_denied", port=9)
    assert (port["decision"], port["rule"]) == ("deny", "default-deny") and "not allowed" in port["reason"]
    unknown = only(records, event="stream_denied", service="nosuch")
    assert unknown["rule"] == "unknown-service"
    closed = only(records, event="stream_closed")
    assert (closed["bytes_in"], closed["bytes_out"], closed["service"]) == (9, 9, "echo")
    down = only(records, event="session_down")
    assert down["bytes_in"] > 0 and down["bytes_out"] > 0 and down["duration"] > 0 and down["reason"]
    assert {k: down[k] for k in HYBRID} == HYBRID and down["session_id"] == up["session_id"]
    assert all(len(r["hash"]) == 64 and len(r["prev"]) == 64 and r["ts"].endswith("Z") for r in records)


def test_since_shows_only_the_records_from_then_on(audited_run: dict) -> None:
    records = audit_json(audited_run["bob_home"])
    cut = only(records, event="stream_allowed")["ts"]
    later = audit_json(audited_run["bob_home"], "--since", cut)
    assert later and all(r["ts"] >= cut for r in later) and len(later) < len(records)
    assert audit_json(audited_run["bob_home"], "--since", "2h") == records
    bad = pq("audit", "--since", "yesterday-ish", home=audited_run["bob_home"])
    assert bad.returncode != 0 and "--since" in bad.stderr and "Traceback" not in bad.stderr


def test_the_text_view_shows_one_line_per_record(audited_run: dict) -> None:
    result = pq("audit", home=audited_run["bob_home"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(audit_json(audited_run["bob_home"]))
    assert any("stream_denied" in line and "rule=default-deny" in line and "port=9" in line for line in lines)


def test_verify_passes_then_names_the_line_edited_afterwards(audited_run: dict) -> None:
    home = audited_run["bob_home"]
    intact = pq("audit", "verify", "--json", home=home)
    assert intact.returncode == 0, intact.stderr
    verdict = json.loads(intact.stdout)
    assert verdict["ok"] and verdict["last_hash"] == audit_json(home)[-1]["hash"]

    path = home / "audit.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    number = next(i for i, line in enumerate(lines, 1) if b'"event":"stream_denied"' in line)
    lines[number - 1] = lines[number - 1].replace(b'"decision":"deny"', b'"decision":"allow"')
    path.write_bytes(b"".join(lines))

    broken = pq("audit", "verify", home=home)
    assert broken.returncode != 0
    assert f"audit.jsonl line {number}: changed" in broken.stderr and "Traceback" not in broken.stderr
    as_json = json.loads(pq("audit", "verify", "--json", home=home).stdout)
    assert as_json["problem"] == {"file": "audit.jsonl", "line": number, "kind": "changed",
                                  "message": "changed: its hash does not match its content"}


def test_verify_names_a_deleted_line(audited_run: dict) -> None:
    path = audited_run["bob_home"] / "audit.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    del lines[3]
    path.write_bytes(b"".join(lines))
    broken = pq("audit", "verify", home=audited_run["bob_home"])
    assert broken.returncode != 0 and "audit.jsonl line 4: removed" in broken.stderr


def test_the_report_shows_the_sessions_algorithms_and_a_full_post_quantum_share(audited_run: dict) -> None:
    result = pq("audit", "report", "--json", home=audited_run["bob_home"])
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["chain"]["ok"] and report["nodes"] == ["bob"]
    assert report["sessions"] == 1 and report["bytes"] > 0
    assert list(report["by_kem"]) == ["X25519+ML-KEM-768"]
    assert list(report["by_signature"]) == ["Ed25519+ML-DSA-65"]
    assert list(report["by_aead"]) == [DEFAULT_AEAD]
    assert report["post_quantum"]["share_of_bytes"] == 100.0
    assert report["post_quantum"]["share_of_sessions"] == 100.0
    assert report["legacy_sessions"] == [] and report["peers_never_post_quantum"] == []
    assert report["denials"]["by_rule"] == {"default-deny": 1, "unknown-service": 1}
    text = pq("audit", "report", home=audited_run["bob_home"])
    assert text.returncode == 0 and "post-quantum: 1 of 1 session(s) (100 %)" in text.stdout


def test_a_restart_starts_a_new_file_that_continues_the_chain(audited_run: dict) -> None:
    home = audited_run["bob_home"]
    before = audit_json(home)
    Daemon(home).start().stop()
    assert (home / "audit.jsonl.1").exists()
    first_of_new = json.loads((home / "audit.jsonl").read_bytes().splitlines()[0])
    assert first_of_new["event"] == "audit_opened" and first_of_new["chain"] == "continued"
    assert first_of_new["prev"] == before[-1]["hash"]
    verdict = json.loads(pq("audit", "verify", "--json", home=home).stdout)
    assert verdict["ok"] and verdict["lines"] == len(audit_json(home)) > len(before)
    assert len(verdict["files"]) == 2

    (home / "audit.jsonl.1").unlink()  # a rotated file removed: the chain has lost its start
    broken = pq("audit", "verify", home=home)
    assert broken.returncode != 0 and "audit.jsonl line 1: removed" in broken.stderr


def test_a_refused_handshake_is_a_denial_with_its_rule_and_the_peers_fingerprint(tmp_path: Path) -> None:
    alice_home, fp_alice = init_node(tmp_path, "alice")
    bob_home, fp_bob = init_node(tmp_path, "bob")
    pq("trust", "bob", fp_bob, home=alice_home)  # bob does not pin alice
    bob = Daemon(bob_home).start()
    alice = Daemon(alice_home, ["--peer", f"bob=127.0.0.1:{bob.port}"]).start()
    try:
        assert pq("ping", "bob", "--timeout", "5", home=alice_home).returncode != 0
        bob.wait_for_log("failed")
    finally:
        alice.kill()
        bob.stop()
    refused = [r for r in audit_json(bob_home) if r["event"] == "handshake_failed"]
    assert refused, audit_json(bob_home)
    assert all((r["decision"], r["rule"], r["fingerprint"]) == ("deny", "default-deny", fp_alice) for r in refused)
    assert all(r["suite"] == "hybrid" and "not pinned" in r["reason"] for r in refused)
    report = json.loads(pq("audit", "report", "--json", home=bob_home).stdout)
    assert report["denials"]["by_rule"] == {"default-deny": len(refused)} and report["sessions"] == 0


def test_audit_path_moves_the_file(tmp_path: Path) -> None:
    alice_home, bob_home = pair(tmp_path, '[audit]\npath = "records/bob-audit.jsonl"\n')
    bob = Daemon(bob_home).start()
    try:
        alice = Daemon(alice_home, ["--peer", f"bob=127.0.0.1:{bob.port}"]).start()
        assert pq("ping", "bob", home=alice_home).returncode == 0
        alice.kill()
    finally:
        bob.stop()
    assert (bob_home / "records" / "bob-audit.jsonl").exists() and not (bob_home / "audit.jsonl").exists()
    assert any(r["event"] == "session_up" for r in audit_json(bob_home))
    assert pq("audit", "verify", home=bob_home).returncode == 0


def unwritable_audit(bob_home: Path) -> str:
    """An audit path that even root cannot create: its directory is a regular file."""
    (bob_home / "not-a-dir").write_text("")
    return '[audit]\npath = "not-a-dir/audit.jsonl"\n'


def test_a_required_audit_that_cannot_be_written_refuses_new_sessions(tmp_path: Path) -> None:
    alice_home, bob_home = pair(tmp_path)
    config = bob_home / "config.toml"
    config.write_text(config.read_text() + unwritable_audit(bob_home) + "required = true\n")
    alice_port, bob_port = free_port(), free_port()
    bob = Daemon(bob_home, ["--listen", f"127.0.0.1:{bob_port}", "--peer", f"alice=127.0.0.1:{alice_port}"]).start()
    alice = Daemon(alice_home, ["--listen", f"127.0.0.1:{alice_port}", "--peer", f"bob=127.0.0.1:{bob_port}"]).start()
    try:
        logs = bob.wait_for_log("AUDIT: cannot write")
        assert "new sessions and streams are refused" in logs
        inbound = pq("ping", "bob", "--timeout", "5", home=alice_home)
        assert inbound.returncode != 0
        logs = bob.wait_for_log("refusing new sessions")
        assert "cannot be written" in logs and "[audit] required = true" in logs
        outbound = pq("ping", "alice", "--timeout", "5", home=bob_home)  # bob dials: refused before it starts
        assert outbound.returncode != 0
        assert "[audit] required = true" in outbound.stderr and "refusing new sessions" in outbound.stderr
        assert bob.sessions() == [] and alice.sessions() == []
    finally:
        alice.kill()
        bob.kill()


def test_an_optional_audit_that_cannot_be_written_is_logged_loudly_and_the_node_runs(tmp_path: Path) -> None:
    alice_home, bob_home = pair(tmp_path)
    config = bob_home / "config.toml"
    config.write_text(config.read_text() + unwritable_audit(bob_home))
    bob = Daemon(bob_home).start()
    alice = Daemon(alice_home, ["--peer", f"bob=127.0.0.1:{bob.port}"]).start()
    try:
        assert pq("ping", "bob", home=alice_home).returncode == 0
        logs = bob.wait_for_log("AUDIT: cannot write")
        assert "ERROR" in logs and "running unaudited" in logs
    finally:
        alice.kill()
        bob.kill()
