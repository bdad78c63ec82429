"""Operations (issue 11): the command line and the control socket as an operator meets them.

Real daemons, real sockets, real child processes: ``connect`` tells a clean end from a reset
or a lost session; ``connect HOST PORT`` and ``forward`` reach services without SOCKS;
``--version``, ``status``, ``sessions`` and ``ping`` report what an SRE asks; every user
mistake is one line and a non-zero exit; a daemon whose home is deleted stops by itself;
pins added while the daemon runs count at once.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import pytest

from pqlab.process import CLI
from tests.http_fixture import HttpServer
from tests.nodes import Daemon, init_node, pq

REPO = Path(__file__).resolve().parents[2]
LINES = "import sys, time\nfor i in range(20):\n    print(f'line {i}', flush=True)\n    time.sleep(0.25)\n"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ResettingServer:
    """A TCP service that sends seven lines, then breaks the connection with a reset."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.sendall(b"".join(f"line {i}\n".encode() for i in range(7)))
            time.sleep(0.5)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def net(tmp_path: Path) -> Iterator[dict]:
    """bob serves web (HTTP), echo, lines (20 lines, slowly), hang, missing (no such binary)
    and reset (a TCP service that resets); alice dials bob and has a SOCKS endpoint."""
    alice_home, fp_alice = init_node(tmp_path, "alice")
    bob_home, fp_bob = init_node(tmp_path, "bob")
    pq("trust", "bob", fp_bob, home=alice_home)
    pq("trust", "alice", fp_alice, home=bob_home)
    (tmp_path / "lines.py").write_text(LINES)
    resetting = ResettingServer()
    with HttpServer() as http:
        (bob_home / "config.toml").write_text(
            "[node]\n"
            f"allowed_ports = [{http.port}]\n"
            "[services]\n"
            f'web = "127.0.0.1:{http.port}"\n'
            f'reset = "127.0.0.1:{resetting.port}"\n'
            'echo = { exec = ["cat"] }\n'
            f'lines = {{ exec = ["{sys.executable}", "{tmp_path / "lines.py"}"], env = {{ TOKEN = "s3cret" }} }}\n'
            f'hang = {{ exec = ["{sys.executable}", "-c", "import time; time.sleep(600)"] }}\n'
            'missing = { exec = ["/nonexistent/pqtunnel-test-binary"] }\n'
        )
        bob = Daemon(bob_home).start()
        socks = free_port()
        alice = Daemon(alice_home, ["--socks", f"127.0.0.1:{socks}", "--peer", f"bob=127.0.0.1:{bob.port}"]).start()
        try:
            yield {"alice": alice, "bob": bob, "alice_home": alice_home, "bob_home": bob_home, "http": http,
                   "socks": socks, "fp_bob": fp_bob, "tmp": tmp_path}
        finally:
            alice.kill()
            bob.kill()
            resetting.close()


def connect(home: Path, *target: str, data: bytes = b"", timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*CLI, "connect", *target, "--home", str(home)], input=data, capture_output=True,
                          timeout=timeout)


def one_line(stderr: bytes | str) -> str:
    text = stderr.decode() if isinstance(stderr, bytes) else stderr
    assert text.count("\n") == 1 and "Traceback" not in text, text
    return text


# --- 1. connect: a clean end, a reset and a lost session are told apart ---------------------------------


def test_connect_exits_zero_after_a_clean_end_with_every_line(net: dict) -> None:
    result = connect(net["alice_home"], "bob/lines")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == [f"line {i}" for i in range(20)]
    assert result.stderr == b""


def test_connect_exits_non_zero_with_the_reason_when_the_peer_vanishes_mid_stream(net: dict) -> None:
    client = subprocess.Popen([*CLI, "connect", "bob/lines", "--home", str(net["alice_home"])],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert client.stdout is not None
    first = [client.stdout.readline() for _ in range(7)]
    net["bob"].kill()  # the whole remote node is gone: its kernel closes the session's socket
    rest, stderr = client.communicate(timeout=30)
    lines = (b"".join(first) + rest).decode().splitlines()
    assert client.returncode == 1
    assert 7 <= len(lines) < 20 and lines == [f"line {i}" for i in range(len(lines))]
    message = one_line(stderr)
    assert message.startswith("pqtunnel: error: bob/lines: session with bob ended:"), message


def test_connect_exits_non_zero_with_the_reason_when_the_stream_is_reset(net: dict) -> None:
    result = connect(net["alice_home"], "bob/reset")
    assert result.returncode == 1
    assert result.stdout.decode().splitlines() == [f"line {i}" for i in range(7)]  # all that came before the reset
    message = one_line(result.stderr)
    assert "bob/reset: stream reset by bob: service reset: connection reset by peer" in message.lower(), message


def test_connect_exits_non_zero_when_the_local_daemon_stops_mid_stream(net: dict) -> None:
    client = subprocess.Popen([*CLI, "connect", "bob/lines", "--home", str(net["alice_home"])],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert client.stdout is not None
    client.stdout.readline()
    net["alice"].kill()
    _, stderr = client.communicate(timeout=30)
    assert client.returncode == 1
    assert "the daemon closed the stream without saying how it ended" in one_line(stderr)


def test_connect_carries_a_large_transfer_both_ways_intact(net: dict) -> None:
    data = bytes(range(256)) * 64 * 1024  # 16 MiB through cat and back
    result = connect(net["alice_home"], "bob/echo", data=data, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == data


# --- 2. connect HOST PORT ---------------------------------------------------------------------------------


def test_connect_host_port_reaches_the_same_targets_as_socks_names(net: dict) -> None:
    home, http_port = net["alice_home"], str(net["http"].port)
    assert connect(home, "echo.bob.pq", "9418", data=b"by service name\n").stdout == b"by service name\n"
    assert connect(home, "ECHO.bob.pq.", "1", data=b"case and trailing dot\n").stdout == b"case and trailing dot\n"
    request = b"GET / HTTP/1.0\r\nHost: bob\r\n\r\n"
    for host in ("bob.pq", "bob"):
        result = connect(home, host, http_port, data=request)
        assert result.returncode == 0, result.stderr
        assert result.stdout.endswith(b"hello from bob\n")


def test_connect_host_port_works_as_a_proxy_command_for_git(net: dict, tmp_path: Path) -> None:
    """GIT_PROXY_COMMAND runs ``CMD HOST PORT``: git talks its protocol through the tunnel
    to a real ``git daemon`` on bob, reached as the service git.bob.pq."""
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repos" / "project.git"
    subprocess.run([git, "init", "--bare", "-q", str(repo)], check=True)
    work = tmp_path / "work"
    subprocess.run([git, "init", "-q", str(work)], check=True)
    subprocess.run([git, "-C", str(work), "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q",
                    "--allow-empty", "-m", "first"], check=True)
    subprocess.run([git, "-C", str(work), "push", "-q", str(repo), "HEAD:refs/heads/main"], check=True)
    port = free_port()
    server = subprocess.Popen([git, "daemon", "--reuseaddr", "--export-all", "--listen=127.0.0.1", f"--port={port}",
                               f"--base-path={tmp_path / 'repos'}", str(tmp_path / "repos")])
    try:
        _wait_for_port(port)
        config = net["bob_home"] / "config.toml"
        config.write_text(config.read_text() + f'git = "127.0.0.1:{port}"\n')
        assert pq("reload", home=net["bob_home"]).returncode == 0
        proxy = tmp_path / "git-proxy"
        proxy.write_text(f'#!/bin/sh\nexec {" ".join(CLI)} connect "$1" "$2" --home {net["alice_home"]}\n')
        proxy.chmod(0o755)
        result = subprocess.run([git, "ls-remote", "git://git.bob.pq/project.git"], capture_output=True, text=True,
                                timeout=60, env={"PATH": "/usr/bin:/bin", "GIT_PROXY_COMMAND": str(proxy)})
    finally:
        server.terminate()
        server.wait()
    assert result.returncode == 0, result.stderr
    assert "refs/heads/main" in result.stdout


def test_connect_host_port_mistakes_are_one_line_errors(net: dict) -> None:
    home = net["alice_home"]
    for target, expected in ((("bob.example.com", "22"), "is not a .pq name"),
                             (("a.b.bob.pq", "22"), "expected SERVICE.PEER.pq or PEER.pq"),
                             (("bob", "ssh"), "port 'ssh': expected a number from 1 to 65535"),
                             (("bob", "70000"), "expected a number from 1 to 65535")):
        result = connect(home, *target)
        assert result.returncode == 1, target
        assert expected in one_line(result.stderr), target


# --- 3. forward LOCAL_PORT PEER/SERVICE --------------------------------------------------------------


def start_forward(home: Path, target: str) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen([*CLI, "forward", "0", target, "--home", str(home)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.match(r"forwarding 127\.0\.0\.1:(\d+) to (\S+) \(Ctrl-C to stop\)", line)
    assert match is not None, (line, process.stderr.read() if process.poll() is not None and process.stderr else "")
    assert match.group(2) == target
    return process, int(match.group(1))


def fetch(port: int, path: str = "/") -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        return response.read()


def test_forward_serves_each_local_connection_through_its_own_stream_until_ctrl_c(net: dict) -> None:
    forward, port = start_forward(net["alice_home"], "bob/web")
    try:
        assert fetch(port) == b"hello from bob\n"
        with ThreadPoolExecutor(max_workers=20) as pool:
            bodies = list(pool.map(lambda _: fetch(port), range(40)))
        assert bodies == [b"hello from bob\n"] * 40
        audit = net["bob"].home / "audit.jsonl"
        deadline = time.monotonic() + 10
        while audit.read_text().count('"event":"stream_closed"') < 41:  # one audit line per stream it served
            assert time.monotonic() < deadline, audit.read_text()[-2000:]
            time.sleep(0.05)
    finally:
        forward.send_signal(signal.SIGINT)
        _, stderr = forward.communicate(timeout=15)
    assert forward.returncode == 0
    assert stderr == "stopped forwarding to bob/web\n"


def test_forward_reports_a_failed_stream_in_one_line_and_keeps_running(net: dict) -> None:
    forward, port = start_forward(net["alice_home"], "bob/missing")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as local:
            local.sendall(b"hello")
            with pytest.raises(ConnectionResetError):  # a reset, not a clean (and misleading) end
                while local.recv(4096):
                    pass
        with socket.create_connection(("127.0.0.1", port), timeout=30) as local:  # still listening
            with pytest.raises(ConnectionResetError):
                local.recv(4096)
        assert forward.poll() is None
    finally:
        forward.send_signal(signal.SIGINT)
        _, stderr = forward.communicate(timeout=15)
    lines = stderr.splitlines()
    assert lines[:2] == ["pqtunnel: bob/missing: service missing failed to start"] * 2, stderr
    assert forward.returncode == 0 and "Traceback" not in stderr


def test_forward_refuses_a_port_in_use_and_a_missing_daemon_in_one_line(net: dict, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = pq("forward", str(taken.getsockname()[1]), "bob/web", home=net["alice_home"])
    assert result.returncode == 1
    assert "cannot listen on 127.0.0.1:" in one_line(result.stderr) and "in use" in result.stderr
    nobody, _ = init_node(tmp_path, "nobody")
    result = pq("forward", "0", "bob/web", home=nobody)
    assert result.returncode == 1 and "no daemon is running" in one_line(result.stderr)


# --- 4. version, status, sessions, ping ------------------------------------------------------------------


def test_version_names_the_package_and_the_protocol() -> None:
    expected = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    result = pq("--version")
    assert result.returncode == 0
    assert result.stdout == f"pqtunnel {expected} (protocol 1)\n"


def test_status_json_reports_version_addresses_mdns_and_services_without_secrets(net: dict) -> None:
    status = net["bob"].status()
    expected = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert status["version"] == expected and status["protocol"] == 1
    assert re.fullmatch(r"127\.0\.0\.1:\d+", status["listen"])
    assert status["socks"] is None and status["mdns"] == {"state": "off"}
    assert {s["name"]: s["kind"] for s in status["services"]} == {
        "web": "tcp", "reset": "tcp", "echo": "exec", "lines": "exec", "hang": "exec", "missing": "exec"}
    assert status["allowed_ports"] == [net["http"].port]
    text = json.dumps(status)
    assert "s3cret" not in text and "/nonexistent" not in text and "lines.py" not in text
    assert net["alice"].status()["socks"] == f"127.0.0.1:{net['socks']}"


def test_sessions_json_has_latest_handshake_and_last_received_times(net: dict) -> None:
    before = datetime.now(timezone.utc)
    assert pq("ping", "bob", home=net["alice_home"]).returncode == 0
    (session,) = net["alice"].sessions()
    handshake = datetime.fromisoformat(session["latest_handshake"].replace("Z", "+00:00"))
    received = datetime.fromisoformat(session["last_received"].replace("Z", "+00:00"))
    after = datetime.now(timezone.utc)
    assert session["latest_handshake"].endswith("Z") and session["last_received"].endswith("Z")
    assert abs((handshake - before).total_seconds()) < 30 and handshake <= received
    assert before.timestamp() - 1 <= received.timestamp() <= after.timestamp() + 1  # the PONG just arrived
    text = pq("sessions", home=net["alice_home"]).stdout
    assert "latest handshake: " in text and "s ago" in text


def test_ping_count_json_lists_every_round_trip(net: dict) -> None:
    result = pq("ping", "bob", "--count", "4", "--interval", "0.05", "--json", home=net["alice_home"])
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["peer"] == "bob" and reply["fingerprint"] == net["fp_bob"] and reply["count"] == 4
    assert len(reply["rtt_ms"]) == 4 and all(0 < rtt < 5000 for rtt in reply["rtt_ms"])
    assert reply["min_ms"] == min(reply["rtt_ms"]) and reply["max_ms"] == max(reply["rtt_ms"])
    text = pq("ping", "bob", "--count", "2", "--interval", "0", home=net["alice_home"]).stdout
    assert "seq 1:" in text and "seq 2:" in text and "2 round trips: min/avg/max" in text


# --- 5. user mistakes: one line, never a traceback ------------------------------------------------------


def run_up(home: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "up", "--home", str(home), "--no-mdns", *flags], capture_output=True, text=True,
                          timeout=60)


def test_daemon_start_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    home, _ = init_node(tmp_path, "carol")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        listen = run_up(home, "--socks", "off", "--listen", f"127.0.0.1:{port}")
        socks = run_up(home, "--listen", "127.0.0.1:0", "--socks", f"127.0.0.1:{port}")
    unresolvable = run_up(home, "--socks", "off", "--listen", "no-such-host.invalid:0")
    for result, expected in ((listen, f"cannot listen on 127.0.0.1:{port}: Address already in use"),
                             (socks, f"cannot listen for SOCKS on 127.0.0.1:{port}: Address already in use"),
                             (unresolvable, "cannot listen on no-such-host.invalid:0")):
        assert result.returncode == 1
        assert one_line(result.stderr).startswith(f"pqtunnel: error: {expected}"), result.stderr
    assert not (home / "control.sock").exists()


def test_a_second_daemon_on_the_same_home_is_refused_and_the_first_runs_on(tmp_path: Path) -> None:
    home, _ = init_node(tmp_path, "carol")
    first = Daemon(home).start()
    try:
        audit_files = sorted(p.name for p in home.iterdir() if p.name.startswith("audit"))
        second = run_up(home, "--socks", "off", "--listen", "127.0.0.1:0")
        assert second.returncode == 1
        assert "another daemon is already running for" in one_line(second.stderr)
        assert first.status()["pid"] == first.process.pid  # still answering on its socket
        assert sorted(p.name for p in home.iterdir() if p.name.startswith("audit")) == audit_files  # not rotated
    finally:
        first.stop()


def test_home_and_ca_mistakes_are_one_line_errors_with_the_right_hint(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("not a directory\n")
    cases = (
        (["init", "--name", "x", "--home", str(a_file)], f"node home {a_file} is not a directory"),
        (["init", "--name", "x", "--home", str(a_file / "sub")], f"cannot create node home {a_file / 'sub'}"),
        (["init", "--name", "x", "--home", "/proc/pqtunnel-test/home"], "cannot create node home /proc/pqtunnel-test"),
        (["id", "--home", str(a_file)], f"node home {a_file} is not a directory"),
        (["ca", "sign", "--ca-dir", str(tmp_path / "no-ca"), "--name", "bob", "--fingerprint", "pq1:x"],
         f"pqtunnel ca init --name NAME --ca-dir {tmp_path / 'no-ca'}"),
    )
    for argv, expected in cases:
        result = pq(*argv)
        assert result.returncode == 1, argv
        assert expected in one_line(result.stderr), (argv, result.stderr)
        assert "pqtunnel init" not in result.stderr
    assert a_file.read_text() == "not a directory\n"


def test_ctrl_c_during_connect_and_ping_exits_130_in_one_line(net: dict, tmp_path: Path) -> None:
    client = subprocess.Popen([*CLI, "connect", "bob/hang", "--home", str(net["alice_home"])],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    net["bob"].wait_for_log("service hang (pid ")
    client.send_signal(signal.SIGINT)
    _, stderr = client.communicate(timeout=15)
    assert client.returncode == 130 and one_line(stderr) == "pqtunnel: interrupted\n"

    with socket.socket() as tarpit:  # accepts and never answers: the handshake waits
        tarpit.bind(("127.0.0.1", 0))
        tarpit.listen()
        (net["alice_home"] / "config.toml").write_text(f'[peers]\ncarol = "127.0.0.1:{tarpit.getsockname()[1]}"\n')
        assert pq("reload", home=net["alice_home"]).returncode == 0
        ping = subprocess.Popen([*CLI, "ping", "carol", "--timeout", "60", "--home", str(net["alice_home"])],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(1.5)
        ping.send_signal(signal.SIGINT)
        _, stderr = ping.communicate(timeout=15)
    assert ping.returncode == 130 and one_line(stderr) == "pqtunnel: interrupted\n"


def test_the_peer_gets_a_generic_reason_and_the_serving_node_logs_the_details(net: dict) -> None:
    result = connect(net["alice_home"], "bob/missing")
    assert result.returncode == 1
    message = one_line(result.stderr)
    assert "service missing failed to start" in message
    assert "/nonexistent" not in message and "No such file" not in message
    net["bob"].wait_for_log("failed to start '/nonexistent/pqtunnel-test-binary': No such file or directory")


def test_a_daemon_whose_home_is_deleted_stops_by_itself(tmp_path: Path) -> None:
    home, _ = init_node(tmp_path, "carol")
    log = tmp_path / "carol.log"  # outside the home, which is about to vanish
    with log.open("wb") as out:
        daemon = subprocess.Popen([*CLI, "up", "--home", str(home), "--no-mdns", "--socks", "off",
                                   "--listen", "127.0.0.1:0"], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while pq("status", home=home).returncode != 0:
            assert time.monotonic() < deadline and daemon.poll() is None, log.read_text()
            time.sleep(0.1)
        shutil.rmtree(home)
        assert daemon.wait(timeout=15) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    text = log.read_text()
    assert "control socket" in text and "was removed" in text and "shutting down (control socket removed)" in text
    assert "Traceback" not in text


# --- 6. pins added while the daemon runs -------------------------------------------------------------------


def test_pins_added_while_the_daemon_runs_count_at_once(tmp_path: Path) -> None:
    """``pqtunnel trust`` reaches the running daemon; a line appended to known_peers by hand
    counts at the next handshake that needs it, inbound or outbound, with no reload."""
    alice_home, fp_alice = init_node(tmp_path, "alice")
    bob_home, fp_bob = init_node(tmp_path, "bob")
    carol_home, fp_carol = init_node(tmp_path, "carol")
    pq("trust", "alice", fp_alice, home=carol_home)
    bob = Daemon(bob_home).start()
    carol = Daemon(carol_home).start()
    alice = Daemon(alice_home, ["--peer", f"bob=127.0.0.1:{bob.port}", "--peer", f"carol=127.0.0.1:{carol.port}"])
    alice.start()
    try:
        refused = pq("ping", "bob", "--timeout", "5", home=alice_home)
        assert refused.returncode == 1 and "no pinned fingerprint for bob" in refused.stderr

        trusted = pq("trust", "bob", fp_bob, home=alice_home)  # outbound: alice now knows bob ...
        assert trusted.returncode == 0 and "the running daemon uses it now" in trusted.stdout
        refused = pq("ping", "bob", "--timeout", "5", home=alice_home)
        assert refused.returncode == 1  # ... but bob refuses alice, who is not pinned there
        with (bob_home / "known_peers").open("a") as pins:  # inbound, by hand, no reload
            pins.write(f"alice {fp_alice}\n")
        assert pq("ping", "bob", "--timeout", "10", home=alice_home).returncode == 0

        with (alice_home / "known_peers").open("a") as pins:  # outbound, by hand, no reload
            pins.write(f"carol {fp_carol}\n")
        pinged = pq("ping", "carol", "--timeout", "10", home=alice_home)
        assert pinged.returncode == 0, pinged.stderr
        assert "known_peers changed: now pinned carol" in alice.logs()
        assert "known_peers changed: now pinned alice" in bob.logs()
    finally:
        alice.kill()
        bob.kill()
        carol.kill()


def _wait_for_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")
