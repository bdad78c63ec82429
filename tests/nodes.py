"""Real daemon processes for end-to-end tests (see pqlab/process.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pqlab.process import Daemon, init_node, pq, replica_home
from pqtunneld.stores import load_identity

__all__ = ["Daemon", "hostile_lab", "init_node", "local_replicas", "pq", "replica_home"]


@contextmanager
def hostile_lab(tmp_path: Path, bob_config: str) -> Iterator[dict]:
    """bob (running ``bob_config``) pins alice and mallory; alice's daemon holds a session with
    bob. Yields bob's daemon and port, alice's daemon and home, and mallory's identity, so a
    test can play mallory, an authenticated peer that misbehaves, by hand."""
    bob_home, fp_bob = init_node(tmp_path, "bob")
    mallory_home, fp_mallory = init_node(tmp_path, "mallory")
    alice_home, fp_alice = init_node(tmp_path, "alice")
    for name, fingerprint in (("mallory", fp_mallory), ("alice", fp_alice)):
        pq("trust", name, fingerprint, home=bob_home)
    pq("trust", "bob", fp_bob, home=alice_home)
    (bob_home / "config.toml").write_text(bob_config)
    daemon = Daemon(bob_home).start()
    alice = Daemon(alice_home, ["--peer", f"bob=127.0.0.1:{daemon.port}"]).start()
    try:
        yield {"daemon": daemon, "port": daemon.port, "alice": alice, "alice_home": alice_home,
               "mallory": load_identity(mallory_home)}
    finally:
        alice.kill()
        daemon.kill()


def local_replicas(root: Path, client: tuple[str, str], count: int = 2) -> tuple[list[Path], str]:
    """Homes of ``count`` replicas of bob sharing one local nonce store (``[ha] path``), each
    trusting ``client`` (name, fingerprint); returns the homes and bob's fingerprint."""
    bob_home, fp_bob = init_node(root, "bob")
    homes = [bob_home, *(replica_home(root, bob_home, f"bob-r{n}") for n in range(2, count + 1))]
    store = root / "shared-nonces.sqlite"
    for index, home in enumerate(homes, start=1):
        pq("trust", *client, home=home)
        (home / "config.toml").write_text(f'[ha]\nstore = "local"\npath = "{store}"\nreplica = "r{index}"\n')
    return homes, fp_bob
