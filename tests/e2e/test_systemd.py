"""systemd integration (operations issue): readiness, reload and stop over $NOTIFY_SOCKET with
a watchdog, and a unit file that verifies and scores well on systemd-analyze security."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.nodes import Daemon, init_node

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "pqtunneld.service"


def receive_until(sock: socket.socket, wanted: str, timeout: float = 15.0) -> list[str]:
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            seen.append(sock.recv(4096).decode())
        except socket.timeout:
            break
        if any(wanted in message for message in seen):
            return seen
    raise AssertionError(f"{wanted!r} never arrived; got {seen}")


def test_the_daemon_tells_systemd_ready_reloading_stopping_and_feeds_the_watchdog(tmp_path: Path) -> None:
    home, _ = init_node(tmp_path, "solo")
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(path)
        env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
        daemon = Daemon(home, env=env).start()
        try:
            assert any("READY=1" in m for m in receive_until(listener, "READY=1"))
            watchdog = receive_until(listener, "WATCHDOG=1")
            assert sum("WATCHDOG=1" in m for m in watchdog + receive_until(listener, "WATCHDOG=1")) >= 2
            daemon.process.send_signal(signal.SIGHUP)
            assert any("STATUS=configuration reloaded" in m for m in receive_until(listener, "configuration reloaded"))
            daemon.process.send_signal(signal.SIGTERM)
            assert any("STOPPING=1" in m for m in receive_until(listener, "STOPPING=1"))
            assert daemon.process.wait(timeout=15) == 0
        finally:
            daemon.kill()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_unit_file_verifies_and_is_well_sandboxed(tmp_path: Path) -> None:
    unit = tmp_path / "pqtunneld.service"
    installed = Path(sys.executable).parent / "pqtunneld"
    assert installed.exists(), "pip installs the pqtunneld entry point"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/pqtunneld", str(installed)))
    verified = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0, verified.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                              capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
    assert match is not None, security.stdout + security.stderr
    assert float(match.group(1)) <= 2.0, security.stdout
