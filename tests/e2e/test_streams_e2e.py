"""Streams end to end: real daemons, real curl, httpx and raw SOCKS clients, exec services."""

from __future__ import annotations

import hashlib
import socket
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest

from tests.http_fixture import HttpServer, body_digest
from tests.nodes import Daemon, init_node, pq

CURL = ["curl", "-q", "--noproxy", "", "-sS", "--max-time", "60"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def net(tmp_path: Path) -> Iterator[dict]:
    """bob serves web, echo, digest and hang services; alice has a SOCKS endpoint."""
    alice_home, fp_alice = init_node(tmp_path, "alice")
    bob_home, fp_bob = init_node(tmp_path, "bob")
    pq("trust", "bob", fp_bob, home=alice_home)
    pq("trust", "alice", fp_alice, home=bob_home)
    with HttpServer() as http:
        digest_script = "import sys,hashlib; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest(), flush=True)"
        (bob_home / "config.toml").write_text(
            "[node]\n"
            f"allowed_ports = [{http.port}]\n"
            "[services]\n"
            f'web = "127.0.0.1:{http.port}"\n'
            'echo = { exec = ["cat"] }\n'
            f'digest = {{ exec = ["{sys.executable}", "-c", "{digest_script}"] }}\n'
            f'hang = {{ exec = ["{sys.executable}", "-c", "import time; time.sleep(600)"] }}\n'
            'missing = { exec = ["/nonexistent/pqtunnel-test-binary"] }\n'
            f'closed = "127.0.0.1:{free_port()}"\n'
        )
        bob = Daemon(bob_home).start()
        socks_port = free_port()
        alice = Daemon(alice_home, ["--socks", f"127.0.0.1:{socks_port}", "--peer", f"bob=127.0.0.1:{bob.port}"]).start()
        try:
            yield {"alice": alice, "bob": bob, "socks": socks_port, "http": http,
                   "alice_home": alice_home, "bob_home": bob_home}
        finally:
            alice.kill()
            bob.kill()


def curl(net: dict, url: str, *extra: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*CURL, "--socks5-hostname", f"127.0.0.1:{net['socks']}", *extra, url],
                          capture_output=True, timeout=90)


def test_curl_fetches_bobs_page_by_name(net: dict) -> None:
    result = curl(net, "http://web.bob.pq/")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello from bob\n"
    (session,) = net["alice"].sessions()
    assert session["kem"] == "X25519+ML-KEM-768" and session["bytes_received"] > 0


def test_a_large_transfer_arrives_intact(net: dict) -> None:
    size = 64 * 1024 * 1024 + 12345
    result = curl(net, f"http://web.bob.pq/bytes/{size}/7")
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(result.stdout).hexdigest() == body_digest(size, 7)


def test_peer_port_names_reach_only_allowed_ports(net: dict) -> None:
    allowed = curl(net, f"http://bob.pq:{net['http'].port}/")
    assert allowed.returncode == 0 and allowed.stdout == b"hello from bob\n"
    denied = curl(net, f"http://bob.pq:{free_port()}/")
    assert denied.returncode == 97 and b"(2)" in denied.stderr  # NOT_ALLOWED
    net["bob"].wait_for_log("is not allowed")


@pytest.mark.parametrize("url, code", [
    ("http://nosuch.bob.pq/", 5),        # unknown service -> connection refused
    ("http://closed.bob.pq/", 5),        # service refuses -> connection refused
    ("http://missing.bob.pq/", 5),       # exec fails to start -> connection refused
    ("http://web.carol.pq/", 4),         # unknown peer -> host unreachable
    ("http://example.com/", 4),          # not a .pq name -> host unreachable
])
def test_refusals_get_the_right_socks_reply(net: dict, url: str, code: int) -> None:
    result = curl(net, url)
    assert result.returncode == 97, result.stderr
    assert f"({code})".encode() in result.stderr
    assert curl(net, "http://web.bob.pq/").stdout == b"hello from bob\n"  # nothing else affected


def test_httpx_reaches_the_service_through_socks(net: dict) -> None:
    httpx = pytest.importorskip("httpx")
    with httpx.Client(proxy=f"socks5h://127.0.0.1:{net['socks']}", timeout=30) as client:
        response = client.get("http://web.bob.pq/")
    assert response.status_code == 200 and response.text == "hello from bob\n"


def socks_fetch(socks_port: int, host: str, path: str) -> bytes:
    """A minimal raw SOCKS5 + HTTP/1.0 client (no library in between)."""
    with socket.create_connection(("127.0.0.1", socks_port), timeout=60) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"\x05\x01\x00")
        assert sock.recv(2) == b"\x05\x00"
        sock.sendall(b"\x05\x01\x00\x03" + bytes([len(host)]) + host.encode() + struct.pack(">H", 80))
        reply = sock.recv(10)
        assert reply[:2] == b"\x05\x00", reply
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).split(b"\r\n\r\n", 1)[1]


def test_two_hundred_parallel_streams_all_arrive_intact(net: dict) -> None:
    size = 256 * 1024
    with ThreadPoolExecutor(max_workers=200) as pool:
        bodies = list(pool.map(lambda i: socks_fetch(net["socks"], "web.bob.pq", f"/bytes/{size}/{i}"), range(200)))
    for i, body in enumerate(bodies):
        assert hashlib.sha256(body).hexdigest() == body_digest(size, i), i
    assert net["alice"].sessions()[0]["streams"] == 0


def test_connect_echoes_through_an_exec_service(net: dict) -> None:
    result = subprocess.run([sys.executable, "-m", "pqtunneld.cli", "connect", "bob/echo", "--home", str(net["alice_home"])],
                            input=b"hi\n", capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hi\n"
    net["bob"].wait_for_log("service echo closed, exit status 0")


def test_connect_honours_half_close_with_large_input(net: dict) -> None:
    """The remote reads until EOF, then answers: only works if our EOF reaches it."""
    data = bytes(range(256)) * 40_000
    result = subprocess.run([sys.executable, "-m", "pqtunneld.cli", "connect", "bob/digest", "--home", str(net["alice_home"])],
                            input=data, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == hashlib.sha256(data).hexdigest()


def test_connect_failures_exit_non_zero_with_one_line(net: dict) -> None:
    for target, expected in (("bob/nosuch", "has no service 'nosuch'"), ("carol/web", "unknown peer 'carol'"),
                             ("bob/closed", "is unavailable: Connection refused"),
                             ("bob", "expected PEER/SERVICE or PEER:PORT")):
        result = pq("connect", target, home=net["alice_home"])
        assert result.returncode == 1, target
        assert expected in result.stderr and result.stderr.count("\n") == 1


def test_exec_process_is_killed_when_the_client_goes_away(net: dict) -> None:
    client = subprocess.Popen([sys.executable, "-m", "pqtunneld.cli", "connect", "bob/hang", "--home", str(net["alice_home"])],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    logs = net["bob"].wait_for_log("service hang (pid ")
    pid = int(logs.split("service hang (pid ")[1].split(")")[0])
    assert Path(f"/proc/{pid}").exists()
    client.kill()
    client.wait()
    net["bob"].wait_for_log("to service hang ended: stream reset by alice")
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:  # killed and reaped: no zombie
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists()


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_stalled_reader_does_not_make_either_daemon_buffer(net: dict) -> None:
    """A client that never reads a 1 GiB response: both daemons stay within a few MiB."""
    before = {name: rss_kb(net[name].process.pid) for name in ("alice", "bob")}
    with socket.create_connection(("127.0.0.1", net["socks"])) as stalled:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        stalled.sendall(b"\x05\x01\x00")
        assert stalled.recv(2) == b"\x05\x00"
        host = b"web.bob.pq"
        stalled.sendall(b"\x05\x01\x00\x03" + bytes([len(host)]) + host + struct.pack(">H", 80))
        assert stalled.recv(10)[:2] == b"\x05\x00"
        stalled.sendall(f"GET /bytes/{1 << 30} HTTP/1.0\r\n\r\n".encode())
        time.sleep(3)  # let every buffer on the path fill up
        assert curl(net, "http://web.bob.pq/").stdout == b"hello from bob\n"  # other streams still flow
        after = {name: rss_kb(net[name].process.pid) for name in ("alice", "bob")}
    for name in ("alice", "bob"):
        growth_mb = (after[name] - before[name]) / 1024
        assert growth_mb < 16, f"{name} grew by {growth_mb:.1f} MiB while a reader stalled"


def test_rekey_under_load_does_not_interrupt_a_transfer(tmp_path: Path) -> None:
    """With a 1 s rekey budget, a multi-second transfer crosses several rekeys intact."""
    alice_home, fp_alice = init_node(tmp_path, "alice")
    bob_home, fp_bob = init_node(tmp_path, "bob")
    pq("trust", "bob", fp_bob, home=alice_home)
    pq("trust", "alice", fp_alice, home=bob_home)
    digest_script = "import sys,hashlib; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest(), flush=True)"
    (bob_home / "config.toml").write_text(
        "[timers]\nrekey_after = 1\n"
        f'[services]\ndigest = {{ exec = ["{sys.executable}", "-c", "{digest_script}"] }}\n')
    (alice_home / "config.toml").write_text("[timers]\nrekey_after = 1\n")
    bob = Daemon(bob_home).start()
    alice = Daemon(alice_home, ["--peer", f"bob=127.0.0.1:{bob.port}"]).start()
    try:
        assert pq("ping", "bob", home=alice_home).returncode == 0
        client = subprocess.Popen([sys.executable, "-m", "pqtunneld.cli", "connect", "bob/digest", "--home", str(alice_home)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        digest = hashlib.sha256()
        assert client.stdin is not None
        deadline = time.monotonic() + 3.5
        block = bytes(range(256)) * 256
        while time.monotonic() < deadline:
            client.stdin.write(block)
            digest.update(block)
        client.stdin.close()
        out = client.stdout.read().decode().strip() if client.stdout else ""
        assert client.wait(30) == 0
        assert out == digest.hexdigest()
        (session,) = alice.sessions()
        assert session["rekeys"] >= 2
        assert "rekeyed session with bob" in alice.logs()
    finally:
        alice.kill()
        bob.kill()


def raw_socks_exchange(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        chunks = []
        try:
            while chunk := sock.recv(4096):
                chunks.append(chunk)
        except (ConnectionResetError, socket.timeout):
            pass
    return b"".join(chunks)


def test_the_daemon_answers_malformed_and_unsupported_socks_requests_properly(net: dict) -> None:
    port = net["socks"]
    name = b"web.bob.pq"
    assert raw_socks_exchange(port, b"\x04\x01\x00\x50\x00\x00\x00\x01\x00web.bob.pq\x00")[:2] == b"\x00\x5b"  # SOCKS4
    bind = b"\x05\x01\x00" + b"\x05\x02\x00\x03" + bytes([len(name)]) + name + b"\x00\x50"
    assert raw_socks_exchange(port, bind)[2:4] == b"\x05\x07"  # BIND: command not supported
    udp = b"\x05\x01\x00" + b"\x05\x03\x00\x03" + bytes([len(name)]) + name + b"\x00\x50"
    assert raw_socks_exchange(port, udp)[2:4] == b"\x05\x07"  # UDP ASSOCIATE
    ipv4 = b"\x05\x01\x00" + b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50"
    assert raw_socks_exchange(port, ipv4)[2:4] == b"\x05\x08"  # address literals: not supported
    long_name = b"a" * 255
    assert raw_socks_exchange(port, b"\x05\x01\x00\x05\x01\x00\x03\xff" + long_name + b"\x00\x50")[2:4] == b"\x05\x04"
    assert raw_socks_exchange(port, b"\x05\x00") == b"\x05\xff"  # no methods offered: none acceptable
    assert raw_socks_exchange(port, b"\x05\x01\x00\x05\x01\x00\x03\x10web") == b"\x05\x00"  # vanished mid-request
    assert curl(net, "http://web.bob.pq/").stdout == b"hello from bob\n"  # everyone else unaffected
    assert "Traceback" not in net["alice"].logs()


def test_socks_username_password_when_configured(tmp_path: Path) -> None:
    alice_home, fp_alice = init_node(tmp_path, "alice")
    bob_home, fp_bob = init_node(tmp_path, "bob")
    pq("trust", "bob", fp_bob, home=alice_home)
    pq("trust", "alice", fp_alice, home=bob_home)
    with HttpServer() as http:
        (bob_home / "config.toml").write_text(f'[services]\nweb = "127.0.0.1:{http.port}"\n')
        (alice_home / "config.toml").write_text('[socks_users]\nagent1 = "s3cret"\n')
        bob = Daemon(bob_home).start()
        socks_port = free_port()
        alice = Daemon(alice_home, ["--socks", f"127.0.0.1:{socks_port}", "--peer", f"bob=127.0.0.1:{bob.port}"]).start()
        try:
            proxy = ["--socks5-hostname", f"127.0.0.1:{socks_port}"]
            ok = subprocess.run([*CURL, *proxy, "--proxy-user", "agent1:s3cret", "http://web.bob.pq/"], capture_output=True)
            assert ok.returncode == 0 and ok.stdout == b"hello from bob\n", ok.stderr
            wrong = subprocess.run([*CURL, *proxy, "--proxy-user", "agent1:nope", "http://web.bob.pq/"], capture_output=True)
            assert wrong.returncode == 97
            anonymous = subprocess.run([*CURL, *proxy, "http://web.bob.pq/"], capture_output=True)
            assert anonymous.returncode == 97
            assert "wrong credentials for user 'agent1'" in alice.logs()
        finally:
            alice.kill()
            bob.kill()
