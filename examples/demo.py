"""Live demo: two nodes on this machine, a hybrid post-quantum session, traffic both ways.

Everything runs as real processes through the `pqtunnel` command line, exactly as a user
would type it; the node homes live in a temporary directory that is removed at the end.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.process import Daemon, init_node, pq  # noqa: E402


def step(text: str) -> None:
    print(f"\n== {text}")


def show(result) -> None:  # type: ignore[no-untyped-def]
    out = (result.stdout or "") + (result.stderr or "")
    print("   " + out.strip().replace("\n", "\n   "))
    if result.returncode != 0:
        raise SystemExit(f"demo failed: {out.strip()}")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="pqtunnel-demo-") as tmp:
        root = Path(tmp)
        step("pqtunnel init --name alice / --name bob: two hybrid identities (Ed25519 + ML-DSA)")
        alice_home, alice_fp = init_node(root, "alice")
        bob_home, bob_fp = init_node(root, "bob")
        print(f"   alice {alice_fp}\n   bob   {bob_fp}")

        step("pqtunnel trust: each pins the other's fingerprint (like known_hosts)")
        show(pq("trust", "bob", bob_fp, home=alice_home))
        show(pq("trust", "alice", alice_fp, home=bob_home))

        step("pqtunnel up: two daemons on loopback; alice knows where bob listens")
        bob = Daemon(bob_home).start()
        alice = Daemon(alice_home, ["--peer", f"bob=127.0.0.1:{bob.port}"]).start()
        try:
            print(f"   bob listens on 127.0.0.1:{bob.port}")
            step("pqtunnel ping bob (alice -> bob): handshake, then a round trip through the tunnel")
            show(pq("ping", "bob", home=alice_home))
            step("pqtunnel ping alice (bob -> alice, over the same session)")
            show(pq("ping", "alice", home=bob_home))

            step("pqtunnel sessions --json (alice): the negotiated algorithms")
            (session,) = alice.sessions()
            for key in ("peer", "fingerprint", "suite", "kem", "signature", "aead", "session_id",
                        "bytes_sent", "bytes_received"):
                print(f"   {key:<15} {session[key]}")
            step("pqtunnel sessions (bob)")
            show(pq("sessions", home=bob_home))
        finally:
            alice.stop()
            bob.stop()
        step("daemon logs")
        print("   " + (alice.logs() + bob.logs()).strip().replace("\n", "\n   "))
    print("\ndemo finished: both nodes shut down cleanly")


if __name__ == "__main__":
    main()
