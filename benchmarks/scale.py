#!/usr/bin/env python3
"""Scale benchmark: N sessions from many source addresses to one node.

Run: ``python3 benchmarks/scale.py [--sessions N] [--quick] [--json out.json]``.

One real daemon (bob, default configuration, the benchmark HTTP server exposed as service
``web``) and one load process holding N client sessions. Each client is its own pinned
identity and does a real full hybrid handshake over TCP with the library's sans-IO
``Tunnel`` (the same code a daemon runs), from one of 200 loopback source addresses
(127.0.1.1-200), so the node's per-address budgets see many peers, as from many hosts.
A client answers the node's keepalives and rekeys like a daemon would, but costs
kilobytes instead of a whole daemon, so 500 of them fit beside the node on a small box.

Figures:

* handshake rate: the node rations handshakes (``pqtunnel.admission``: a burst of 40, then
  ``node_per_s`` = 20 a second, library defaults), so the figures come in two parts. First
  the handshakes the burst admits without a cookie (20): the node's CPU time per handshake
  (``/proc/PID/task/*/schedstat``, accept and session setup included), whose inverse is
  what one core could sustain (goal >= 400 handshakes/s per core). Then all N sessions,
  W handshakes in flight: the rate the node sustains, and how many attempts it turned
  away (ALERT busy; the client dials again after a back-off, as a daemon does);
* memory per idle session: bob's RSS with N idle sessions minus his RSS before the first
  one, divided by N: the goal is <= 100 KiB;
* new-stream latency at load: with all N sessions held, a stream opened over a live
  session (round robin over the sessions) to ``web``, ``GET /1``, timed to the last body
  byte (p50/p99/max). Unlike streams.py there is no SOCKS hop and no second daemon.

With ``--profile``, py-spy samples the node while it handshakes (all N, attempts turned
away included) and while it serves the new streams, and the top functions are printed
(``profiling.py``).

Linux only (``/proc``); needs the project's dependencies, not root (``--profile``: py-spy,
and the right to trace the node, which root has).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import trio  # noqa: E402

from cpu import ForeignCpu  # noqa: E402
from httpserver import bulk_http_server  # noqa: E402
from processes import stop_daemons  # noqa: E402
from profiling import ProfilerMissing, format_profiles, py_spy_path, sampling  # noqa: E402
from pqlab.process import Daemon, init_node  # noqa: E402
from pqtunnel.admission import AdmissionLimits  # noqa: E402
from pqtunnel.errors import PqtunnelError, UntrustedPeerError  # noqa: E402
from pqtunnel.handshake import HandshakeConfig, InitiatorHandshake  # noqa: E402
from pqtunnel.identity import Identity, WireIdentity  # noqa: E402
from pqtunnel.tunnel import DataReceived, Established, StreamAccepted, StreamRefused, StreamReset, Tunnel  # noqa: E402
from pqtunneld.cpufeatures import hardware_aeads  # noqa: E402
from pqtunneld.stores import KnownPeersFile  # noqa: E402
from report import print_other_cpu, write_dated_json  # noqa: E402
from streams import source_digest  # noqa: E402

SOURCES = [f"127.0.1.{i}" for i in range(1, 201)]
GOAL_HANDSHAKES_PER_CORE = 400.0
GOAL_KIB_PER_SESSION = 100.0
GOAL_P99_MS = 2.0  # streams.py's new-stream goal, for reference
HANDSHAKE_TIMEOUT_S = 20.0
IDLE_SETTLE_S = 3.0
REQUEST = b"GET /1 HTTP/1.1\r\nHost: web\r\n\r\n"
CONTENT_LENGTH = re.compile(rb"content-length:\s*(\d+)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Config:
    sessions: int
    in_flight: int
    latency_samples: int


FULL = Config(sessions=500, in_flight=16, latency_samples=500)
QUICK = Config(sessions=50, in_flight=8, latency_samples=100)


def now_ms() -> int:
    return int(time.monotonic() * 1000)


def wall_ms() -> int:
    return int(time.time() * 1000)


# --------------------------------------------------------------------------
# /proc readings of the node
# --------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_s(pid: int) -> float:
    """CPU seconds of ``pid``'s live threads, to the nanosecond (``schedstat``; ``stat`` counts
    10 ms ticks, too coarse for a few handshakes)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


# --------------------------------------------------------------------------
# Client sessions
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Probe:
    """One new stream being timed: accepted, then the response read to its last byte."""

    accepted: trio.Event = dataclasses.field(default_factory=trio.Event)
    done: trio.Event = dataclasses.field(default_factory=trio.Event)
    response: bytearray = dataclasses.field(default_factory=bytearray)
    error: str = ""

    def complete(self) -> bool:
        head, sep, body = bytes(self.response).partition(b"\r\n\r\n")
        match = CONTENT_LENGTH.search(head)
        return bool(sep and match and len(body) >= int(match.group(1)))


class ClientSession:
    """One established session held by the load process: it reads, answers and flushes."""

    def __init__(self, stream: trio.SocketStream, tunnel: Tunnel) -> None:
        self.stream = stream
        self.tunnel = tunnel
        self.probes: dict[int, Probe] = {}
        self._send_lock = trio.Lock()

    async def flush(self) -> None:
        """Send whatever the tunnel queued (pongs, rekey answers, stream frames)."""
        async with self._send_lock:
            buffers = self.tunnel.buffers_to_send()
            if buffers:
                await self.stream.send_all(b"".join(buffers))

    async def serve(self) -> None:
        """Read until the connection ends; route stream events to the probes waiting for them."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, PqtunnelError, OSError):
            while data := await self.stream.receive_some(1 << 18):
                for event in self.tunnel.receive_data(data, now_ms(), wall_ms()):
                    self._route(event)
                await self.flush()

    def _route(self, event: object) -> None:
        probe = self.probes.get(getattr(event, "stream_id", -1))
        if probe is None:
            return
        if isinstance(event, StreamAccepted):
            probe.accepted.set()
        elif isinstance(event, DataReceived):
            probe.response += event.data
            self.tunnel.consumed(event.stream_id, len(event.data))
            if probe.complete():
                probe.done.set()
        elif isinstance(event, (StreamRefused, StreamReset)):
            probe.error = type(event).__name__
            probe.accepted.set()
            probe.done.set()

    async def new_stream_ms(self) -> float:
        """Open a stream to ``web``, GET /1, wait for the last byte; milliseconds."""
        t0 = time.perf_counter()
        stream_id = self.tunnel.open_stream({"service": "web"})
        probe = self.probes[stream_id] = Probe()
        await self.flush()
        await probe.accepted.wait()
        if not probe.error:
            self.tunnel.send_data(stream_id, REQUEST)
            await self.flush()
            await probe.done.wait()
        elapsed = (time.perf_counter() - t0) * 1000
        del self.probes[stream_id]
        if probe.error:
            raise RuntimeError(f"stream to web failed: {probe.error}")
        self.tunnel.reset_stream(stream_id)
        await self.flush()
        return elapsed


@dataclasses.dataclass
class HandshakeStats:
    latencies_ms: list[float] = dataclasses.field(default_factory=list)
    refused: int = 0
    """Attempts the node turned away (ALERT busy, closed at accept) before one succeeded."""


def pinned(fingerprint: str):  # type: ignore[no-untyped-def]
    """The client's authorizer: only the node's own identity, named bob."""
    def authorize(peer: WireIdentity) -> str:
        if peer.fingerprint != fingerprint:
            raise UntrustedPeerError(f"expected {fingerprint}, got {peer.fingerprint}")
        return "bob"
    return authorize


async def handshake(identity: Identity, source: str, port: int, node_fp: str) -> ClientSession:
    """One full handshake from ``source``; raises on refusal (the caller retries)."""
    sock = trio.socket.socket()
    try:
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    stream = trio.SocketStream(sock)
    try:
        config = HandshakeConfig(aeads=hardware_aeads())  # what a daemon on this machine offers
        tunnel = Tunnel(InitiatorHandshake(identity, pinned(node_fp), config=config), now_ms=now_ms())
        tunnel.start(now_ms(), wall_ms())
        await stream.send_all(b"".join(tunnel.buffers_to_send()))
        while True:
            data = await stream.receive_some(1 << 16)
            if not data:
                raise ConnectionError("the node closed the connection during the handshake")
            events = tunnel.receive_data(data, now_ms(), wall_ms())
            buffers = tunnel.buffers_to_send()
            if buffers:
                await stream.send_all(b"".join(buffers))
            if any(isinstance(e, Established) for e in events):
                return ClientSession(stream, tunnel)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


async def establish_all(identities: list[Identity], port: int, node_fp: str, in_flight: int,
                        nursery: trio.Nursery) -> tuple[list[ClientSession], HandshakeStats]:
    """Every identity gets a session, ``in_flight`` handshakes at a time, retried when refused."""
    sessions: list[ClientSession] = []
    stats = HandshakeStats()
    queue = iter(enumerate(identities))

    async def worker() -> None:
        for index, identity in queue:
            backoff = 0.02
            while True:
                t0 = time.perf_counter()
                try:
                    with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                        session = await handshake(identity, SOURCES[index % len(SOURCES)], port, node_fp)
                except (PqtunnelError, OSError, trio.BrokenResourceError, ConnectionError):
                    stats.refused += 1
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
                    continue
                stats.latencies_ms.append((time.perf_counter() - t0) * 1000)
                sessions.append(session)
                nursery.start_soon(session.serve)
                break

    async with trio.open_nursery() as workers:
        for _ in range(in_flight):
            workers.start_soon(worker)
    return sessions, stats


async def stream_latencies(sessions: list[ClientSession], samples: int) -> list[float]:
    """New-stream latency, one stream at a time, round robin over every session."""
    for session in sessions[:5]:  # warm-up: the node's first connections to web
        await session.new_stream_ms()
    return [await sessions[i % len(sessions)].new_stream_ms() for i in range(samples)]


async def close_all(sessions: list[ClientSession]) -> None:
    for session in sessions:
        with contextlib.suppress(Exception):
            session.tunnel.close("benchmark done")
            await session.flush()
        await trio.aclose_forcefully(session.stream)


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    sessions: int
    held_by_node: int
    burst_handshakes: int
    burst_handshakes_per_s: float
    handshake_wall_s: float
    handshakes_per_s: float
    node_cpu_ms_per_handshake: float
    handshakes_per_core_s: float
    handshake_p50_ms: float
    handshake_p99_ms: float
    refused_attempts: int
    rss_before_kib: int
    rss_idle_kib: int
    kib_per_session: float
    stream_p50_ms: float
    stream_p99_ms: float
    stream_max_ms: float
    aead: str
    suite: str


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextlib.contextmanager
def node(root: Path, identities: list[Identity], http_port: int) -> Iterator[tuple[Daemon, str]]:
    """bob, every client pinned, ``web`` = the HTTP server; killed and reaped on exit."""
    home, fingerprint = init_node(root, "bob")
    pins = KnownPeersFile(home)
    for identity in identities:
        pins.add(identity.name, identity.fingerprint)
    (home / "config.toml").write_text(f'[services]\nweb = "127.0.0.1:{http_port}"\n')
    daemon = Daemon(home)  # inherits our raised descriptor limit
    try:
        daemon.start()
        yield daemon, fingerprint
    finally:
        stop_daemons([daemon])


async def measure(cfg: Config, bob: Daemon, fingerprint: str, identities: list[Identity], profile: bool) -> Result:
    pid = bob.process.pid if bob.process else 0
    targets = [("bob", pid)] if profile else []
    port = bob.port
    await trio.sleep(1.0)
    rss_before = rss_kib(pid)
    limits = AdmissionLimits()
    burst = min(len(identities), int(limits.cookie_below * limits.node_burst))  # admitted without a cookie
    async with trio.open_nursery() as nursery:
        with sampling(targets) as handshake_profile:
            cpu0, t0 = cpu_s(pid), time.perf_counter()
            sessions, stats = await establish_all(identities[:burst], port, fingerprint, cfg.in_flight, nursery)
            burst_wall, cpu = time.perf_counter() - t0, cpu_s(pid) - cpu0
            print(f"   {burst} sessions in {burst_wall:.2f} s within the admission burst, node CPU {cpu * 1000:.0f} "
                  f"ms, {stats.refused} attempts turned away", flush=True)
            rest, rest_stats = await establish_all(identities[burst:], port, fingerprint, cfg.in_flight, nursery)
            wall = time.perf_counter() - t0
        if profile:
            print(format_profiles(f"{len(identities)} handshakes (attempts turned away included)",
                                  handshake_profile), flush=True)
        sessions += rest
        stats.latencies_ms += rest_stats.latencies_ms
        stats.refused += rest_stats.refused
        print(f"   {len(sessions)} sessions in {wall:.1f} s ({stats.refused} attempts turned away and retried)",
              flush=True)
        await trio.sleep(IDLE_SETTLE_S)
        rss_idle = rss_kib(pid)
        held = await trio.to_thread.run_sync(lambda: bob.status()["sessions"])
        print(f"   node holds {held} sessions, RSS {rss_before / 1024:.1f} -> {rss_idle / 1024:.1f} MiB", flush=True)
        with sampling(targets) as stream_profile:
            latencies = await stream_latencies(sessions, cfg.latency_samples)
        if profile:
            print(format_profiles(f"{cfg.latency_samples} new streams", stream_profile), flush=True)
        result = sessions[0].tunnel.result
        await close_all(sessions)
        nursery.cancel_scope.cancel()
    n = len(sessions)
    return Result(
        sessions=n, held_by_node=held, burst_handshakes=burst, burst_handshakes_per_s=burst / burst_wall,
        handshake_wall_s=wall, handshakes_per_s=n / wall,
        node_cpu_ms_per_handshake=1000 * cpu / burst, handshakes_per_core_s=burst / cpu if cpu else float("inf"),
        handshake_p50_ms=statistics.median(stats.latencies_ms), handshake_p99_ms=percentile(stats.latencies_ms, 0.99),
        refused_attempts=stats.refused, rss_before_kib=rss_before, rss_idle_kib=rss_idle,
        kib_per_session=(rss_idle - rss_before) / n, stream_p50_ms=statistics.median(latencies),
        stream_p99_ms=percentile(latencies, 0.99), stream_max_ms=max(latencies),
        aead=result.aead.label if result else "?", suite=result.suite.name if result else "?",
    )


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def print_table(r: Result, cfg: Config) -> None:
    rows = [
        ("sessions established / held by the node", f"{r.sessions} / {r.held_by_node}", "", ""),
        (f"first {r.burst_handshakes} handshakes (admission burst): per second, wall",
         f"{r.burst_handshakes_per_s:.0f}", "", ""),
        ("  node CPU per handshake, ms", f"{r.node_cpu_ms_per_handshake:.2f}", "", ""),
        ("  handshakes per second per core (1 / CPU)", f"{r.handshakes_per_core_s:.0f}",
         f">= {GOAL_HANDSHAKES_PER_CORE:.0f}", verdict(r.handshakes_per_core_s >= GOAL_HANDSHAKES_PER_CORE)),
        (f"all {r.sessions}: handshakes per second the node sustained", f"{r.handshakes_per_s:.1f}", "", ""),
        ("  attempts turned away (BUSY) and retried", f"{r.refused_attempts}", "", ""),
        ("  handshake latency p50 / p99 ms (retries included)",
         f"{r.handshake_p50_ms:.1f} / {r.handshake_p99_ms:.1f}", "", ""),
        ("node RSS before / with N idle sessions, MiB",
         f"{r.rss_before_kib / 1024:.1f} / {r.rss_idle_kib / 1024:.1f}", "", ""),
        ("memory per idle session, KiB", f"{r.kib_per_session:.1f}",
         f"<= {GOAL_KIB_PER_SESSION:.0f}", verdict(r.kib_per_session <= GOAL_KIB_PER_SESSION)),
        (f"new stream p50 / p99 / max ms, {r.sessions} sessions held",
         f"{r.stream_p50_ms:.2f} / {r.stream_p99_ms:.2f} / {r.stream_max_ms:.2f}",
         f"p99 <= {GOAL_P99_MS:g}", verdict(r.stream_p99_ms <= GOAL_P99_MS)),
    ]
    width = max(len(row[0]) for row in rows)
    print(f"\n{'figure':<{width}}  {'value':>22}  {'goal':>8}  verdict")
    print(f"{'-' * width}  {'-' * 22}  {'-' * 8}  -------")
    for name, value, goal, ok in rows:
        print(f"{name:<{width}}  {value:>22}  {goal:>8}  {ok}")
    print(f"suite {r.suite}, AEAD {r.aead}; {cfg.in_flight} handshakes in flight from {len(SOURCES)} source "
          f"addresses; {cfg.latency_samples} new-stream samples")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"{QUICK.sessions} sessions, a bounded smoke run")
    ap.add_argument("--sessions", type=int, help=f"number of client sessions (default {FULL.sessions})")
    ap.add_argument("--json", type=Path, help="also write the result to this JSON file")
    ap.add_argument("--profile", action="store_true",
                    help="sample the node with py-spy while it handshakes and while it serves the new streams")
    args = ap.parse_args()
    if args.profile:
        try:
            py_spy_path()
        except ProfilerMissing as exc:
            print(exc, file=sys.stderr)
            return 2
    cfg = QUICK if args.quick else FULL
    if args.sessions is not None:
        if args.sessions < 1:
            print("scale.py: --sessions must be at least 1", file=sys.stderr)
            return 2
        cfg = dataclasses.replace(cfg, sessions=args.sessions)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = cfg.sessions + 256
    if hard != resource.RLIM_INFINITY and hard < need:
        print(f"scale.py: {cfg.sessions} sessions need {need} descriptors, the hard limit is {hard}", file=sys.stderr)
        return 2
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    print(f"host: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}\n"
          f"pqtunnel sources (daemon/, pqtunnel/) sha256 {source_digest()}\n"
          f"config: {dataclasses.asdict(cfg)}", flush=True)
    identities = [Identity.generate(f"client{i}") for i in range(cfg.sessions)]
    foreign = ForeignCpu()
    with tempfile.TemporaryDirectory(prefix="pqbench-scale-") as tmp, bulk_http_server(1 << 20) as srv, \
            node(Path(tmp), identities, srv.port) as (bob, fingerprint):
        result = trio.run(measure, cfg, bob, fingerprint, identities, args.profile)
    other = foreign.fraction()
    print_table(result, cfg)
    print_other_cpu(other)
    if args.json:
        write_dated_json(args.json, {
            "source_sha256_16": source_digest(), "config": dataclasses.asdict(cfg),
            "result": dataclasses.asdict(result), "other_cpu_fraction": other,
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
