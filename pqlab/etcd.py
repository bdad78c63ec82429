"""A throwaway 3-member etcd cluster on 127.0.0.1 for tests and benchmarks.

Each member gets two free loopback ports (client, peer) and a data directory under a temp
directory; ``start()`` returns once every member answers ``/health`` and a leader exists
(~0.3-2.6 s on the lab machines). Members are stopped with SIGKILL and their pids are
waited for: SIGTERM can take ~9 s, and a member still running when the next cluster starts
on the same ports reports "already bootstrapped". A test can SIGKILL one member (the leader
too) mid-run, freeze members with SIGSTOP/SIGCONT (a minority partition as seen from the one
member left running), and restart a killed member from its data directory.

Needs Debian's ``etcd-server`` (``/usr/bin/etcd``), installed by ``scripts/setup.sh``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ETCD = "etcd"
START_TIMEOUT = 20.0
PROBE_TIMEOUT = 0.5


class EtcdLabError(RuntimeError):
    """The lab cluster could not be started or asked; the message says which member and why."""


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(url: str, body: dict[str, Any] | None = None, timeout: float = PROBE_TIMEOUT) -> dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@dataclass
class Member:
    """One etcd process: its name, ports, data directory and (while running) its process."""

    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def healthy(self) -> bool:
        try:
            return _get_json(f"{self.client_url}/health").get("health") == "true"
        except (OSError, ValueError):
            return False

    def status(self) -> dict[str, Any] | None:
        """``/v3/maintenance/status``: this member's id (``header.member_id``) and the leader's."""
        try:
            return _get_json(f"{self.client_url}/v3/maintenance/status", {})
        except (OSError, ValueError):
            return None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class EtcdCluster:
    """Three etcd members on loopback; use as a context manager or call start()/stop()."""

    size: int = 3
    members: list[Member] = field(default_factory=list)
    root: Path | None = None

    # --- life cycle ------------------------------------------------------------------------------

    def start(self) -> EtcdCluster:
        if shutil.which(ETCD) is None:
            raise EtcdLabError("etcd is not installed (Debian package etcd-server; run scripts/setup.sh)")
        self.root = Path(tempfile.mkdtemp(prefix="pqlab-etcd-"))
        self.members = [
            Member(f"m{i}", free_port(), free_port(), self.root / f"m{i}", self.root / f"m{i}.log")
            for i in range(1, self.size + 1)
        ]
        for member in self.members:
            self._spawn(member, "new")
        try:
            self.wait_healthy()
        except EtcdLabError:
            self.stop()
            raise
        return self

    def _initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def _spawn(self, member: Member, state: str) -> None:
        argv = [
            ETCD, "--name", member.name, "--data-dir", str(member.data_dir),
            "--listen-client-urls", member.client_url, "--advertise-client-urls", member.client_url,
            "--listen-peer-urls", member.peer_url, "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", self._initial_cluster(), "--initial-cluster-state", state,
            "--initial-cluster-token", f"pqlab-{os.getpid()}-{id(self)}",
            "--pre-vote",  # a member cut off (or frozen) does not force a new election when it returns
            "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
        ]
        with member.log_path.open("ab") as log:
            member.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL)

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        """Until every running member answers ``/health`` with true (a leader is elected)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = [m for m in self.members if m.running]
            dead = [m for m in self.members if m.process is not None and not m.running
                    and m.process.returncode != -signal.SIGKILL]
            if dead:
                raise EtcdLabError(f"etcd member {dead[0].name} exited with {dead[0].process.returncode}:\n"
                                   f"{dead[0].logs()[-2000:]}")
            if running and all(m.healthy() for m in running):
                return
            time.sleep(0.05)
        raise EtcdLabError(f"etcd cluster not healthy within {timeout:.0f} s:\n"
                           + "\n".join(f"{m.name}: {m.logs()[-800:]}" for m in self.members))

    def stop(self) -> None:
        """SIGKILL every member, wait for each pid, remove the data directories."""
        for member in self.members:
            self._kill(member)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- faults ----------------------------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def leader(self, timeout: float = 10.0) -> Member:
        """The member that is the Raft leader now (waits for an election if there is none)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for member in self.members:
                if not member.running:
                    continue
                status = member.status()
                if status and status.get("leader") and status.get("leader") == status.get("header", {}).get("member_id"):
                    return member
            time.sleep(0.05)
        raise EtcdLabError(f"no etcd leader within {timeout:.0f} s")

    def kill(self, member: Member) -> None:
        """SIGKILL one member (a crash: no goodbye to its peers) and wait for its pid."""
        self._kill(member)

    def restart(self, member: Member) -> None:
        """Start a killed member again from its data directory and wait until all are healthy."""
        if member.running:
            raise EtcdLabError(f"{member.name} is still running")
        self._spawn(member, "existing")
        self.wait_healthy()

    def freeze(self, member: Member) -> None:
        """SIGSTOP: the member keeps its sockets but answers nothing (like a partition)."""
        if member.process is not None:
            os.kill(member.process.pid, signal.SIGSTOP)

    def thaw(self, member: Member) -> None:
        if member.process is not None:
            os.kill(member.process.pid, signal.SIGCONT)

    @staticmethod
    def _kill(member: Member) -> None:
        process = member.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL)  # also ends a stopped process
        process.wait()
