"""Exhaustion: strangers and peers cannot stop a real daemon by holding its descriptors,
processes or memory, and exec services never see the daemon's environment (issue 13,
findings 1, 5 and 10).

bob runs as a real process, here with a low descriptor limit (``RLIMIT_NOFILE`` 256, as
``LimitNOFILE=256`` would set). Strangers flood his tunnel port with idle connections from
many source addresses; mallory, a pinned peer driving the library by hand over a real
socket, opens hundreds of streams to a TCP service, to an exec service, and fills every
window without reading. Each time bob must stay up, answer ``pqtunnel status``, keep
serving alice, stay within his limits, and log no traceback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import trio

from pqlab.process import CLI
from pqtunnel.handshake import InitiatorHandshake
from pqtunnel.identity import Identity
from pqtunnel.tunnel import Established, StreamAccepted, StreamRefused, StreamReset, Tunnel
from pqtunneld.stores import load_identity
from tests.nodes import Daemon, init_node, pq

pytestmark = pytest.mark.e2e

NOFILE = 256
MIB = 1024 * 1024


# --- the cast ---------------------------------------------------------------------------------------


@contextmanager
def three_nodes(root: Path, config: str = "", *, nofile: int | None = None,
                env: dict[str, str] | None = None) -> Iterator[dict]:
    """bob (with ``config``), alice in session with him, and mallory's identity pinned on bob."""
    bob_home, fp_bob = init_node(root, "bob")
    alice_home, fp_alice = init_node(root, "alice")
    mallory_home, fp_mallory = init_node(root, "mallory")
    for name, fingerprint in (("alice", fp_alice), ("mallory", fp_mallory)):
        pq("trust", name, fingerprint, home=bob_home)
    pq("trust", "bob", fp_bob, home=alice_home)
    (bob_home / "config.toml").write_text('[services]\necho = { exec = ["cat"] }\n' + config)
    bob = Daemon(bob_home, nofile=nofile, env=env).start()
    alice = Daemon(alice_home, ["--peer", f"bob=127.0.0.1:{bob.port}"]).start()
    try:
        assert pq("ping", "bob", home=alice_home).returncode == 0
        yield {"bob": bob, "alice": alice, "bob_home": bob_home, "alice_home": alice_home, "port": bob.port,
               "mallory": load_identity(mallory_home)}
    finally:
        alice.kill()
        bob.kill()


def connect(home: Path, target: str, data: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """``pqtunnel connect TARGET`` with ``data`` on stdin."""
    return subprocess.run([*CLI, "connect", target, "--home", str(home)], input=data, capture_output=True,
                          timeout=30)


def assert_still_serving(net: dict) -> None:
    """bob is up, answers his owner, and alice's session carries pings and streams."""
    bob: Daemon = net["bob"]
    assert bob.process is not None and bob.process.poll() is None, bob.logs()
    status = pq("status", "--json", home=net["bob_home"])
    assert status.returncode == 0, status.stderr
    assert pq("ping", "bob", home=net["alice_home"]).returncode == 0
    echoed = connect(net["alice_home"], "bob/echo", b"still here\n")
    assert echoed.stdout == b"still here\n", echoed.stderr


def assert_no_traceback(daemon: Daemon) -> None:
    logs = daemon.logs()
    assert "Traceback" not in logs and "internal error" not in logs, logs


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def wait_until(condition, timeout: float = 15.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


class HoldingServer:
    """A TCP service that accepts every connection and never reads from it."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.port = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.listener.close()
        for conn in self.held:
            conn.close()


# --- mallory: a pinned peer driving the library by hand ----------------------------------------------


def now_ms() -> int:
    return int(time.monotonic() * 1000)


def wall_ms() -> int:
    return int(time.time() * 1000)


class Mallory:
    """An established session with bob, over a real socket, with the tunnel core in her hands."""

    def __init__(self, stream: trio.SocketStream, tunnel: Tunnel) -> None:
        self.stream = stream
        self.tunnel = tunnel
        self.resets: list[str] = []

    @classmethod
    async def connect(cls, port: int, identity: Identity) -> Mallory:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        tunnel = Tunnel(InitiatorHandshake(identity, lambda peer: "bob"), now_ms=now_ms())
        tunnel.start(now_ms(), wall_ms())
        await stream.send_all(b"".join(tunnel.buffers_to_send()))
        while True:
            data = await stream.receive_some(1 << 16)
            assert data, "bob closed the connection during the handshake"
            events = tunnel.receive_data(data, now_ms(), wall_ms())
            await stream.send_all(b"".join(tunnel.buffers_to_send()))
            if any(isinstance(e, Established) for e in events):
                return cls(stream, tunnel)

    async def flush(self) -> None:
        buffers = self.tunnel.buffers_to_send()
        if buffers:
            await self.stream.send_all(b"".join(buffers))

    async def read(self, seconds: float) -> list:
        """bob's frames for ``seconds`` (answering what needs answers); notes every reset."""
        events: list = []
        with trio.move_on_after(seconds):
            while data := await self.stream.receive_some(1 << 20):
                new = self.tunnel.receive_data(data, now_ms(), wall_ms())
                self.resets += [e.reason for e in new if isinstance(e, StreamReset)]
                events += new
                await self.flush()
        return events

    async def open_streams(self, target: dict, count: int) -> tuple[list[int], list[str]]:
        """Open ``count`` streams at once; returns the accepted ids and the refusal reasons."""
        pending = {self.tunnel.open_stream(target) for _ in range(count)}
        await self.flush()
        accepted: list[int] = []
        refused: list[str] = []
        with trio.fail_after(60):
            while pending:
                for event in await self.read(0.2):
                    if isinstance(event, StreamAccepted):
                        accepted.append(event.stream_id)
                    elif isinstance(event, StreamRefused):
                        refused.append(event.reason)
                    else:
                        continue
                    pending.discard(event.stream_id)
        return accepted, refused

    async def fill(self, stream_ids: list[int]) -> None:
        """Send as much as each stream's credit allows (its whole window), reading nothing."""
        for stream_id in stream_ids:
            self.tunnel.send_data(stream_id, bytes(self.tunnel.credit(stream_id)))
            await self.flush()

    async def leave(self) -> None:
        await self.stream.aclose()


# --- finding 1: descriptors -----------------------------------------------------------------------


def idle_connections(port: int, addresses: int, per_address: int) -> list[socket.socket]:
    """Connections that never send a byte, from 127.0.0.2, 127.0.0.3, ... (all loopback)."""
    held = []
    for host in range(2, 2 + addresses):
        for _ in range(per_address):
            sock = socket.socket()
            sock.bind((f"127.0.0.{host}", 0))
            sock.connect(("127.0.0.1", port))
            held.append(sock)
    return held


def test_idle_connections_from_many_addresses_cannot_use_up_the_daemons_descriptors(tmp_path: Path) -> None:
    with three_nodes(tmp_path, nofile=NOFILE) as net:
        flood = idle_connections(net["port"], addresses=40, per_address=10)  # 400 > the 256 descriptors bob has
        try:
            time.sleep(1.0)  # bob accepts (and closes) what is past his limits
            assert_still_serving(net)
        finally:
            for sock in flood:
                sock.close()
        logs = net["bob"].logs()
        refusals = [line for line in logs.splitlines() if "closed a connection from" in line]
        assert refusals and "unauthenticated connections" in refusals[0]
        assert len(refusals) <= 3, "refused connections are logged at most every few seconds"
        assert_no_traceback(net["bob"])


def test_a_peer_holding_streams_to_a_tcp_service_cannot_stop_the_daemon(tmp_path: Path) -> None:
    service = HoldingServer()
    try:
        with three_nodes(tmp_path, f'hold = "127.0.0.1:{service.port}"\n', nofile=NOFILE) as net:
            bob_pid = net["bob"].process.pid

            async def attack() -> tuple[list[int], list[str]]:
                mallory = await Mallory.connect(net["port"], net["mallory"])
                accepted, refused = await mallory.open_streams({"service": "hold"}, 300)
                more_accepted, more_refused = await mallory.open_streams({"service": "hold"}, 10)  # the last ones
                assert len(os.listdir(f"/proc/{bob_pid}/fd")) == NOFILE, "bob holds every descriptor he may"
                status = pq("status", "--json", home=net["bob_home"])  # served from the control reserve
                assert status.returncode == 0, status.stderr
                assert pq("ping", "bob", home=net["alice_home"]).returncode == 0
                await mallory.leave()
                return accepted + more_accepted, refused + more_refused

            accepted, refused = trio.run(attack)
            assert len(accepted) + len(refused) == 310
            assert any("256 concurrent streams" in reason for reason in refused), "streams per session are capped"
            assert any("Too many open files" in reason for reason in refused), "bob really ran out of descriptors"
            assert wait_until(lambda: all(row["peer"] != "mallory" for row in net["bob"].sessions()))
            assert_still_serving(net)  # mallory left: her descriptors came back
            assert_no_traceback(net["bob"])
    finally:
        service.close()


# --- finding 5: processes and memory -----------------------------------------------------------------


SLEEPER = 'sleeper = { exec = ["sleep", "600"] }\n'  # never reads its stdin


def test_a_peer_cannot_start_more_processes_than_its_share(tmp_path: Path) -> None:
    with three_nodes(tmp_path, SLEEPER) as net:
        bob_pid = net["bob"].process.pid

        async def attack() -> tuple[list[int], list[str], int]:
            mallory = await Mallory.connect(net["port"], net["mallory"])
            accepted, refused = await mallory.open_streams({"service": "sleeper"}, 100)
            running = len(children(bob_pid))
            assert_still_serving(net)  # alice has her own share
            await mallory.leave()
            return accepted, refused, running

        accepted, refused, running = trio.run(attack)
        assert len(accepted) == 16 and running == 16, "exec_processes_per_peer defaults to 16"
        assert len(refused) == 84 and all("too many processes: 16 at once per peer" in r for r in refused)
        assert wait_until(lambda: children(bob_pid) == []), "every process is reaped when the peer leaves"
        assert_no_traceback(net["bob"])


def test_a_peer_filling_every_window_cannot_grow_the_daemons_memory_past_its_budget(tmp_path: Path) -> None:
    limits = "[limits]\nexec_processes = 250\nexec_processes_per_peer = 200\nbuffered_bytes_per_session = 33554432\n"
    with three_nodes(tmp_path, SLEEPER + limits) as net:
        bob_pid = net["bob"].process.pid
        before = rss_mib(bob_pid)

        async def attack() -> tuple[int, float, list[str]]:
            mallory = await Mallory.connect(net["port"], net["mallory"])
            accepted, _ = await mallory.open_streams({"service": "sleeper"}, 200)
            await mallory.fill(accepted)  # 200 windows of 1 MiB, and no process reads a byte
            await mallory.read(3.0)
            peak = rss_mib(bob_pid)
            assert_still_serving(net)
            refused_now = (await mallory.open_streams({"service": "echo"}, 1))[1]
            await mallory.leave()
            return len(accepted), peak, refused_now

        accepted, peak, refused_now = trio.run(attack)
        assert accepted == 200
        assert peak - before < 80, f"bob grew from {before:.0f} to {peak:.0f} MiB for 200 MiB sent"
        assert refused_now and "receive buffers full" in refused_now[0], "no new stream while the budget is spent"
        assert wait_until(lambda: children(bob_pid) == [])
        assert wait_until(lambda: rss_mib(bob_pid) - before < 30), (
            f"after mallory left, bob still holds {rss_mib(bob_pid) - before:.0f} MiB more than before")
        assert_still_serving(net)
        assert_no_traceback(net["bob"])


# --- finding 10: exec environment and file permissions ----------------------------------------------------


def test_exec_services_get_a_minimal_environment_not_the_daemons(tmp_path: Path) -> None:
    config = 'env = { exec = ["env"], env = { GREETING = "hello" } }\n'
    secret_env = {**os.environ, "DEMO_CLOUD_API_KEY": "s3cret-key"}
    with three_nodes(tmp_path, config, env=secret_env) as net:
        result = connect(net["alice_home"], "bob/env")
        assert result.returncode == 0, result.stderr
        seen = dict(line.split("=", 1) for line in result.stdout.decode().splitlines())
        assert "DEMO_CLOUD_API_KEY" not in seen and b"s3cret" not in result.stdout
        assert set(seen) == {"PATH", "LANG", "HOME", "GREETING"} and seen["GREETING"] == "hello"


@pytest.mark.parametrize("file", ["config.toml", "known_peers"])
def test_a_world_writable_config_or_pin_file_stops_the_daemon_with_one_line(tmp_path: Path, file: str) -> None:
    home, _ = init_node(tmp_path, "bob")
    _, fp_alice = init_node(tmp_path, "alice")
    pq("trust", "alice", fp_alice, home=home)
    (home / "config.toml").write_text("[node]\n")
    os.chmod(home / file, 0o666)
    result = pq("up", "--listen", "127.0.0.1:0", "--no-mdns", "--socks", "off", home=home, timeout=20)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert f"{home / file} is writable by group or others (mode 0666); run: chmod go-w {home / file}" in result.stderr
