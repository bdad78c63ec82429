"""Trust is re-checked on live sessions, not only at the handshake (hardening issue, finding 6):
a certificate revoked while its session runs ends that session at the next rekey."""

from __future__ import annotations

import json
from pathlib import Path

from tests.nodes import Daemon, init_node, pq

TIMERS = "[timers]\nrekey_after = 2\nkeepalive = 1\ndead_after = 30\n"


def _ca_node(tmp_path: Path, ca_dir: Path, name: str) -> Path:
    home, fingerprint = init_node(tmp_path, name)
    signed = pq("ca", "sign", "--ca-dir", str(ca_dir), "--name", name, "--fingerprint", fingerprint,
                "--out", str(home / "node.cert"))
    assert signed.returncode == 0, signed.stderr
    (home / "config.toml").write_text(
        f'[ca]\npublic = "{ca_dir / "identity.pub"}"\nrevoked = "{ca_dir / "revoked"}"\n' + TIMERS)
    return home


def test_a_certificate_revoked_during_a_session_ends_it_at_the_next_rekey(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    assert pq("ca", "init", "--name", "corp", "--ca-dir", str(ca_dir)).returncode == 0
    alice_home = _ca_node(tmp_path, ca_dir, "alice")
    bob_home = _ca_node(tmp_path, ca_dir, "bob")
    bob = Daemon(bob_home).start()
    alice = Daemon(alice_home, ["--peer", f"bob=127.0.0.1:{bob.port}"]).start()
    try:
        assert pq("ping", "bob", home=alice_home).returncode == 0
        bob.wait_for_log("rekeyed session with alice")  # rekeys alone do not end a trusted session
        assert [s["peer"] for s in bob.sessions()] == ["alice"]
        serial = json.loads(pq("ca", "show", str(alice_home / "node.cert")).stdout)["serial"]
        assert pq("ca", "revoke", "--ca-dir", str(ca_dir), serial).returncode == 0
        bob.wait_for_log("peer no longer trusted")
        bob.wait_for_log(f"(serial {serial}) is revoked")
        alice.wait_for_log("peer closed the session: peer no longer trusted")
        refused = pq("ping", "bob", "--timeout", "5", home=alice_home)
        assert refused.returncode != 0
    finally:
        alice.kill()
        bob.kill()
    assert "Traceback" not in bob.logs()
