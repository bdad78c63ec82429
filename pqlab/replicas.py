"""Replicas of one node behind capturing relays, and a peer that reaches them: the HA lab.

``ReplicaLab`` builds, on loopback, what docs/ha.md describes: N daemons of node ``bob``
sharing one identity (``identity.key`` and ``identity.pub`` copied into each replica's
home), each with ``[ha] replica = "rN"`` and the chosen store, each serving ``web`` from a
local HTTP server, each behind a ``Relay`` (pqlab/relay.py) that captures every byte; and
``alice``, who knows bob by the relays' addresses (``--peer bob=R1,R2,R3``) and offers
SOCKS5. Replicas listen on fixed ports, so a replica restarted after a SIGKILL is found
again by its relay. Used by tests/e2e/test_ha_failover.py and benchmarks/failover.py.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .etcd import free_port
from .process import Daemon, init_node, pq, replica_home
from .relay import RecordSeen, Relay, serving

STORES = ("etcd", "local", "none")


class LabSetupError(RuntimeError):
    """The lab could not be built (a node could not be initialised or trusted)."""


@dataclass
class Replica:
    """One replica of bob: its home, its fixed tunnel port, its relay, its daemon while it runs."""

    name: str
    home: Path
    port: int
    relay: Relay | None = None
    daemon: Daemon | None = None
    frozen: bool = False
    starts: int = 0

    @property
    def address(self) -> str:
        """Where alice dials this replica: its relay, or the replica itself without one."""
        return self.relay.address if self.relay is not None else f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.daemon is not None and self.daemon.process is not None and self.daemon.process.poll() is None

    def start(self) -> Daemon:
        self.daemon = Daemon(self.home, ["--listen", f"127.0.0.1:{self.port}"]).start()
        self.frozen = False
        self.starts += 1
        return self.daemon

    def kill(self) -> None:
        """SIGKILL (a crash: no CLOSE to the peer) and reap it; a frozen replica dies too."""
        if self.daemon is not None:
            self.daemon.kill()
        self.frozen = False

    def freeze(self) -> None:
        """SIGSTOP: its sockets stay open, it answers nothing."""
        if self.running and not self.frozen:
            assert self.daemon is not None and self.daemon.process is not None
            os.kill(self.daemon.process.pid, signal.SIGSTOP)
            self.frozen = True

    def thaw(self) -> None:
        if self.running and self.frozen:
            assert self.daemon is not None and self.daemon.process is not None
            os.kill(self.daemon.process.pid, signal.SIGCONT)
        self.frozen = False

    def logs(self) -> str:
        return self.daemon.logs() if self.daemon is not None else ""


@dataclass
class ReplicaLab:
    """bob's replicas (store ``etcd``, ``local``, or ``none``: one plain node) and alice with SOCKS.

    ``web_ports`` gives each replica's local HTTP server (one port for all, or one each).
    ``alice_config`` is alice's config.toml (e.g. short ``[timers]`` so a frozen replica is
    declared dead soon).
    """

    root: Path
    web_ports: Sequence[int]
    replicas: int = 3
    store: str = "etcd"
    etcd: Sequence[str] = ()
    relays: bool = True
    alice_config: str = ""
    members: list[Replica] = field(default_factory=list)
    alice: Daemon | None = None
    socks_port: int = 0

    def start(self) -> ReplicaLab:
        if self.store not in STORES or (self.store == "none" and self.replicas != 1):
            raise LabSetupError(f"store {self.store!r} with {self.replicas} replicas: use one of {STORES}"
                                " (\"none\" is one plain node)")
        if self.store == "etcd" and not self.etcd:
            raise LabSetupError("store etcd needs the cluster's endpoints")
        alice_home, fp_alice = init_node(self.root, "alice")
        first, fp_bob = init_node(self.root, "bob")
        for index in range(1, self.replicas + 1):
            home = first if index == 1 else replica_home(self.root, first, f"bob-r{index}")
            self._trust(home, "alice", fp_alice)
            (home / "config.toml").write_text(self._replica_config(index))
            replica = Replica(f"r{index}", home, free_port())
            if self.relays:
                replica.relay = Relay(replica.name, ("127.0.0.1", replica.port)).start()
            self.members.append(replica)
        for replica in self.members:
            replica.start()
        self._trust(alice_home, "bob", fp_bob)
        (alice_home / "config.toml").write_text(self.alice_config)
        self.socks_port = free_port()
        addresses = ",".join(replica.address for replica in self.members)
        self.alice = Daemon(alice_home, ["--socks", f"127.0.0.1:{self.socks_port}", "--peer", f"bob={addresses}"])
        self.alice.start()
        return self

    @staticmethod
    def _trust(home: Path, name: str, fingerprint: str) -> None:
        result = pq("trust", name, fingerprint, home=home)
        if result.returncode != 0:
            raise LabSetupError(f"pqtunnel trust {name} in {home}: {result.stderr.strip()}")

    def _replica_config(self, index: int) -> str:
        web = self.web_ports[(index - 1) % len(self.web_ports)]
        services = f'[services]\nweb = "127.0.0.1:{web}"\n'
        if self.store == "none":
            return services
        if self.store == "local":
            return services + f'\n[ha]\nstore = "local"\npath = "{self.root / "nonces.sqlite"}"\nreplica = "r{index}"\n'
        urls = ", ".join(f'"{url}"' for url in self.etcd)
        return services + f'\n[ha]\nstore = "etcd"\netcd = [{urls}]\nreplica = "r{index}"\n'

    def stop(self) -> None:
        """SIGKILL everything (frozen replicas too) and close the relays."""
        if self.alice is not None:
            self.alice.kill()
        for replica in self.members:
            replica.kill()
            if replica.relay is not None:
                replica.relay.close()

    def __enter__(self) -> ReplicaLab:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what the relays saw --------------------------------------------------------------------------

    def serving(self) -> Replica | None:
        """The replica whose relay carried data last on a live connection (None: no live connection)."""
        found = serving(r.relay for r in self.members if r.relay is not None)
        if found is None:
            return None
        return next(r for r in self.members if r.relay is found[0])

    def records(self) -> list[RecordSeen]:
        """Every RECORD header that crossed any relay, in capture order per connection."""
        return [record for r in self.members if r.relay is not None for record in r.relay.records()]

    def replica(self, name: str) -> Replica:
        return next(r for r in self.members if r.name == name)

    def daemon_logs(self) -> dict[str, str]:
        logs = {r.name: r.logs() for r in self.members}
        logs["alice"] = self.alice.logs() if self.alice is not None else ""
        return logs
