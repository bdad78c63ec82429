"""Live demo: two nodes on this machine, a hybrid post-quantum session, traffic both ways.

Everything runs as real processes through the `pqtunnel` command line, exactly as a user
would type it; the node homes live in a temporary directory that is removed at the end.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pqlab.process import Daemon, init_node, pq  # noqa: E402


def step(text: str) -> None:
    print(f"\n== {text}")


def show(result) -> None:  # type: ignore[no-untyped-def]
    out = (result.stdout or "") + (result.stderr or "")
    print("   " + out.strip().replace("\n", "\n   "))
    if result.returncode != 0:
        raise SystemExit(f"demo failed: {out.strip()}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def start_web(root: Path) -> ThreadingHTTPServer:
    """bob's local web app: only reachable on bob's loopback, and through the tunnel."""
    (root / "index.html").write_text("hello from bob's web service\n")
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


SHOUT = "import sys\nfor line in sys.stdin: print(line.strip().upper(), flush=True)"


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

        step("bob's config.toml: a web service and a stdio service, both private to bob")
        (root / "www").mkdir()
        web = start_web(root / "www")
        config = (f'[services]\nweb = "127.0.0.1:{web.server_address[1]}"\n'
                  f'shout = {{ exec = ["{sys.executable}", "-c", {SHOUT!r}] }}\n').replace("'", '"')
        (bob_home / "config.toml").write_text(config)
        print("   " + config.strip().replace("\n", "\n   "))

        step("pqtunnel up: two daemons on loopback; alice knows where bob listens and offers SOCKS5")
        socks = free_port()
        bob = Daemon(bob_home).start()
        alice = Daemon(alice_home, ["--peer", f"bob=127.0.0.1:{bob.port}", "--socks", f"127.0.0.1:{socks}"]).start()
        try:
            print(f"   bob listens on 127.0.0.1:{bob.port}; alice's SOCKS5 endpoint is 127.0.0.1:{socks}")
            step("pqtunnel ping bob (alice -> bob): handshake, then a round trip through the tunnel")
            show(pq("ping", "bob", home=alice_home))
            step("pqtunnel ping alice (bob -> alice, over the same session)")
            show(pq("ping", "alice", home=bob_home))

            step(f"curl --socks5-hostname 127.0.0.1:{socks} http://web.bob.pq/  (alice reaches bob's web by name)")
            show(subprocess.run(["curl", "-sS", "--noproxy", "", "--socks5-hostname", f"127.0.0.1:{socks}",
                                 "http://web.bob.pq/"], capture_output=True, text=True, timeout=30))

            step("echo ... | pqtunnel connect bob/shout  (stdin -> bob's process -> stdout: data both ways)")
            show(subprocess.run([sys.executable, "-m", "pqtunneld.cli", "connect", "bob/shout", "--home", str(alice_home)],
                                input="post-quantum hello\nfrom alice\n", capture_output=True, text=True, timeout=30))

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
            web.shutdown()
        step("daemon logs")
        print("   " + (alice.logs() + bob.logs()).strip().replace("\n", "\n   "))
    print("\ndemo finished: both nodes shut down cleanly")


if __name__ == "__main__":
    main()
