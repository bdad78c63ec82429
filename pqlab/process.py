"""Run pqtunnel daemons as child processes: start, wait until ready, talk to, stop.

Used by the demo, the examples, the benchmarks and the end-to-end tests, which all drive
real processes through the same command-line interface a user has.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLI = [sys.executable, "-m", "pqtunneld.cli"]
READY_TIMEOUT = 20.0


def pq(*args: str, home: Path | None = None, timeout: float = 30, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run one ``pqtunnel`` command and return the completed process (never raises on failure)."""
    argv = [*CLI, *args]
    if home is not None:
        argv += ["--home", str(home)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def init_node(root: Path, name: str) -> tuple[Path, str]:
    home = root / name
    result = pq("init", "--name", name, home=home)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip())
    return home, result.stdout.strip().splitlines()[-1]


def replica_home(root: Path, source: Path, name: str) -> Path:
    """Another replica of the node in ``source``: the same identity in its own home."""
    home = root / name
    home.mkdir(mode=0o700)
    for file in ("identity.key", "identity.pub"):
        shutil.copy2(source / file, home / file)
    return home


@dataclass
class Daemon:
    home: Path
    extra: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    nofile: int | None = None
    """Run the daemon with this descriptor limit (``RLIMIT_NOFILE``, soft and hard), as
    ``LimitNOFILE=`` or ``prlimit --nofile`` would; None keeps ours."""
    env: dict[str, str] | None = None
    """The daemon's environment (None: ours)."""
    mdns_interface: str | None = None
    """Run mDNS on this interface address only (e.g. "127.0.0.1"); None: ``--no-mdns``."""

    def start(self) -> Daemon:
        self.log_path = self.home / "daemon.log"
        mdns = ["--no-mdns"] if self.mdns_interface is None else ["--mdns-interface", self.mdns_interface]
        argv = [*CLI, "up", "--home", str(self.home), *mdns, "--socks", "off", *self._listen_default(), *self.extra]
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            preexec_fn=self._limit_descriptors if self.nofile else None)
        self.wait_ready()
        return self

    def _limit_descriptors(self) -> None:
        """In the child before exec: lower the descriptor limit."""
        assert self.nofile is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def _listen_default(self) -> list[str]:
        return [] if "--listen" in self.extra else ["--listen", "127.0.0.1:0"]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.process.returncode}:\n{self.logs()}")
            if (self.home / "control.sock").exists() and pq("status", home=self.home).returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"daemon not ready:\n{self.logs()}")

    def status(self) -> dict[str, Any]:
        result = pq("status", "--json", home=self.home)
        if result.returncode != 0:
            raise RuntimeError(result.stderr.strip())
        return json.loads(result.stdout)

    @property
    def port(self) -> int:
        return int(self.status()["listen"].rsplit(":", 1)[1])

    def sessions(self) -> list[dict[str, Any]]:
        result = pq("sessions", "--json", home=self.home)
        if result.returncode != 0:
            raise RuntimeError(result.stderr.strip())
        return json.loads(result.stdout)

    def logs(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            logs = self.logs()
            if text in logs:
                return logs
            time.sleep(0.05)
        raise RuntimeError(f"{text!r} not in log:\n{self.logs()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"daemon did not stop on signal {sig}:\n{self.logs()}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
