"""Discovery across network namespaces: no --peer at all, names proven by pins or a CA.

Each scenario builds its own lab: alice, bob and carol find each other by mDNS on the lab
bridge and carry curl traffic by name; a spoofing node advertises bob's name with its own
keys and must never receive bob's traffic. Needs root and ``ip netns``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.netns import Host, NamespacedDaemon, NetLab, netns_unavailable_reason, pin_each_other, wait_for
from tests.nodes import init_node, pq

UNAVAILABLE = netns_unavailable_reason()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")

NAMES = ("alice", "bob", "carol")
WEB_PORT = 8080
FAST_TIMERS = "[timers]\nkeepalive = 1\ndead_after = 4\n"


def serve(host: Host, root: Path, page: str) -> Path:
    """A private web app on the host's own loopback; returns its access log path."""
    root.mkdir()
    (root / "index.html").write_text(page)
    log = root.parent / f"{root.name}.access.log"
    host.popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(WEB_PORT), "--directory", str(root)],
               stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    host.wait_listening(WEB_PORT)
    return log


def start(home: Path, host: Host) -> NamespacedDaemon:
    return NamespacedDaemon(home, ["--mdns-interface", host.ip], host=host, mdns=True).start()


def fetch_by_name(host: Host, url: str, expected: str, timeout: float = 30) -> None:
    """Discovery takes a couple of seconds: retry the real fetch until it succeeds."""
    wait_for(lambda: host.curl_socks(url).stdout == expected, timeout, f"{url} from {host.name}")


def peers(daemon: NamespacedDaemon) -> list[dict]:
    result = daemon.pq("peers", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[dict]:
    with NetLab() as net:
        hosts = {name: net.add_host(name) for name in (*NAMES, "mallory")}
        pages = {name: f"hello from {name}\n" for name in hosts}
        logs = {name: serve(host, tmp_path / f"www-{name}", pages[name]) for name, host in hosts.items()}
        yield {"net": net, "hosts": hosts, "pages": pages, "access": logs, "tmp": tmp_path}


def node_homes(tmp: Path) -> dict[str, tuple[Path, str]]:
    identities = {name: init_node(tmp, name) for name in NAMES}
    # mallory's identity is *named* bob: it will advertise "bob" with its own keys
    identities["mallory"] = init_node(tmp / "mallory", "bob")
    for home, _ in identities.values():
        (home / "config.toml").write_text(f'[services]\nweb = "127.0.0.1:{WEB_PORT}"\n{FAST_TIMERS}')
    return identities


def test_pinned_nodes_find_each_other_by_mdns_and_a_spoofer_is_never_used(lab: dict) -> None:
    identities = node_homes(lab["tmp"])
    pin_each_other({name: identities[name] for name in NAMES})
    daemons = {name: start(identities[name][0], lab["hosts"][name]) for name in (*NAMES, "mallory")}
    hosts, pages = lab["hosts"], lab["pages"]
    for source, target in (("alice", "bob"), ("carol", "alice"), ("bob", "carol")):
        fetch_by_name(hosts[source], f"http://web.{target}.pq/", pages[target])
    wait_for(lambda: any(p["fingerprint"] == identities["mallory"][1] for p in peers(daemons["alice"])), 20,
             "alice to see mallory's advertisement for bob")
    alice_view = {(p["name"], p["fingerprint"]): p for p in peers(daemons["alice"])}
    genuine = alice_view[("bob", identities["bob"][1])]
    spoof = alice_view[("bob", identities["mallory"][1])]
    assert genuine["trust"] == "pinned" and genuine["source"] == "mdns" and genuine["session"] == "up"
    assert spoof["trust"] == "untrusted" and spoof["session"] == "down" and spoof["conflict"]
    assert f"{hosts['mallory'].ip}:7330" in spoof["addresses"]
    assert "possible spoofing" in daemons["alice"].logs()
    # with the genuine bob gone, alice still refuses to use the spoofer for bob's name
    lab["net"].disconnect(hosts["bob"])
    daemons["alice"].wait_session_down("bob")
    refused = hosts["alice"].curl_socks("http://web.bob.pq/")
    assert refused.returncode == 97 and refused.stdout != pages["mallory"]
    assert "GET" not in lab["access"]["mallory"].read_text()
    for daemon in daemons.values():
        assert "Traceback" not in daemon.logs()


def test_a_node_that_leaves_and_comes_back_is_found_again(lab: dict) -> None:
    identities = node_homes(lab["tmp"])
    pin_each_other({name: identities[name] for name in NAMES})
    daemons = {name: start(identities[name][0], lab["hosts"][name]) for name in NAMES}
    hosts, pages = lab["hosts"], lab["pages"]
    fetch_by_name(hosts["alice"], "http://web.bob.pq/", pages["bob"])
    daemons["bob"].stop()  # goodbye packets: alice forgets bob
    wait_for(lambda: not any(p["name"] == "bob" and p["source"] == "mdns" for p in peers(daemons["alice"])),
             20, "alice to see bob leave")
    assert hosts["alice"].curl_socks("http://web.bob.pq/").returncode == 97
    daemons["bob"] = start(identities["bob"][0], hosts["bob"])
    started = time.monotonic()
    fetch_by_name(hosts["alice"], "http://web.bob.pq/", pages["bob"])
    assert time.monotonic() - started < 30
    assert "mDNS: peer 'bob' left" in daemons["alice"].logs()


def test_ca_mode_end_to_end_by_discovery(lab: dict) -> None:
    """No pins: certificates prove names. mallory has a certificate, but for her own name."""
    tmp = lab["tmp"]
    ca_dir = tmp / "ca"
    assert pq("ca", "init", "--name", "corp", "--ca-dir", str(ca_dir)).returncode == 0
    identities = node_homes(tmp)
    for name, (home, fingerprint) in identities.items():
        signed = pq("ca", "sign", "--ca-dir", str(ca_dir), "--name", name, "--fingerprint", fingerprint,
                    "--out", str(home / "node.cert"))
        assert signed.returncode == 0, signed.stderr
        config = (home / "config.toml").read_text()
        (home / "config.toml").write_text(config + f'[ca]\npublic = "{ca_dir / "identity.pub"}"\n')
    daemons = {name: start(identities[name][0], lab["hosts"][name]) for name in (*NAMES, "mallory")}
    hosts, pages = lab["hosts"], lab["pages"]
    for source, target in (("alice", "bob"), ("carol", "alice")):
        fetch_by_name(hosts[source], f"http://web.{target}.pq/", pages[target], timeout=45)
    sessions = {s["peer"]: s for s in daemons["alice"].sessions()}
    assert sessions["bob"]["trust"] == "ca" and sessions["bob"]["fingerprint"] == identities["bob"][1]
    assert "GET" not in lab["access"]["mallory"].read_text()  # bob's traffic never reached the spoofer
    for daemon in daemons.values():
        assert "Traceback" not in daemon.logs()
