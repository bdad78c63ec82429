"""End to end: [policy] with real daemons, driven only through the CLI and config.toml.

bob serves exec services (``cat`` echoes, ``head -c`` streams a fixed number of bytes) and
decides who reaches them: grants by name, CA group and fingerprint; a trigger that forces
pq-strong on loopback; a legacy (classical) peer held to its legacy service and its byte
budget; reloads by command and by SIGHUP, with changed, broken and self-contradicting
policies; pins added while the node runs.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from pqlab.process import CLI
from tests.nodes import Daemon, init_node, pq

SERVICES = """
[services]
web = { exec = ["cat"] }
db = { exec = ["cat"] }
tools = { exec = ["cat"] }
status = { exec = ["cat"] }
"""


def connect(home: Path, target: str, data: bytes = b"ping\n", timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    """``pqtunnel connect`` with ``data`` on stdin."""
    return subprocess.run([*CLI, "connect", target, "--home", str(home)], input=data, capture_output=True,
                          timeout=timeout)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def socks_connect(port: int, host: bytes) -> int:
    """A raw SOCKS5 CONNECT to ``host``:80; returns the reply code."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert sock.recv(2) == b"\x05\x00"
        sock.sendall(b"\x05\x01\x00\x03" + bytes([len(host)]) + host + b"\x00\x50")
        return sock.recv(10)[1]


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[dict]:
    """bob serves; alice and dave are pinned by bob; carol proves her name and group ops with a
    CA certificate; everyone pins bob."""
    ca_dir = tmp_path / "ca"
    assert pq("ca", "init", "--name", "corp", "--ca-dir", str(ca_dir)).returncode == 0
    homes, fps = {}, {}
    for name in ("alice", "bob", "carol", "dave"):
        homes[name], fps[name] = init_node(tmp_path, name)
    for name in ("alice", "dave"):
        assert pq("trust", name, fps[name], home=homes["bob"]).returncode == 0
    for name in ("alice", "carol", "dave"):
        assert pq("trust", "bob", fps["bob"], home=homes[name]).returncode == 0
    signed = pq("ca", "sign", "--ca-dir", str(ca_dir), "--name", "carol", "--fingerprint", fps["carol"],
                "--groups", "ops", "--out", str(homes["carol"] / "node.cert"))
    assert signed.returncode == 0, signed.stderr
    daemons: list[Daemon] = []

    def start(name: str, *extra: str) -> Daemon:
        daemon = Daemon(homes[name], list(extra)).start()
        daemons.append(daemon)
        return daemon

    def configure(name: str, text: str) -> None:
        (homes[name] / "config.toml").write_text(text)

    yield {"home": homes, "fp": fps, "ca": ca_dir, "start": start, "configure": configure}
    for daemon in daemons:
        daemon.kill()


def bob_config(lab: dict, policy: str, node: str = "") -> str:
    return f'[node]\n{node}\n[ca]\npublic = "{lab["ca"] / "identity.pub"}"\n{SERVICES}\n{policy}'


GRANTS = """
[policy]
[[policy.grant]]
src = ["alice"]
dst = ["web"]

[[policy.grant]]
src = ["group:ops"]
dst = ["db"]

[[policy.grant]]
src = ["{dave}"]
dst = ["tools"]
"""


def test_grants_allow_by_name_group_and_fingerprint_and_deny_everything_else(lab: dict) -> None:
    lab["configure"]("bob", bob_config(lab, GRANTS.format(dave=lab["fp"]["dave"])))
    bob = lab["start"]("bob")
    socks = free_port()
    for name in ("alice", "carol", "dave"):
        extra = ["--socks", f"127.0.0.1:{socks}"] if name == "alice" else []
        lab["start"](name, "--peer", f"bob=127.0.0.1:{bob.port}", *extra)
    allowed = {"alice": "web", "carol": "db", "dave": "tools"}
    for name, service in allowed.items():
        result = connect(lab["home"][name], f"bob/{service}", b"hello " + name.encode())
        assert result.returncode == 0 and result.stdout == b"hello " + name.encode(), result.stderr
        for other in set(allowed.values()) - {service}:
            denied = connect(lab["home"][name], f"bob/{other}")
            assert denied.returncode != 0 and denied.stdout == b""
            assert denied.stderr.decode().count("\n") == 1 and b"Traceback" not in denied.stderr
            assert f"no grant lets {name}".encode() in denied.stderr
    assert socks_connect(socks, b"db.bob.pq") == 0x02  # not allowed by ruleset
    assert socks_connect(socks, b"web.bob.pq") == 0x00
    logs = bob.wait_for_log("refused stream")
    assert "carol (groups ops) reach service web" in logs
    audited = json.loads(pq("audit", "--json", home=lab["home"]["bob"]).stdout)
    allowed_rules = {record.get("rule") for record in audited if record.get("event") == "stream_allowed"}
    assert {"grant:2", "grant:3"} <= allowed_rules  # stream opens are audited (logged at debug only)


def test_a_trigger_upgrades_a_loopback_session_to_pq_strong_and_refuses_a_peer_that_cannot(lab: dict) -> None:
    trigger = '[policy]\n[[policy.grant]]\nsrc = ["*"]\ndst = ["*"]\n' \
              '[[policy.trigger]]\noutside = ["10.0.0.0/8"]\nmin_suite = "pq-strong"\n'
    lab["configure"]("bob", bob_config(lab, trigger))
    bob = lab["start"]("bob")
    alice = lab["start"]("alice", "--peer", f"bob=127.0.0.1:{bob.port}")
    assert pq("ping", "bob", home=lab["home"]["alice"]).returncode == 0
    (session,) = alice.sessions()
    assert session["suite"] == "pq-strong" and session["kem"] == "X25519+ML-KEM-1024"
    assert session["signature"] == "Ed25519+ML-DSA-87"
    assert bob.sessions()[0]["suite"] == "pq-strong"
    lab["configure"]("dave", '[node]\nsuites = ["hybrid"]\n')
    lab["start"]("dave", "--peer", f"bob=127.0.0.1:{bob.port}")
    refused = pq("ping", "bob", "--timeout", "5", home=lab["home"]["dave"])
    assert refused.returncode != 0 and "no common suite" in refused.stderr
    assert "trigger:1: sessions from 127.0.0.1 (outside 10.0.0.0/8) must use at least pq-strong" in \
        bob.wait_for_log("trigger:1")
    assert [s["peer"] for s in bob.sessions()] == ["alice"]


def test_a_legacy_peer_reaches_only_its_legacy_service_and_is_throttled_while_hybrid_runs_free(lab: dict) -> None:
    size, rate, burst = 512 * 1024, 128 * 1024, 64 * 1024
    legacy = f"""
[policy]
[[policy.grant]]
src = ["*"]
dst = ["*"]

[policy.legacy]
services = ["status", "bulk"]
rate = "128KiB/s"
burst = "64KiB"
"""
    services = f'bulk = {{ exec = ["head", "-c", "{size}", "/dev/zero"] }}\n'
    lab["configure"]("bob", bob_config(lab, legacy, 'suites = ["hybrid", "pq-strong", "classical"]')
                     .replace("[services]\n", "[services]\n" + services))
    bob = lab["start"]("bob")
    lab["configure"]("dave", '[node]\nsuites = ["classical"]\n')
    lab["start"]("dave", "--peer", f"bob=127.0.0.1:{bob.port}")
    lab["start"]("alice", "--peer", f"bob=127.0.0.1:{bob.port}")
    assert connect(lab["home"]["dave"], "bob/status", b"old").stdout == b"old"
    denied = connect(lab["home"]["dave"], "bob/web")
    assert denied.returncode != 0
    assert b"legacy sessions may reach only status, bulk" in denied.stderr
    assert [s["suite"] for s in bob.sessions() if s["peer"] == "dave"] == ["classical"]

    def timed(name: str) -> float:
        started = time.monotonic()
        result = connect(lab["home"][name], "bob/bulk", b"", timeout=60)
        assert result.returncode == 0 and len(result.stdout) == size, result.stderr
        return time.monotonic() - started

    assert connect(lab["home"]["alice"], "bob/web", b"new").stdout == b"new"
    hybrid, classical = timed("alice"), timed("dave")
    # at most one burst saved up plus one burst in flight; the rest at the rate
    assert classical >= (size - 2 * burst) / rate, classical
    assert classical > 3 * hybrid, (classical, hybrid)


POLICY_V1 = """
[policy]
[[policy.grant]]
src = ["alice"]
dst = ["web", "tools"]
"""
POLICY_V2 = """
[policy]
[[policy.grant]]
src = ["alice"]
dst = ["web"]
"""


def _open_pipe(home: Path, target: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*CLI, "connect", target, "--home", str(home)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _echo(pipe: subprocess.Popen[bytes], data: bytes) -> bytes:
    assert pipe.stdin is not None and pipe.stdout is not None
    pipe.stdin.write(data)
    pipe.stdin.flush()
    return pipe.stdout.read(len(data))


def test_reload_applies_a_changed_policy_and_closes_only_what_it_no_longer_allows(lab: dict) -> None:
    lab["configure"]("bob", bob_config(lab, POLICY_V1))
    bob = lab["start"]("bob")
    lab["start"]("alice", "--peer", f"bob=127.0.0.1:{bob.port}")
    web, tools = _open_pipe(lab["home"]["alice"], "bob/web"), _open_pipe(lab["home"]["alice"], "bob/tools")
    try:
        assert _echo(web, b"web-1\n") == b"web-1\n" and _echo(tools, b"tools-1\n") == b"tools-1\n"
        (before,) = bob.sessions()
        lab["configure"]("bob", bob_config(lab, POLICY_V2))
        reloaded = pq("reload", home=lab["home"]["bob"])
        assert reloaded.returncode == 0, reloaded.stderr
        assert "closed 0 session(s) and 1 stream(s)" in reloaded.stdout
        assert tools.wait(timeout=15) is not None  # its stream was reset by bob
        assert _echo(web, b"web-2\n") == b"web-2\n"  # still allowed: never interrupted
        (after,) = bob.sessions()
        assert after["session_id"] == before["session_id"]
        logs = bob.wait_for_log("closed by the reloaded policy: no grant lets alice reach service tools")
        assert "configuration reloaded" in logs
        assert connect(lab["home"]["alice"], "bob/tools").returncode != 0
    finally:
        for pipe in (web, tools):
            pipe.kill()
            pipe.wait()


def test_reload_closes_a_session_a_new_trigger_denies_and_the_peer_comes_back_stronger(lab: dict) -> None:
    lab["configure"]("bob", bob_config(lab, POLICY_V1))
    bob = lab["start"]("bob")
    alice = lab["start"]("alice", "--peer", f"bob=127.0.0.1:{bob.port}")
    assert pq("ping", "bob", home=lab["home"]["alice"]).returncode == 0
    assert alice.sessions()[0]["suite"] == "hybrid"
    trigger = POLICY_V1 + '[[policy.trigger]]\noutside = ["10.0.0.0/8"]\nmin_suite = "pq-strong"\n'
    lab["configure"]("bob", bob_config(lab, trigger))
    reloaded = pq("reload", home=lab["home"]["bob"])
    assert reloaded.returncode == 0 and "closed 1 session(s)" in reloaded.stdout, reloaded.stderr
    alice.wait_for_log("peer closed the session: denied by the reloaded policy: sessions from 127.0.0.1 must use "
                       "at least pq-strong")
    ping = pq("ping", "bob", "--timeout", "15", home=lab["home"]["alice"])
    assert ping.returncode == 0 and "ML-KEM-1024" in ping.stdout, ping.stderr


def line_of(text: str, header: str) -> int:
    return text.splitlines().index(header) + 1


@pytest.mark.parametrize("broken, header, named", [
    ('[policy]\n[[policy.grant]]\nsrc = ["alice"]]\ndst = ["web"]\n', None, "is not valid TOML: Expected newline or end of "
     "document after a statement (at line"),
    ('[policy]\n[[policy.grant]]\nsrc = ["alice"]\ndst = ["web"]\nmin_suite = "quantum"\n', "[[policy.grant]]",
     "[[policy.grant]] #1: min_suite: 'quantum' is not a suite"),
    (POLICY_V2 + '[[policy.test]]\nsrc = "alice"\naccept = ["tools"]\n', "[[policy.test]]",
     "policy test #1 (src 'alice'): alice -> tools should be accepted, but is denied by default-deny"),
])
def test_a_reload_that_does_not_parse_or_fails_its_tests_is_refused_and_the_old_policy_stays(
        lab: dict, broken: str, header: str | None, named: str) -> None:
    lab["configure"]("bob", bob_config(lab, POLICY_V1))
    bob = lab["start"]("bob")
    lab["start"]("alice", "--peer", f"bob=127.0.0.1:{bob.port}")
    assert connect(lab["home"]["alice"], "bob/tools", b"x").stdout == b"x"
    text = bob_config(lab, broken)
    lab["configure"]("bob", text)
    refused = pq("reload", home=lab["home"]["bob"])
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert "reload refused, the previous configuration stays in force" in refused.stderr
    where = str(lab["home"]["bob"] / "config.toml") + (f":{line_of(text, header)}: " if header else "")
    assert where in refused.stderr and named in refused.stderr, refused.stderr
    assert connect(lab["home"]["alice"], "bob/tools", b"y").stdout == b"y"  # the old policy is in force
    assert "configuration refused, the previous one stays in force" in bob.logs()


def test_sighup_reloads_instead_of_killing_the_daemon(lab: dict) -> None:
    lab["configure"]("bob", bob_config(lab, POLICY_V1))
    bob = lab["start"]("bob")
    lab["start"]("alice", "--peer", f"bob=127.0.0.1:{bob.port}")
    assert connect(lab["home"]["alice"], "bob/tools", b"x").stdout == b"x"
    lab["configure"]("bob", bob_config(lab, POLICY_V2))
    assert bob.process is not None
    bob.process.send_signal(signal.SIGHUP)
    bob.wait_for_log("configuration reloaded")
    assert bob.process.poll() is None and bob.status()["policy"] == "1 grant(s), 0 trigger(s), 0 test(s)"
    assert connect(lab["home"]["alice"], "bob/tools").returncode != 0
    lab["configure"]("bob", "[policy\n")
    bob.process.send_signal(signal.SIGHUP)
    bob.wait_for_log("configuration refused")
    assert bob.process.poll() is None
    assert connect(lab["home"]["alice"], "bob/web", b"z").stdout == b"z"


def test_a_pin_added_to_a_running_node_counts_at_once(lab: dict) -> None:
    bob = lab["start"]("bob")
    lab["start"]("carol", "--peer", f"bob=127.0.0.1:{bob.port}")  # no CA on bob: carol is a stranger
    assert pq("ping", "bob", "--timeout", "5", home=lab["home"]["carol"]).returncode != 0
    pinned = pq("trust", "carol", lab["fp"]["carol"], home=lab["home"]["bob"])
    assert pinned.returncode == 0 and "the running daemon uses it now" in pinned.stdout
    ping = pq("ping", "bob", "--timeout", "15", home=lab["home"]["carol"])
    assert ping.returncode == 0, ping.stderr
    assert [s["peer"] for s in bob.sessions()] == ["carol"]
