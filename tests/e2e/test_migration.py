"""Migrating a fleet from SSH host keys to hybrid identities, with real keys and real daemons.

Host keys are made by ``ssh-keygen``; each node signs a transition record with its own
(``pqtunnel migrate ssh``) and imports the other's known_hosts (``pqtunnel trust
--ssh-known-hosts``). A peer vouched for that way is pinned for good; a stolen key of
another host, an existing pin and a closed migration window all keep the door shut.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.nodes import Daemon, init_node, pq


def host_key(directory: Path, name: str, *options: str) -> Path:
    """A real OpenSSH host key pair (``name`` and ``name.pub``), as ssh-keygen makes it."""
    path = directory / f"ssh_host_{name}"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, *options, "-f", str(path)],
                   check=True, capture_output=True)
    return path


def known_hosts(path: Path, entries: dict[str, Path], *, hashed: bool = False) -> Path:
    path.write_text("".join(f"{host} {key.with_suffix('.pub').read_text()}" for host, key in entries.items()))
    if hashed:
        subprocess.run(["ssh-keygen", "-H", "-f", str(path)], check=True, capture_output=True)
    return path


def migrated_node(tmp_path: Path, name: str, key: Path) -> tuple[Path, str]:
    home, fingerprint = init_node(tmp_path, name)
    result = pq("migrate", "ssh", "--key", str(key), home=home)
    assert result.returncode == 0, result.stderr
    return home, fingerprint


def trust_hosts(home: Path, file: Path) -> None:
    result = pq("trust", "--ssh-known-hosts", str(file), home=home)
    assert result.returncode == 0, result.stderr


def pins(home: Path) -> str:
    path = home / "known_peers"
    return path.read_text() if path.exists() else ""


def test_ssh_trusted_peers_become_hybrid_pinned_without_pqtunnel_trust(tmp_path: Path) -> None:
    alice_key, bob_key = host_key(tmp_path, "alice"), host_key(tmp_path, "bob")
    alice_home, alice_fp = migrated_node(tmp_path, "alice", alice_key)
    bob_home, bob_fp = migrated_node(tmp_path, "bob", bob_key)
    trust_hosts(alice_home, known_hosts(tmp_path / "alice_known_hosts", {"bob": bob_key}))
    trust_hosts(bob_home, known_hosts(tmp_path / "bob_known_hosts", {"alice": alice_key}, hashed=True))
    bob = Daemon(bob_home).start()
    alice = Daemon(alice_home, ["--peer", f"bob=127.0.0.1:{bob.port}"]).start()
    try:
        ping = pq("ping", "bob", home=alice_home)
        assert ping.returncode == 0, ping.stderr
        assert f"bob {bob_fp}" in pins(alice_home) and f"alice {alice_fp}" in pins(bob_home)
        peers = json.loads(pq("peers", "--json", home=alice_home).stdout)
        assert [(p["name"], p["trust"]) for p in peers if p["name"] == "bob"] == [("bob", "migrated:ssh")]
        alice.wait_for_log("peer bob migrated (migrated:ssh)")
        status = json.loads(pq("migrate", "status", "--json", home=alice_home).stdout)
        assert status["own_record"]["fingerprint"] == alice_fp
        assert [a["state"] for a in status["anchors"]] == ["migrated"]
        assert status["migrated_peers"] == [{"name": "bob", "fingerprint": bob_fp, "method": "migrated:ssh"}]
    finally:
        alice.kill()
        bob.kill()
    report = json.loads(pq("audit", "report", "--json", home=alice_home).stdout)
    assert [(m["peer"], m["fingerprint"], m["method"]) for m in report["migrations"]] == [
        ("bob", bob_fp, "migrated:ssh")]
    # For good: with the classical path gone on both sides, the pins alone carry the next session.
    for home in (alice_home, bob_home):
        (home / "legacy_known_hosts").unlink()
        (home / "transition.rec").unlink()
    bob = Daemon(bob_home).start()
    alice = Daemon(alice_home, ["--peer", f"bob=127.0.0.1:{bob.port}"]).start()
    try:
        assert pq("ping", "bob", home=alice_home).returncode == 0
    finally:
        alice.kill()
        bob.kill()
    assert "Traceback" not in alice.logs() + bob.logs()


def _refused_dial(alice_home: Path, bob_home: Path) -> tuple[str, str]:
    """Alice dials the node at bob_home under the name bob; returns ping's stderr and alice's log."""
    bob = Daemon(bob_home).start()
    alice = Daemon(alice_home, ["--peer", f"bob=127.0.0.1:{bob.port}"]).start()
    try:
        refused = pq("ping", "bob", "--timeout", "5", home=alice_home)
        assert refused.returncode != 0
        return refused.stderr, alice.logs()
    finally:
        alice.kill()
        bob.kill()


def test_a_peer_presenting_another_hosts_ssh_key_is_refused(tmp_path: Path) -> None:
    bob_key, carol_key = host_key(tmp_path, "bob"), host_key(tmp_path, "carol")
    alice_home, _ = init_node(tmp_path, "alice")
    trust_hosts(alice_home, known_hosts(tmp_path / "kh", {"bob": bob_key, "carol": carol_key}))
    impostor_home, _ = migrated_node(tmp_path / "impostor", "bob", carol_key)  # "bob" with carol's stolen key
    stderr, log = _refused_dial(alice_home, impostor_home)
    assert "no known_hosts entry lists the key of bob's transition record" in stderr + log
    assert pins(alice_home) == ""


def test_an_existing_hybrid_pin_is_never_replaced_by_a_legacy_anchor(tmp_path: Path) -> None:
    bob_key = host_key(tmp_path, "bob")
    alice_home, _ = init_node(tmp_path, "alice")
    _, old_bob_fp = init_node(tmp_path / "old", "bob")
    assert pq("trust", "bob", old_bob_fp, home=alice_home).returncode == 0
    trust_hosts(alice_home, known_hosts(tmp_path / "kh", {"bob": bob_key}))
    bob_home, bob_fp = migrated_node(tmp_path, "bob", bob_key)  # the real host key, a new identity
    stderr, log = _refused_dial(alice_home, bob_home)
    assert f"{old_bob_fp} is pinned" in stderr + log
    assert pins(alice_home) == f"bob {old_bob_fp}\n"


def test_after_accept_until_a_transition_record_is_refused(tmp_path: Path) -> None:
    bob_key = host_key(tmp_path, "bob")
    alice_home, _ = init_node(tmp_path, "alice")
    (alice_home / "config.toml").write_text('[migration]\naccept_until = "2026-01-31"\n')
    trust_hosts(alice_home, known_hosts(tmp_path / "kh", {"bob": bob_key}))
    bob_home, _ = migrated_node(tmp_path, "bob", bob_key)
    stderr, log = _refused_dial(alice_home, bob_home)
    assert "the migration window closed" in stderr + log
    assert pins(alice_home) == ""


def _one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_unusable_keys_and_known_hosts_lines_are_one_line_errors_naming_the_file(tmp_path: Path) -> None:
    home, _ = init_node(tmp_path, "alice")
    encrypted = host_key(tmp_path, "locked", "-N", "secret")
    _one_line_error(pq("migrate", "ssh", "--key", str(encrypted), home=home), str(encrypted), "--passphrase-file")
    (tmp_path / "pass").write_text("secret\n")
    ok = pq("migrate", "ssh", "--key", str(encrypted), "--passphrase-file", str(tmp_path / "pass"), home=home)
    assert ok.returncode == 0, ok.stderr
    (home / "transition.rec").unlink()
    for kind, bits, reason in (("dsa", "1024", "DSA keys are not supported"), ("rsa", "1024", "too weak")):
        key = tmp_path / f"key_{kind}"
        subprocess.run(["ssh-keygen", "-q", "-t", kind, "-b", bits, "-N", "", "-f", str(key)], check=True,
                       capture_output=True)
        _one_line_error(pq("migrate", "ssh", "--key", str(key), home=home), str(key), reason)
    bob_key = host_key(tmp_path, "bob")
    bad = tmp_path / "bad_known_hosts"
    bad.write_text(f"# fleet\nbob {bob_key.with_suffix('.pub').read_text()}carol ssh-ed25519\n")
    _one_line_error(pq("trust", "--ssh-known-hosts", str(bad), home=home), f"{bad}:3:")
    ca = tmp_path / "ca_known_hosts"
    ca.write_text(f"@cert-authority *.example.net {bob_key.with_suffix('.pub').read_text()}")
    _one_line_error(pq("trust", "--ssh-known-hosts", str(ca), home=home), f"{ca}:1:", "@cert-authority")
    assert not (home / "transition.rec").exists() and not (home / "legacy_known_hosts").exists()


def test_a_record_made_while_the_daemon_runs_is_presented_after_a_reload(tmp_path: Path) -> None:
    bob_key = host_key(tmp_path, "bob")
    alice_home, alice_fp = init_node(tmp_path, "alice")
    bob_home, bob_fp = init_node(tmp_path, "bob")
    trust_hosts(alice_home, known_hosts(tmp_path / "kh", {"bob": bob_key}))
    assert pq("trust", "alice", alice_fp, home=bob_home).returncode == 0
    bob = Daemon(bob_home).start()
    alice = Daemon(alice_home, ["--peer", f"bob=127.0.0.1:{bob.port}"]).start()
    try:
        assert pq("ping", "bob", "--timeout", "5", home=alice_home).returncode != 0  # no record yet
        assert pq("migrate", "ssh", "--key", str(bob_key), home=bob_home).returncode == 0
        assert pq("reload", home=bob_home).returncode == 0
        ping = pq("ping", "bob", home=alice_home)
        assert ping.returncode == 0, ping.stderr
        assert f"bob {bob_fp}" in pins(alice_home)
    finally:
        alice.kill()
        bob.kill()
