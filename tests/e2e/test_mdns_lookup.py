"""A request for an expected peer that mDNS has not found yet queries mDNS and waits, bounded.

Real daemons with real mDNS on loopback only (``--mdns-interface 127.0.0.1``), as in
test_mdns.py. Node names carry a random suffix, so other tests advertising on this
machine's loopback at the same time never answer for our names.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from zeroconf import ServiceInfo, Zeroconf

from pqlab.process import CLI
from pqtunnel.discovery import SERVICE_TYPE, advertisement_properties
from pqtunneld.discovered import LOOKUP_TIMEOUT
from tests.http_fixture import HttpServer
from tests.nodes import Daemon, init_node, pq

LOOPBACK = "127.0.0.1"
PAGE = "hello from bob\n"  # tests/http_fixture.py at "/"


def unique(name: str) -> str:
    return f"{name}-{secrets.token_hex(3)}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[dict]:
    """alice (mDNS on loopback, a SOCKS endpoint) pins bob; bob pins alice and serves "web".
    Only alice runs; each test starts bob when it wants him."""
    names = {"alice": unique("alice"), "bob": unique("bob")}
    alice_home, fp_alice = init_node(tmp_path, names["alice"])
    bob_home, fp_bob = init_node(tmp_path, names["bob"])
    pq("trust", names["bob"], fp_bob, home=alice_home)
    pq("trust", names["alice"], fp_alice, home=bob_home)
    socks = free_port()
    with HttpServer() as http:
        (bob_home / "config.toml").write_text(f'[services]\nweb = "127.0.0.1:{http.port}"\n')
        alice = Daemon(alice_home, ["--socks", f"127.0.0.1:{socks}"], mdns_interface=LOOPBACK).start()
        started: list[Daemon] = [alice]
        try:
            yield {"names": names, "alice": alice, "alice_home": alice_home, "bob_home": bob_home,
                   "fp_bob": fp_bob, "socks": socks, "started": started, "tmp": tmp_path}
        finally:
            for daemon in started:
                daemon.kill()


def ping(home: Path, peer: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*CLI, "ping", peer, "--home", str(home)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def curl(socks: int, url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["curl", "-sS", "--max-time", "30", "--socks5-hostname", f"127.0.0.1:{socks}", url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def timed(argv: list[str]) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return result, time.monotonic() - started


def test_requests_made_at_start_reach_a_pinned_peer_that_appears_a_second_later(lab: dict) -> None:
    bob = lab["names"]["bob"]
    pinged = ping(lab["alice_home"], bob)
    fetched = curl(lab["socks"], f"http://web.{bob}.pq/")
    connected = subprocess.Popen([*CLI, "connect", f"{bob}/web", "--home", str(lab["alice_home"])],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    lab["started"].append(Daemon(lab["bob_home"], mdns_interface=LOOPBACK).start())
    out, err = pinged.communicate(timeout=60)
    assert pinged.returncode == 0, err
    assert out.startswith(f"{bob} ({lab['fp_bob']}): "), out
    page, curl_err = fetched.communicate(timeout=60)
    assert (fetched.returncode, page) == (0, PAGE), curl_err
    reply, connect_err = connected.communicate("GET / HTTP/1.0\r\n\r\n", timeout=60)
    assert connected.returncode == 0 and reply.endswith(PAGE), connect_err


def test_a_pinned_name_that_never_appears_is_refused_after_the_bound_with_the_reason(lab: dict) -> None:
    bob = lab["names"]["bob"]  # pinned, never started
    result, elapsed = timed([*CLI, "ping", bob, "--home", str(lab["alice_home"])])
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"unknown peer '{bob}'" in result.stderr and "pinned" in result.stderr
    assert f"within {LOOKUP_TIMEOUT:g} s" in result.stderr
    assert LOOKUP_TIMEOUT - 0.5 <= elapsed <= LOOKUP_TIMEOUT + 5, elapsed
    refused, curl_elapsed = timed(["curl", "-sS", "--socks5-hostname", f"127.0.0.1:{lab['socks']}",
                                   f"http://web.{bob}.pq/"])
    assert refused.returncode == 97 and LOOKUP_TIMEOUT - 0.5 <= curl_elapsed <= LOOKUP_TIMEOUT + 5, curl_elapsed


def test_an_unpinned_unknown_name_is_still_refused_at_once(lab: dict) -> None:
    stranger = unique("stranger")
    result, elapsed = timed([*CLI, "ping", stranger, "--home", str(lab["alice_home"])])
    assert result.returncode != 0 and f"unknown peer '{stranger}'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < LOOKUP_TIMEOUT / 2, elapsed


def quiet_responder(name: str, fingerprint: str, port: int) -> Zeroconf:
    """A real mDNS responder on loopback that answers queries for ``name`` but never announces
    it: only a node that asks finds it (the browser would only on its next, backed-off query)."""
    zc = Zeroconf(interfaces=[LOOPBACK])
    info = ServiceInfo(SERVICE_TYPE, f"{name}.{SERVICE_TYPE}", port=port,
                       properties=advertisement_properties(name, fingerprint),
                       server=f"quiet-{name}.local.", parsed_addresses=[LOOPBACK])

    async def add() -> None:
        zc.registry.async_add(info)

    assert zc.loop is not None
    asyncio.run_coroutine_threadsafe(add(), zc.loop).result(5)
    return zc


def test_the_request_itself_queries_mdns_and_finds_a_node_that_never_announced(lab: dict) -> None:
    """bob runs without mDNS; a responder that never announces answers for him. alice's
    browser has backed off by now (its queries go out 1, 2, 4, 8, 16 s apart), so only
    alice's own query, sent for the request, can find bob within the bound."""
    names = lab["names"]
    bob_daemon = Daemon(lab["bob_home"]).start()  # --no-mdns
    lab["started"].append(bob_daemon)
    time.sleep(16)  # alice's browser: next PTR query ~15 s away
    zc = quiet_responder(names["bob"], lab["fp_bob"], bob_daemon.port)
    try:
        result, elapsed = timed([*CLI, "ping", names["bob"], "--home", str(lab["alice_home"])])
        assert result.returncode == 0, result.stderr
        assert elapsed < LOOKUP_TIMEOUT / 2, elapsed  # the first question is answered at once
    finally:
        zc.close()


def test_ping_help_states_the_bound() -> None:
    result = pq("ping", "--help")
    assert result.returncode == 0
    assert f"up to {LOOKUP_TIMEOUT:g} s" in " ".join(result.stdout.split())
