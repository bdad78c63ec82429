"""Three hosts in network namespaces: real daemons on real (virtual) links, driven by the CLI and curl.

alice, bob and carol each live in their own namespace on a lab bridge, with static peers and pinned
trust. bob's web server listens on bob's own 127.0.0.1, which no other host can reach except
through the tunnel. Needs root and ``ip netns``; skipped (with the reason) anywhere else.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.netns import (
    Host,
    NamespacedDaemon,
    NetLab,
    NetLabError,
    cleanup_stale_labs,
    lab_namespaces,
    netns_unavailable_reason,
    pin_each_other,
    static_peer_args,
    wait_for,
)
from tests.nodes import init_node

UNAVAILABLE = netns_unavailable_reason()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")

NAMES = ("alice", "bob", "carol")
WEB_PORT = 8080
PAGE = "hello from bob's namespace\n"
# a node that leaves is noticed within seconds instead of the default 35 s
FAST_TIMERS = "[timers]\nkeepalive = 1\ndead_after = 4\n"


def serve_web(host: Host, root: Path) -> None:
    """bob's private web app: bound to bob's own loopback inside bob's namespace."""
    root.mkdir()
    (root / "index.html").write_text(PAGE)
    host.popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(WEB_PORT), "--directory", str(root)],
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    host.wait_listening(WEB_PORT)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("netns")
    with NetLab() as lab:
        hosts = {name: lab.add_host(name) for name in NAMES}
        identities = {name: init_node(tmp, name) for name in NAMES}
        pin_each_other(identities)
        for name, (home, _) in identities.items():
            services = f'[services]\nweb = "127.0.0.1:{WEB_PORT}"\n' if name == "bob" else ""
            (home / "config.toml").write_text(services + FAST_TIMERS)
        serve_web(hosts["bob"], tmp / "www")
        daemons = {name: NamespacedDaemon(identities[name][0], static_peer_args(host, hosts.values()),
                                          host=host).start()
                   for name, host in hosts.items()}
        for name, daemon in daemons.items():
            daemon.wait_sessions(set(NAMES) - {name})
        yield {"lab": lab, "hosts": hosts, "daemons": daemons,
               "fingerprints": {name: fp for name, (_, fp) in identities.items()}}
        logs = {name: daemon.logs() for name, daemon in daemons.items()}
    for name, text in logs.items():
        assert "Traceback" not in text, f"{name}'s daemon log:\n{text}"


def test_every_node_holds_a_pinned_hybrid_session_with_the_others(mesh: dict) -> None:
    lab, hosts = mesh["lab"], mesh["hosts"]
    subnet = ipaddress.ip_network(lab.subnet)
    for name, daemon in mesh["daemons"].items():
        assert daemon.status()["listen"] == f"{hosts[name].ip}:7330"  # CLI from the root namespace
        sessions = {s["peer"]: s for s in daemon.sessions()}
        assert set(sessions) == set(NAMES) - {name}
        for peer, session in sessions.items():
            assert session["fingerprint"] == mesh["fingerprints"][peer]
            assert session["trust"] == "pinned" and session["kem"] == "X25519+ML-KEM-768"
            assert ipaddress.ip_address(session["remote"].rsplit(":", 1)[0]) in subnet
        peers = daemon.pq("peers", "--json")
        assert peers.returncode == 0, peers.stderr


def test_curl_reaches_bobs_private_web_by_name_from_other_namespaces(mesh: dict) -> None:
    for name in ("alice", "carol"):
        result = mesh["hosts"][name].curl_socks("http://web.bob.pq/")
        assert result.returncode == 0, f"{name}: {result.stderr}"
        assert result.stdout == PAGE


def test_bobs_loopback_server_is_isolated_except_through_the_tunnel(mesh: dict) -> None:
    alice, bob = mesh["hosts"]["alice"], mesh["hosts"]["bob"]
    assert bob.curl(f"http://127.0.0.1:{WEB_PORT}/").stdout == PAGE  # it is up, on bob's loopback
    direct = alice.curl(f"http://{bob.ip}:{WEB_PORT}/")
    assert direct.returncode == 7, direct  # connection refused: nothing listens on bob's eth0
    own_loopback = alice.curl(f"http://127.0.0.1:{WEB_PORT}/")
    assert own_loopback.returncode == 7, own_loopback  # alice's 127.0.0.1 is alice's alone
    assert alice.curl_socks("http://web.bob.pq/").stdout == PAGE


def test_a_node_that_leaves_is_unreachable_until_it_comes_back(mesh: dict) -> None:
    lab, alice, bob = mesh["lab"], mesh["hosts"]["alice"], mesh["hosts"]["bob"]
    daemons = mesh["daemons"]
    lab.disconnect(bob)
    try:
        daemons["alice"].wait_session_down("bob")
        gone = alice.curl_socks("http://web.bob.pq/")
        assert gone.returncode == 97 and "(3)" in gone.stderr, gone  # 0x03: known peer, offline
        ping = daemons["alice"].pq("ping", "carol")
        assert ping.returncode == 0, ping.stderr  # the rest of the mesh is unaffected
        daemons["alice"].wait_for_log("cannot reach bob")
    finally:
        lab.reconnect(bob)
    started = time.monotonic()
    back = wait_for(lambda: alice.curl_socks("http://web.bob.pq/").stdout == PAGE, 60, "bob to be reachable again")
    assert back and time.monotonic() - started < 60
    for name, daemon in daemons.items():
        daemon.wait_sessions(set(NAMES) - {name})


def test_a_fetch_in_flight_when_the_node_leaves_gets_network_unreachable(mesh: dict) -> None:
    lab, alice, bob = mesh["lab"], mesh["hosts"]["alice"], mesh["hosts"]["bob"]
    lab.disconnect(bob)
    try:
        caught = alice.curl_socks("http://web.bob.pq/")  # the session is still up; it dies while we wait
        assert caught.returncode == 97 and "(3)" in caught.stderr, caught
    finally:
        lab.reconnect(bob)
        for name, daemon in mesh["daemons"].items():
            daemon.wait_sessions(set(NAMES) - {name}, timeout=60)


ANNOUNCE = """
import sys, time
from zeroconf import ServiceInfo, Zeroconf
zc = Zeroconf()
zc.register_service(ServiceInfo("_pqtlab._tcp.local.", "bob._pqtlab._tcp.local.", port=7330,
                                parsed_addresses=[sys.argv[1]]))
print("registered", flush=True)
time.sleep(60)
"""
BROWSE = """
import sys, threading
from zeroconf import ServiceBrowser, ServiceStateChange, Zeroconf
found = threading.Event()
def on_change(zeroconf, service_type, name, state_change):
    info = zeroconf.get_service_info(service_type, name, 3000)
    if state_change is ServiceStateChange.Added and info:
        print(name, info.parsed_addresses()[0], info.port, flush=True)
        found.set()
zc = Zeroconf()
ServiceBrowser(zc, "_pqtlab._tcp.local.", handlers=[on_change])
sys.exit(0 if found.wait(15) else 1)
"""


def test_mdns_crosses_the_lab_bridge(mesh: dict) -> None:
    """zeroconf with its default interface choice works between namespaces (ready for mDNS discovery)."""
    pytest.importorskip("zeroconf")
    alice, bob = mesh["hosts"]["alice"], mesh["hosts"]["bob"]
    announcer = bob.popen([sys.executable, "-c", ANNOUNCE, bob.ip], stdout=subprocess.PIPE, text=True)
    try:
        assert announcer.stdout is not None and announcer.stdout.readline().strip() == "registered"
        browsed = alice.run([sys.executable, "-c", BROWSE], timeout=30)
        assert browsed.returncode == 0, browsed.stderr
        assert browsed.stdout.split() == ["bob._pqtlab._tcp.local.", bob.ip, "7330"]
    finally:
        announcer.kill()
        announcer.wait()


def test_teardown_removes_everything_even_when_the_body_fails() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with NetLab() as lab:
            host = lab.add_host("solo")
            sleeper = host.popen(["sleep", "600"])
            names = [lab.bridge_netns, host.netns]
            raise RuntimeError("boom")
    assert sleeper.poll() is not None
    assert not {name for name, _, _ in lab_namespaces()} & set(names)


def test_leftovers_of_a_killed_lab_are_cleaned_up() -> None:
    script = ("from pqlab.netlab import NetLab; import time; lab = NetLab(); lab.start(); "
              "lab.add_host('orphan').popen(['sleep', '600']); print(lab.bridge_netns, flush=True); time.sleep(600)")
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[2])
    assert owner.stdout is not None
    bridge = owner.stdout.readline().strip()
    owner.kill()
    owner.wait()
    leftovers = {name for name, pid, _ in lab_namespaces() if pid == owner.pid}
    assert leftovers == {bridge, f"{bridge}-orphan"}
    removed = cleanup_stale_labs()
    assert leftovers <= set(removed)
    assert not {name for name, _, _ in lab_namespaces()} & leftovers


def test_mistakes_give_clear_errors() -> None:
    with NetLab() as lab:
        lab.add_host("alice")
        with pytest.raises(NetLabError, match="already exists"):
            lab.add_host("alice")
        with pytest.raises(NetLabError, match="host name 'Bad_Name'"):
            lab.add_host("Bad_Name")
        with pytest.raises(NetLabError, match="no host 'bob'"):
            lab.disconnect("bob")
    with pytest.raises(NetLabError, match="not started"):
        NetLab().add_host("alice")


def test_the_lab_example_runs_end_to_end() -> None:
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, str(root / "examples" / "lab" / "lab.py")], capture_output=True,
                            text=True, timeout=180, cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("hello from bob's namespace, over a post-quantum tunnel") == 2
    assert "Couldn't connect to server" in result.stdout  # the direct fetch, without the tunnel
    assert "no namespace is left" in result.stdout and "Traceback" not in result.stdout + result.stderr
