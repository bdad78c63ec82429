"""Interop with avahi, an independent mDNS/DNS-SD implementation.

avahi-daemon runs in a private network namespace (only ``lo``, multicast on), with its own
D-Bus system bus on a socket in a temp dir and a tmpfs over /run (``unshare -m``), so
neither the host's network nor its avahi/D-Bus are touched. Our node runs in the same
namespace as a subprocess (``ip netns exec``) and reports its events as JSON lines.

Checks both directions: ``avahi-browse -rtp`` resolves our advertisement (name, fp, v
in the TXT) and sees our goodbye; our discovery reads a service that ``avahi-publish``
announces and sees it leave. Needs root, iproute2, util-linux and the Debian packages
avahi-daemon, avahi-utils and dbus; skipped only when avahi-browse is missing.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

REPO = Path(__file__).resolve().parents[2]
NETNS_PREFIX = "pqtavahi-"
STARTUP_TIMEOUT = 20.0
MDNS_TIMEOUT = 25.0

pytestmark = pytest.mark.skipif(shutil.which("avahi-browse") is None,
                                reason="avahi-browse not installed (Debian packages: avahi-daemon avahi-utils dbus)")

DBUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_type="method_return"/>
    <allow send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="signal"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
  </policy>
</busconfig>
"""

AVAHI_CONFIG = """[server]
use-ipv4=yes
use-ipv6=no
allow-interfaces=lo
enable-dbus=yes
disallow-other-stacks=no
[wide-area]
enable-wide-area=no
[publish]
publish-addresses=yes
publish-hinfo=no
publish-workstation=no
publish-domain=no
[reflector]
[rlimits]
"""

# Our node inside the namespace: advertise, print every PeerEvent as a JSON line, stop on stdin EOF.
NODE_SCRIPT = r"""
import json, sys, trio
from pqtunnel.discovery import PeerLeft
from pqtunneld.mdns import MdnsDiscovery

async def report(receive):
    async for event in receive:
        peer = event.peer
        print(json.dumps({"event": type(event).__name__, "name": peer.name, "fp": peer.fingerprint,
                          "port": peer.port, "addresses": list(peer.addresses),
                          "reason": event.reason.value if isinstance(event, PeerLeft) else None}), flush=True)

async def main(name, fp, port):
    node = MdnsDiscovery(name, fp, int(port), interfaces=["127.0.0.1"])
    send, receive = trio.open_memory_channel(100)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(report, receive)
        await nursery.start(node.run, send)
        print(json.dumps({"event": "started", "instance": node.instance_name}), flush=True)
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
        nursery.cancel_scope.cancel()

trio.run(main, *sys.argv[1:4])
"""


def random_fingerprint() -> str:
    return "pq1:" + base64.b32encode(os.urandom(20)).decode().lower()


def _require_tools() -> None:
    missing = [tool for tool in ("avahi-daemon", "avahi-publish", "dbus-daemon", "ip", "unshare")
               if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"avahi interop needs {', '.join(missing)} "
                    "(Debian packages: avahi-daemon avahi-utils dbus iproute2 util-linux)")
    if os.geteuid() != 0:
        pytest.fail("avahi interop needs root (ip netns, mount in a private mount namespace)")


def _run(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")


def _remove_stale_namespaces() -> None:
    """Namespaces left by an interrupted earlier run (their owner pid is gone)."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    for name in re.findall(rf"^({NETNS_PREFIX}(\d+)-[0-9a-f]+)", listing, re.MULTILINE):
        if not Path(f"/proc/{name[1]}").exists():
            subprocess.run(["ip", "netns", "delete", name[0]], check=False)


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = STARTUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def _stop(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class AvahiLab:
    netns: str
    env: dict[str, str]
    avahi_log: Path

    def in_netns(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]


@pytest.fixture(scope="module")
def avahi_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AvahiLab]:
    _require_tools()
    _remove_stale_namespaces()
    tmp = tmp_path_factory.mktemp("avahi")
    bus_socket = tmp / "system_bus_socket"
    (tmp / "dbus.conf").write_text(DBUS_CONFIG.format(socket=bus_socket))
    (tmp / "avahi-daemon.conf").write_text(AVAHI_CONFIG)
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={bus_socket}", "PYTHONPATH": str(REPO)}
    lab = AvahiLab(netns=f"{NETNS_PREFIX}{os.getpid()}-{secrets.token_hex(3)}", env=env,
                   avahi_log=tmp / "avahi.log")
    processes: list[subprocess.Popen[Any]] = []
    _run("ip", "netns", "add", lab.netns)
    with open(tmp / "dbus.log", "w") as dbus_log, open(lab.avahi_log, "w") as avahi_log:
        try:
            for step in (["ip", "link", "set", "lo", "up"], ["ip", "link", "set", "lo", "multicast", "on"],
                         ["ip", "route", "add", "224.0.0.0/4", "dev", "lo"]):
                _run(*lab.in_netns(*step))
            processes.append(subprocess.Popen(["dbus-daemon", f"--config-file={tmp / 'dbus.conf'}", "--nofork"],
                                              stdout=subprocess.DEVNULL, stderr=dbus_log))
            _wait_until(bus_socket.exists, "the private D-Bus socket")
            # tmpfs on /run in a private mount namespace: avahi's pid file cannot clash with the host's
            avahi = ("mount -t tmpfs tmpfs /run && exec avahi-daemon --no-drop-root --no-chroot --no-rlimits "
                     f"--no-proc-title -f {tmp / 'avahi-daemon.conf'}")
            processes.append(subprocess.Popen(lab.in_netns("unshare", "-m", "sh", "-c", avahi), env=env,
                                              stdout=subprocess.DEVNULL, stderr=avahi_log))
            _wait_for_avahi(lab, processes[-1])
            yield lab
        finally:
            for process in reversed(processes):
                _stop(process)
            subprocess.run(["ip", "netns", "delete", lab.netns], check=False)


def _wait_for_avahi(lab: AvahiLab, avahi: subprocess.Popen[Any]) -> None:
    _wait_until(lambda: "Server startup complete" in lab.avahi_log.read_text() or avahi.poll() is not None,
                "avahi-daemon to start")
    if avahi.poll() is not None:
        raise RuntimeError(f"avahi-daemon exited: {lab.avahi_log.read_text()[-2000:]}")


class JsonLines:
    """Reads JSON lines from a subprocess and waits for one that matches."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""
        self.seen: list[dict[str, Any]] = []

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = MDNS_TIMEOUT) -> dict:
        with trio.fail_after(timeout):
            for item in self.seen:
                if predicate(item):
                    return item
            while True:
                while b"\n" not in self._buffer:
                    chunk = await self._stream.receive_some()
                    if not chunk:
                        raise AssertionError(f"node exited; it printed {self.seen}")
                    self._buffer += chunk
                line, self._buffer = self._buffer.split(b"\n", 1)
                item = json.loads(line)
                self.seen.append(item)
                if predicate(item):
                    return item


async def start_node(lab: AvahiLab, name: str, fp: str, port: int) -> tuple[trio.Process, JsonLines]:
    process = await trio.lowlevel.open_process(
        lab.in_netns(sys.executable, "-c", NODE_SCRIPT, name, fp, str(port)),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=lab.env, cwd=REPO)
    assert process.stdout is not None
    lines = JsonLines(process.stdout)
    await lines.wait_for(lambda item: item["event"] == "started")
    return process, lines


async def stop_node(process: trio.Process) -> None:
    """Close stdin: the node cancels itself and sends its goodbye."""
    assert process.stdin is not None
    await process.stdin.aclose()
    with trio.move_on_after(15):
        await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()
    assert process.returncode == 0


async def avahi_browse(lab: AvahiLab) -> list[list[str]]:
    """One ``avahi-browse -rtp`` run: the parsed ``=`` (resolved) lines."""
    result = await trio.run_process(["avahi-browse", "-rtp", "_pqtunnel._tcp"], env=lab.env,
                                    capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return [line.split(";") for line in result.stdout.decode().splitlines() if line.startswith("=;")]


async def wait_for_browse(lab: AvahiLab, condition: Callable[[list[list[str]]], bool]) -> list[list[str]]:
    with trio.fail_after(MDNS_TIMEOUT):
        while True:
            resolved = await avahi_browse(lab)
            if condition(resolved):
                return resolved


def txt_of(fields: list[str]) -> dict[str, str]:
    """TXT strings of an ``avahi-browse -p`` line: ``"k=v" "k2=v2"`` (ours need no escaping)."""
    return dict(item.split("=", 1) for item in re.findall(r'"([^"]*)"', ";".join(fields[9:])))


async def test_avahi_resolves_our_advertisement_and_sees_our_goodbye(avahi_lab: AvahiLab) -> None:
    name, fp = f"carol-{secrets.token_hex(3)}", random_fingerprint()
    process, _ = await start_node(avahi_lab, name, fp, 7301)
    try:
        resolved = await wait_for_browse(avahi_lab, lambda lines: any(f[3] == name for f in lines))
    finally:
        await stop_node(process)
    [fields] = [f for f in resolved if f[3] == name]
    # =;iface;protocol;instance;type;domain;host;address;port;txt
    assert fields[1:6] == ["lo", "IPv4", name, "_pqtunnel._tcp", "local"]
    assert fields[6] == f"pq1-{fp.removeprefix('pq1:')}.local"
    assert fields[7:9] == ["127.0.0.1", "7301"]
    assert txt_of(fields) == {"name": name, "fp": fp, "v": "1"}
    await wait_for_browse(avahi_lab, lambda lines: not any(f[3] == name for f in lines))


async def test_our_discovery_reads_an_avahi_advertisement(avahi_lab: AvahiLab) -> None:
    name, fp = f"dave-{secrets.token_hex(3)}", random_fingerprint()
    process, events = await start_node(avahi_lab, f"erin-{secrets.token_hex(3)}", random_fingerprint(), 7302)
    publisher = await trio.lowlevel.open_process(
        ["avahi-publish", "-s", name, "_pqtunnel._tcp", "7303", f"name={name}", f"fp={fp.upper()}", "v=1"],
        env=avahi_lab.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        appeared = await events.wait_for(lambda e: e["event"] == "PeerAppeared" and e["name"] == name)
        assert (appeared["fp"], appeared["port"]) == (fp, 7303)
        assert "127.0.0.1" in appeared["addresses"]  # avahi also publishes ::1 (AAAA) for lo
        publisher.terminate()  # avahi-publish withdraws its service (goodbye) on SIGTERM
        left = await events.wait_for(lambda e: e["event"] == "PeerLeft" and e["name"] == name)
        assert left["reason"] == "removed"
    finally:
        if publisher.returncode is None:
            publisher.kill()
        await publisher.wait()
        await stop_node(process)
