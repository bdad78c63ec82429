"""Three pqtunnel nodes on three "machines" (network namespaces), set up and torn down in one command.

    sudo python3 examples/lab/lab.py                  # nodes find each other by mDNS (no --peer)
    sudo python3 examples/lab/lab.py --static-peers   # static --peer addresses instead

alice, bob and carol each get a namespace with eth0 on a private bridge (10.77.X.0/24), a node
home with pinned trust, and a daemon on HOST_IP:7330 with SOCKS on 127.0.0.1:1080 *inside* the
namespace. bob runs a web server on his own 127.0.0.1 only; alice and carol fetch it by name
(http://web.bob.pq/) through their own SOCKS endpoint. Everything is removed at the end, also on
Ctrl-C or an error; a lab left by a killed run is removed by the next one.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pqlab.netlab import (  # noqa: E402
    Host,
    NamespacedDaemon,
    NetLab,
    NetLabError,
    netns_unavailable_reason,
    pin_each_other,
    static_peer_args,
)
from pqlab.process import init_node  # noqa: E402

NAMES = ("alice", "bob", "carol")
WEB_PORT = 8080
# The one line to change once the daemon's mDNS discovery is wired: "mdns" makes it the default.
DEFAULT_DISCOVERY = "mdns"


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def show(command: str, result: subprocess.CompletedProcess[str]) -> None:
    """Print a command the way a user would type it, then its output, indented."""
    print(f"   $ {command}")
    out = (result.stdout + result.stderr).strip()
    if out:
        print("     " + out.replace("\n", "\n     "), flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Three pqtunnel nodes in three network namespaces.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--static-peers", dest="discovery", action="store_const", const="static",
                      help="tell every node where the others listen (--peer NAME=IP:7330)")
    mode.add_argument("--mdns", dest="discovery", action="store_const", const="mdns",
                      help="no addresses: the nodes discover each other by mDNS on the lab bridge")
    parser.add_argument("--wait", action="store_true", help="keep the lab up until Enter, to try commands by hand")
    parser.set_defaults(discovery=DEFAULT_DISCOVERY)
    return parser.parse_args()


def build_hosts(lab: NetLab) -> dict[str, Host]:
    step("ip netns: one namespace per host, joined by br0 in a bridge namespace")
    hosts = {name: lab.add_host(name) for name in NAMES}
    for host in hosts.values():
        print(f"   {host.name:<6} netns {host.netns:<24} eth0 {host.ip}/24")
    return hosts


def make_identities(root: Path) -> dict[str, tuple[Path, str]]:
    step("pqtunnel init + pqtunnel trust: hybrid identities, every node pins the other two")
    identities = {name: init_node(root, name) for name in NAMES}
    pin_each_other(identities)
    for name, (_, fingerprint) in identities.items():
        print(f"   {name:<6} {fingerprint}")
    return identities


def serve_bobs_web(bob: Host, root: Path) -> None:
    step(f"bob: a web server on bob's own 127.0.0.1:{WEB_PORT}, published to peers as the service 'web'")
    root.mkdir()
    (root / "index.html").write_text("hello from bob's namespace, over a post-quantum tunnel\n")
    argv = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(WEB_PORT), "--directory", str(root)]
    bob.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bob.wait_listening(WEB_PORT)
    print(f"   $ ip netns exec {bob.netns} {shlex.join(argv)}")


def start_nodes(hosts: dict[str, Host], identities: dict[str, tuple[Path, str]],
                discovery: str) -> dict[str, NamespacedDaemon]:
    step(f"pqtunnel up in each namespace ({'static peers' if discovery == 'static' else 'mDNS discovery'})")
    (identities["bob"][0] / "config.toml").write_text(f'[services]\nweb = "127.0.0.1:{WEB_PORT}"\n')
    daemons = {}
    for name, host in hosts.items():
        peers = static_peer_args(host, hosts.values()) if discovery == "static" else []
        daemon = NamespacedDaemon(identities[name][0], peers, host=host, mdns=discovery == "mdns")
        daemons[name] = daemon.start()
        print(f"   $ ip netns exec {host.netns} pqtunnel {shlex.join(daemon.command()[3:])}")
    return daemons


def connect_all(daemons: dict[str, NamespacedDaemon], discovery: str) -> None:
    step("pqtunnel ping: every node reaches the other two (hybrid handshakes across the bridge)")
    for name, daemon in daemons.items():
        for peer in daemons:
            if peer != name:
                try:
                    print(f"   {name} -> {daemon.wait_ping(peer)}")
                except TimeoutError as exc:
                    hint = "\n  (--mdns needs the daemon's mDNS discovery; try --static-peers)" \
                        if discovery == "mdns" else ""
                    raise NetLabError(f"{exc}{hint}\n  {name}'s daemon log:\n{daemon.logs().rstrip()}") from None


def show_tables(daemons: dict[str, NamespacedDaemon]) -> None:
    for name, daemon in daemons.items():
        step(f"{name}: pqtunnel peers / sessions (the CLI talks to the daemon through HOME/control.sock)")
        for command in ("peers", "sessions"):
            show(f"pqtunnel {command} --home {daemon.home}", daemon.pq(command))


def fetch_across(hosts: dict[str, Host]) -> None:
    bob = hosts["bob"]
    for name in ("alice", "carol"):
        host = hosts[name]
        step(f"{name}: curl through {name}'s own SOCKS endpoint to bob's web service, by name")
        result = host.curl_socks("http://web.bob.pq/")
        show(f"ip netns exec {host.netns} curl --socks5-hostname 127.0.0.1:1080 http://web.bob.pq/", result)
        if result.returncode != 0:
            raise NetLabError(f"fetch from {name} failed: {result.stderr.strip()}")
    step("alice: the same server directly, without the tunnel (it only listens on bob's loopback)")
    direct = hosts["alice"].curl(f"http://{bob.ip}:{WEB_PORT}/")
    show(f"ip netns exec {hosts['alice'].netns} curl http://{bob.ip}:{WEB_PORT}/", direct)
    if direct.returncode == 0:
        raise NetLabError("bob's loopback server was reachable without the tunnel")


def hold(hosts: dict[str, Host]) -> None:
    try:
        input(f"\nlab is up; e.g. `ip netns exec {hosts['carol'].netns} bash`. Press Enter to tear down. ")
    except EOFError:
        pass


def run_lab(lab: NetLab, args: argparse.Namespace, root: Path) -> None:
    hosts = build_hosts(lab)
    identities = make_identities(root)
    serve_bobs_web(hosts["bob"], root / "www")
    daemons = start_nodes(hosts, identities, args.discovery)
    connect_all(daemons, args.discovery)
    show_tables(daemons)
    fetch_across(hosts)
    if args.wait:
        hold(hosts)
    step("teardown: stop the daemons, delete the namespaces")
    for daemon in daemons.values():
        daemon.stop()


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> int:
    args = parse_args()
    reason = netns_unavailable_reason()
    if reason is not None:
        print(f"lab: {reason} (run as root on Linux with iproute2)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _terminate)
    lab = NetLab()
    failure: str | None = None
    # the node homes outlive the lab: the daemons must be gone before their homes are removed
    with tempfile.TemporaryDirectory(prefix="pqtunnel-lab-") as tmp:
        try:
            lab.start()
            run_lab(lab, args, Path(tmp))
        except KeyboardInterrupt:
            failure = "interrupted"
        except (NetLabError, TimeoutError, RuntimeError) as exc:
            failure = str(exc)
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave namespaces behind
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            leftovers = lab.close(raise_errors=False)
    if leftovers:
        print(f"\nlab: teardown incomplete (the next run removes the rest): {'; '.join(leftovers)}", file=sys.stderr)
    if failure is not None:
        print(f"\nlab: {failure}", file=sys.stderr)
        print(f"lab: {'teardown incomplete' if leftovers else 'everything was torn down'}", file=sys.stderr)
        return 1
    if leftovers:
        return 1
    print(f"\nlab finished: 3 nodes ran in {lab.subnet}; no namespace is left")
    return 0


if __name__ == "__main__":
    sys.exit(main())
