"""Only the node's own user (and root) may use its identity through SOCKS (hardening issue,
finding 3): the local user behind a loopback SOCKS connection is read from the kernel's
socket table, and other users are refused with "not allowed by ruleset" unless
`socks_allow_users` names them."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pqtunneld.peercred import local_peer_uid
from tests.http_fixture import HttpServer
from tests.nodes import Daemon, init_node, pq

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_pair(tmp_path: Path, http: HttpServer, alice_config: str = "") -> tuple[Daemon, Daemon, int]:
    alice_home, fp_alice = init_node(tmp_path, "alice")
    bob_home, fp_bob = init_node(tmp_path, "bob")
    pq("trust", "bob", fp_bob, home=alice_home)
    pq("trust", "alice", fp_alice, home=bob_home)
    (bob_home / "config.toml").write_text(f'[services]\nweb = "127.0.0.1:{http.port}"\n')
    (alice_home / "config.toml").write_text(alice_config)
    bob = Daemon(bob_home).start()
    socks_port = free_port()
    alice = Daemon(alice_home, ["--socks", f"127.0.0.1:{socks_port}", "--peer", f"bob=127.0.0.1:{bob.port}"]).start()
    return alice, bob, socks_port


@contextmanager
def loopback_listener(backlog: int | None = None) -> Iterator[tuple[socket.socket, int]]:
    """A listening TCP socket on 127.0.0.1 and its port (accept times out after 20 s)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(*(() if backlog is None else (backlog,)))
        server.settimeout(20)
        yield server, server.getsockname()[1]


@contextmanager
def accepted_connection() -> Iterator[socket.socket]:
    """The server end of one loopback TCP connection of ours (owned by this process's uid)."""
    with loopback_listener() as (server, port), socket.create_connection(("127.0.0.1", port)):
        conn, _ = server.accept()
        with conn:
            yield conn


def curl(socks_port: int, *prefix: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, "curl", "-sS", "--max-time", "20", "--socks5-hostname",
                           f"127.0.0.1:{socks_port}", "http://web.bob.pq/"], capture_output=True, text=True, timeout=60)


@pytest.fixture
def http() -> Iterator[HttpServer]:
    with HttpServer() as server:
        yield server


def test_the_kernel_names_the_local_user_behind_a_tcp_connection() -> None:
    with loopback_listener() as (server, port):
        child = subprocess.Popen([*AS_NOBODY, "/usr/bin/python3", "-c",
                                  f"import socket,time; s=socket.create_connection(('127.0.0.1',{port})); time.sleep(5)"])
        try:
            conn, _ = server.accept()
            with conn:
                assert local_peer_uid(conn) == NOBODY
        finally:
            child.kill()
            child.wait()


def test_another_local_user_cannot_use_the_nodes_identity(tmp_path: Path, http: HttpServer) -> None:
    alice, bob, socks_port = start_pair(tmp_path, http)
    try:
        assert curl(socks_port).returncode == 0, "the daemon's own user (root here) is served"
        refused = curl(socks_port, *AS_NOBODY)
        assert refused.returncode != 0
        assert "(2)" in refused.stderr, refused.stderr  # SOCKS reply 0x02: connection not allowed by ruleset
        alice.wait_for_log(f"local user uid {NOBODY} may not use this node's SOCKS endpoint")
    finally:
        alice.kill()
        bob.kill()


def test_socks_allow_users_widens_it(tmp_path: Path, http: HttpServer) -> None:
    alice, bob, socks_port = start_pair(tmp_path, http, '[node]\nsocks_allow_users = ["nobody"]\n')
    try:
        served = curl(socks_port, *AS_NOBODY)
        assert served.returncode == 0, served.stderr
    finally:
        alice.kill()
        bob.kill()


def test_an_unknown_user_in_socks_allow_users_is_a_one_line_error(tmp_path: Path) -> None:
    home, _ = init_node(tmp_path, "alice")
    (home / "config.toml").write_text('[node]\nsocks_allow_users = ["no-such-user-here"]\n')
    result = pq("up", "--no-mdns", "--listen", "127.0.0.1:0", home=home, timeout=20)
    assert result.returncode != 0
    assert "no local user named 'no-such-user-here'" in result.stderr and "Traceback" not in result.stderr


def test_the_netlink_answer_and_the_proc_scan_agree() -> None:
    """Both ways of reading the owner give the same uid (netlink is the fast path, /proc the fallback)."""
    from pqtunneld.peercred import _normal, netlink_uid, scan_tables

    with accepted_connection() as conn:
        client, local = conn.getpeername(), conn.getsockname()
        assert netlink_uid(conn.family, client, local) == 0
        assert scan_tables(_normal(client[0]), client[1], _normal(local[0]), local[1]) == 0
        assert netlink_uid(conn.family, (client[0], 1), local) is None  # no such socket


def test_one_netlink_socket_serves_every_lookup_and_skips_a_late_answer() -> None:
    """The kept sock_diag socket answers lookup after lookup; an answer left unread from an
    earlier request (one that timed out) is skipped by its sequence number, never taken."""
    from pqtunneld.peercred import DiagSocket, lookup_message, netlink_uid

    diag = DiagSocket()
    with accepted_connection() as conn:
        client, local = conn.getpeername(), conn.getsockname()
        assert netlink_uid(conn.family, (client[0], 1), local, diag) is None  # no such socket
        kept = diag._sock
        assert netlink_uid(conn.family, client, local, diag) == 0
        assert diag._sock is kept
        # a request nobody read the answer of: that answer ("no such socket") waits first in line
        assert kept is not None
        kept.sendto(lookup_message(conn.family, (client[0], 1), local, diag.next_sequence()), (0, 0))
        assert netlink_uid(conn.family, client, local, diag) == 0
    diag.close()


CLOSE_AT_ONCE = r'''
import socket, sys
port, count = int(sys.argv[1]), int(sys.argv[2])
host = b"web.bob.pq"
request = (b"\x05\x01\x00\x05\x01\x00\x03" + bytes([len(host)]) + host + (80).to_bytes(2, "big")
           + b"GET / HTTP/1.0\r\n\r\n")
for _ in range(count):
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(request)
'''


def test_a_client_that_closed_its_socket_is_not_taken_for_root(tmp_path: Path, http: HttpServer) -> None:
    """A closed client socket lingers in the kernel's table as TIME_WAIT, whose owner reads as
    uid 0: another user who sent a whole SOCKS request and closed before the daemon looked
    (a burst keeps it busy) was served as root. Such a socket has no owner (inode 0)."""
    alice, bob, socks_port = start_pair(tmp_path, http)
    try:
        subprocess.run([*AS_NOBODY, "/usr/bin/python3", "-c", CLOSE_AT_ONCE, str(socks_port), "300"],
                       check=True, timeout=30)
        deadline = time.monotonic() + 10
        while alice.logs().count("SOCKS: refused") + alice.logs().count("web.bob.pq:80 ended") < 300:
            assert time.monotonic() < deadline, "not every client had its one line of outcome"
            time.sleep(0.1)
        assert alice.logs().count("SOCKS: refused") == 300, "a client of another user was served"
    finally:
        alice.kill()
        bob.kill()


def test_the_owner_of_a_closed_client_socket_is_unknown() -> None:
    """Both lookups: a TIME_WAIT socket (its owner closed it) names nobody, not root."""
    from pqtunneld.peercred import _normal, netlink_uid, scan_tables

    with loopback_listener() as (server, port):
        subprocess.run([*AS_NOBODY, "/usr/bin/python3", "-c",
                        f"import socket; socket.create_connection(('127.0.0.1',{port})).close()"], check=True)
        conn, _ = server.accept()
        with conn:
            client, local = conn.getpeername(), conn.getsockname()
            assert netlink_uid(conn.family, client, local) is None
            assert scan_tables(_normal(client[0]), client[1], _normal(local[0]), local[1]) is None


def test_many_clients_of_two_users_at_once_are_each_named_rightly() -> None:
    """One kept netlink socket answers lookups for interleaved clients of root and nobody."""
    with loopback_listener(backlog=64) as (server, port):
        child = subprocess.Popen([*AS_NOBODY, "/usr/bin/python3", "-c",
                                  "import socket,time\n"
                                  f"s=[socket.create_connection(('127.0.0.1',{port})) for _ in range(20)]\n"
                                  "time.sleep(15)"])
        mine = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        try:
            ports_of_root = {sock.getsockname()[1] for sock in mine}
            accepted = [server.accept()[0] for _ in range(40)]
            named = {conn.getpeername()[1]: local_peer_uid(conn) for conn in accepted}
            assert {p for p, uid in named.items() if uid == 0} == ports_of_root
            assert sorted(uid for uid in named.values() if uid != 0) == [NOBODY] * 20
            for conn in accepted:
                conn.close()
        finally:
            for sock in mine:
                sock.close()
            child.kill()
            child.wait()


def test_a_lookup_that_timed_out_drops_its_socket_and_its_late_answer() -> None:
    """After a timeout the kept socket is closed, so its late answer can never be read as the
    next lookup's; the next lookup opens a fresh socket and names the right user."""
    from pqtunneld.peercred import DiagSocket, netlink_uid

    class Silent:
        closed = False

        def sendto(self, message: bytes, address: tuple[int, int]) -> None:
            pass

        def recv(self, size: int) -> bytes:
            raise TimeoutError("timed out")

        def close(self) -> None:
            self.closed = True

    diag, silent = DiagSocket(), Silent()
    diag._sock = silent  # type: ignore[assignment]
    with accepted_connection() as conn:
        client, local = conn.getpeername(), conn.getsockname()
        with pytest.raises(OSError):
            netlink_uid(conn.family, client, local, diag)
        assert silent.closed and diag._sock is None
        assert netlink_uid(conn.family, client, local, diag) == 0
    diag.close()
