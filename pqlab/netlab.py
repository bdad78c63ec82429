"""Multi-host labs on one machine: a network namespace per host, joined by a bridge.

Tests, examples and benchmarks use this to run real daemons on separate "hosts" with their own
addresses, loopback and firewall-free L2 segment, without touching the root namespace: the bridge
lives in a namespace of its own, and every veth pair is created directly between that bridge
namespace and a host namespace (the root namespace never sees an interface).

Layout of one lab (X is unique per lab, derived from the pid, so parallel labs never clash)::

    pqtlab-<pid>-<X>         bridge namespace: br0 (mcast_snooping 0) + one port pN per host
    pqtlab-<pid>-<X>-<host>  host namespace:   lo, eth0 = 10.77.X.N/24, route 224.0.0.0/4

Namespaces whose owning pid is dead are leftovers (a SIGKILLed run) and are removed by
``cleanup_stale_labs()``, which every new lab calls first. Needs root and iproute2.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from .process import CLI, Daemon, pq

PREFIX = "pqtlab-"
SUBNET_BASE = "10.77"
LISTEN_PORT = 7330
SOCKS_ADDRESS = "127.0.0.1:1080"
CURL = ["curl", "-q", "--noproxy", "", "-sS", "--max-time", "30"]
REPO_ROOT = Path(__file__).resolve().parent.parent
MAX_HOSTS = 253
STOP_GRACE = 5.0
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
_LAB_NETNS = re.compile(rf"^{PREFIX}(\d+)-(\d+)(?:-([a-z0-9-]+))?$")
_lock = threading.Lock()

T = TypeVar("T")


class NetLabError(RuntimeError):
    """A lab command failed; the message names the command and carries its stderr."""


# --- commands ------------------------------------------------------------------------------------------


def _describe(argv: Sequence[str]) -> str:
    return " ".join(a if a and " " not in a else repr(a) for a in argv)


def run_checked(argv: Sequence[str], timeout: float = 30.0) -> str:
    """Run a setup command; raise NetLabError with its stderr on failure (setup must never half-work)."""
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise NetLabError(f"{argv[0]} is not installed (needed for: {_describe(argv)})") from None
    except subprocess.TimeoutExpired:
        raise NetLabError(f"`{_describe(argv)}` did not finish within {timeout:.0f} s") from None
    if result.returncode != 0:
        raise NetLabError(f"`{_describe(argv)}` failed (exit {result.returncode}): "
                          f"{result.stderr.strip() or result.stdout.strip() or 'no output'}")
    return result.stdout


def ip(*args: str) -> str:
    return run_checked(["ip", *args])


def wait_for(check: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll ``check`` until it returns something truthy; the error says what we waited for and the last value."""
    deadline = time.monotonic() + timeout
    last: T = check()
    while not last:
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")
        time.sleep(interval)
        last = check()
    return last


# --- namespaces on this machine --------------------------------------------------------------------------


def list_namespaces() -> list[str]:
    """Every named network namespace (``ip netns list`` prints ``NAME (id: N)``)."""
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def lab_namespaces() -> list[tuple[str, int, int]]:
    """(name, owner pid, subnet octet) of every namespace that follows this module's naming."""
    found = []
    for name in list_namespaces():
        match = _LAB_NETNS.match(name)
        if match:
            found.append((name, int(match.group(1)), int(match.group(2))))
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespace_pids(netns: str) -> list[int]:
    result = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=30)
    return [int(p) for p in result.stdout.split() if p.isdigit()] if result.returncode == 0 else []


def _kill_pids(pids: Iterable[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def delete_namespace(netns: str) -> None:
    """Kill what still runs inside (else the namespace outlives its name), then delete it."""
    _kill_pids(namespace_pids(netns))
    try:
        ip("netns", "delete", netns)
    except NetLabError:
        if netns in list_namespaces():  # else someone else (a parallel cleanup) deleted it first
            raise


def cleanup_stale_labs() -> list[str]:
    """Remove the namespaces of labs whose owning process is dead; returns their names."""
    stale = [name for name, pid, _ in lab_namespaces() if not _pid_alive(pid)]
    # hosts before bridges: deleting a host namespace also removes its veth pair
    for name in sorted(stale, key=lambda n: n.count("-"), reverse=True):
        delete_namespace(name)
    return stale


def netns_unavailable_reason() -> str | None:
    """Why labs cannot run here (not root, no iproute2, netns refused), or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"{PREFIX}{os.getpid()}-0-probe"
    try:
        ip("netns", "add", probe)
        ip("netns", "delete", probe)
    except NetLabError as exc:
        return f"`ip netns` is unavailable: {exc}"
    return None


def _pick_octet() -> int:
    """A third address octet no live lab uses, starting from one derived from our pid."""
    used = {octet for _, _, octet in lab_namespaces()}
    start = os.getpid() % 254
    for step in range(254):
        octet = (start + step) % 254 + 1
        if octet not in used:
            return octet
    raise NetLabError("all 254 lab subnets 10.77.1-254.0/24 are in use; run cleanup_stale_labs()")


# --- hosts ---------------------------------------------------------------------------------------------


@dataclass
class Host:
    """One machine of the lab: its own namespace, eth0 on the lab bridge, and commands run inside."""

    name: str
    netns: str
    ip: str
    index: int
    bridge_port: str
    processes: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)
    connected: bool = True

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run`` inside the namespace; captures text output and never raises on exit codes."""
        options: dict[str, Any] = {"capture_output": True, "text": True, "timeout": 60, **kw}
        return subprocess.run(self.argv(argv), **options)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """A long-running process inside the namespace; the lab stops it at teardown."""
        process = subprocess.Popen(self.argv(argv), **kw)
        self.processes.append(process)
        return process

    def curl(self, url: str, *extra: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """curl inside this host, with no proxy from the environment."""
        return self.run([*CURL, *extra, url], timeout=timeout)

    def curl_socks(self, url: str, socks: str = SOCKS_ADDRESS, *, extra: Sequence[str] = (),
                   timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """curl through a SOCKS5 endpoint inside this host; the proxy resolves the (.pq) name."""
        return self.curl(url, "--socks5-hostname", socks, *extra, timeout=timeout)

    def is_listening(self, port: int) -> bool:
        listing = self.run(["ss", "-Hltn", f"sport = :{port}"])
        return listing.returncode == 0 and bool(listing.stdout.strip())

    def wait_listening(self, port: int, timeout: float = 15.0) -> None:
        wait_for(lambda: self.is_listening(port), timeout, f"a TCP listener on port {port} in {self.name}")

    def peer_spec(self, port: int = LISTEN_PORT) -> str:
        """``NAME=IP:PORT`` for another node's ``--peer``."""
        return f"{self.name}={self.ip}:{port}"

    def stop_processes(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM what we started here, SIGKILL what is still alive after ``grace`` seconds, reap all."""
        running = [p for p in self.processes if p.poll() is None]
        for process in running:
            _signal(process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in running:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(process, signal.SIGKILL)
                process.wait()
        self.processes.clear()


def _signal(process: subprocess.Popen[Any], sig: int) -> None:
    try:
        process.send_signal(sig)
    except ProcessLookupError:
        pass


# --- the lab ---------------------------------------------------------------------------------------------


class NetLab:
    """A bridge namespace plus one namespace per host; a context manager that always tears down."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.octet = 0
        self.bridge_netns = ""
        self.hosts: dict[str, Host] = {}
        self._open = False

    @property
    def subnet(self) -> str:
        return f"{SUBNET_BASE}.{self.octet}.0/24"

    def __enter__(self) -> NetLab:
        self.start()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close(raise_errors=exc_type is None)

    def start(self) -> None:
        """Remove leftovers of dead labs, then create our bridge namespace and br0."""
        if self._open:
            raise NetLabError(f"this lab is already running as {self.bridge_netns}")
        cleanup_stale_labs()
        with _lock:  # two labs of this process must not pick the same octet
            self.octet = _pick_octet()
            self.bridge_netns = f"{PREFIX}{self.pid}-{self.octet}"
            ip("netns", "add", self.bridge_netns)
        self._open = True
        try:
            self._bridge("link", "add", "br0", "type", "bridge")
            # without this, multicast (mDNS) is not flooded: there is no IGMP querier on the segment
            self._bridge("link", "set", "br0", "type", "bridge", "mcast_snooping", "0")
            self._bridge("link", "set", "br0", "up")
        except BaseException:
            self.close(raise_errors=False)
            raise

    def _bridge(self, *args: str) -> str:
        return ip("-n", self.bridge_netns, *args)

    def add_host(self, name: str) -> Host:
        """A new host with eth0 = 10.77.X.N/24 (N = 1, 2, ... in order), lo up and a multicast route."""
        self._check_new_host(name)
        index = len(self.hosts) + 1
        host = Host(name, f"{self.bridge_netns}-{name}", f"{SUBNET_BASE}.{self.octet}.{index}", index, f"p{index}")
        ip("netns", "add", host.netns)
        self.hosts[name] = host
        self._wire(host)
        return host

    def _check_new_host(self, name: str) -> None:
        if not self._open:
            raise NetLabError("the lab is not started (use `with NetLab() as lab:`)")
        if not _NAME.match(name):
            raise NetLabError(f"host name {name!r}: use 1-31 of a-z, 0-9, '-', starting with a letter")
        if name in self.hosts:
            raise NetLabError(f"host {name!r} already exists in this lab")
        if len(self.hosts) >= MAX_HOSTS:
            raise NetLabError(f"a lab holds at most {MAX_HOSTS} hosts")

    def _wire(self, host: Host) -> None:
        """veth pair straight from the bridge namespace into the host's: the root namespace never sees it."""
        self._bridge("link", "add", host.bridge_port, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        self._bridge("link", "set", host.bridge_port, "master", "br0", "up")
        inside = ("-n", host.netns)
        ip(*inside, "link", "set", "lo", "up")
        ip(*inside, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        ip(*inside, "link", "set", "eth0", "multicast", "on", "up")
        # no default route in a lab host: zeroconf needs a route for multicast or Zeroconf() fails with ENODEV
        ip(*inside, "route", "add", "224.0.0.0/4", "dev", "eth0")

    def host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            raise NetLabError(f"no host {name!r} in this lab (hosts: {', '.join(self.hosts) or 'none'})") from None

    def _own(self, host: Host | str) -> Host:
        found = self.host(host if isinstance(host, str) else host.name)
        if isinstance(host, Host) and found is not host:
            raise NetLabError(f"host {host.name!r} belongs to another lab")
        return found

    def disconnect(self, host: Host | str) -> None:
        """Pull the host's cable: its bridge port goes down, its own addresses and routes stay."""
        target = self._own(host)
        self._bridge("link", "set", target.bridge_port, "down")
        target.connected = False

    def reconnect(self, host: Host | str) -> None:
        """Plug the cable back in and wait until the host sees carrier again."""
        target = self._own(host)
        self._bridge("link", "set", target.bridge_port, "up")
        wait_for(lambda: "LOWER_UP" in ip("-n", target.netns, "link", "show", "eth0"), 10,
                 f"carrier on {target.name}'s eth0")
        target.connected = True

    def close(self, raise_errors: bool = True) -> list[str]:
        """Stop every process, delete every namespace; collect failures so one cannot leak the rest.

        Returns the problems (empty when everything is gone); raises them instead if ``raise_errors``.
        """
        if not self._open:
            return []
        self._open = False
        errors: list[str] = []
        for host in self.hosts.values():
            _collect(errors, host.stop_processes)
        for netns in [h.netns for h in self.hosts.values()] + [self.bridge_netns]:
            _collect(errors, partial(delete_namespace, netns))
        left = [name for name in _collect(errors, list_namespaces) or []
                if name == self.bridge_netns or name.startswith(self.bridge_netns + "-")]
        if left:
            errors.append(f"namespaces still present: {', '.join(left)}")
        if errors and raise_errors:
            raise NetLabError("lab teardown failed: " + "; ".join(errors))
        if errors:
            print(f"netlab: teardown problems: {'; '.join(errors)}", file=sys.stderr)
        return errors


def _collect(errors: list[str], action: Callable[[], T]) -> T | None:
    try:
        return action()
    except Exception as exc:
        errors.append(str(exc))
        return None


# --- daemons inside hosts -------------------------------------------------------------------------------


@dataclass
class NamespacedDaemon(Daemon):
    """A real daemon inside ``host``'s namespace, on ``host.ip:7330`` with SOCKS on the host's own 127.0.0.1:1080.

    The CLI (``pq(..., home=...)``) reaches it from any namespace: the control socket is a unix socket
    *file* in the home, and filesystem sockets are not scoped to a network namespace.
    ``mdns=False`` passes ``--no-mdns``; ``mdns=True`` leaves discovery to the daemon's config.
    """

    host: Host = field(kw_only=True)
    mdns: bool = field(default=False, kw_only=True)
    listen_port: int = field(default=LISTEN_PORT, kw_only=True)
    socks: str | None = field(default=SOCKS_ADDRESS, kw_only=True)

    def command(self) -> list[str]:
        argv = [*CLI, "up", "--home", str(self.home), "--listen", f"{self.host.ip}:{self.listen_port}",
                "--socks", self.socks or "off"]
        if not self.mdns:
            argv.append("--no-mdns")
        return argv + self.extra

    def start(self) -> NamespacedDaemon:
        self.log_path = self.home / "daemon.log"
        with self.log_path.open("ab") as log:
            # `ip netns exec` execs the command: self.process.pid is the daemon itself, signals reach it
            self.process = self.host.popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        self.wait_ready()
        return self

    def pq(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """One CLI command against this daemon (run from the caller's namespace)."""
        return pq(*args, home=self.home, timeout=timeout)

    def session_peers(self) -> set[str]:
        return {s["peer"] for s in self.sessions()}

    def wait_sessions(self, peers: Iterable[str], timeout: float = 20.0) -> None:
        """Wait until this node holds a session with every one of ``peers``."""
        wanted = set(peers)
        wait_for(lambda: wanted <= self.session_peers(), timeout,
                 f"{self.host.name} to hold sessions with {', '.join(sorted(wanted))}")

    def wait_ping(self, peer: str, timeout: float = 30.0) -> str:
        """Ping ``peer`` until it answers (it may first have to be discovered); returns the ping line."""
        last_error = ""

        def attempt() -> str:
            nonlocal last_error
            result = self.pq("ping", peer, "--timeout", "5")
            last_error = result.stderr.strip()
            return result.stdout.strip() if result.returncode == 0 else ""

        try:
            return wait_for(attempt, timeout, f"{self.host.name} to ping {peer}", interval=0.5)
        except TimeoutError:
            raise TimeoutError(f"{self.host.name} could not ping {peer} within {timeout:.0f} s: {last_error}") from None

    def wait_session_down(self, peer: str, timeout: float = 30.0) -> None:
        wait_for(lambda: peer not in self.session_peers(), timeout, f"{self.host.name} to notice {peer} is gone")


def pin_each_other(identities: Mapping[str, tuple[Path, str]]) -> None:
    """Pinned trust both ways between every pair of nodes; ``identities`` maps name -> (home, fingerprint)."""
    for name, (home, _) in identities.items():
        for other, (_, fingerprint) in identities.items():
            if other != name:
                result = pq("trust", other, fingerprint, home=home)
                if result.returncode != 0:
                    raise NetLabError(f"pqtunnel trust {other} on {name} failed: {result.stderr.strip()}")


def static_peer_args(me: Host, hosts: Iterable[Host], port: int = LISTEN_PORT) -> list[str]:
    """``--peer NAME=IP:PORT`` for every other host."""
    args: list[str] = []
    for host in hosts:
        if host.name != me.name:
            args += ["--peer", host.peer_spec(port)]
    return args
