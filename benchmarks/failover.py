"""Failover of a node's replicas (docs/ha.md): how long a client waits when the serving replica
dies, and what the HA store costs in bulk throughput.

Run: ``.venv/bin/python benchmarks/failover.py [--quick] [--failovers N] [--json FILE]``.
Three tables, each with its baseline measured in the same run:

1. **failover**: three replicas of bob on a real 3-member etcd cluster, each behind a
   capturing relay (pqlab/relay.py); alice has all three addresses and offers SOCKS5. A
   client streams a large body through alice's SOCKS port, reading at a steady pace, and
   opens a new stream whenever one ends or stalls. N times: SIGKILL the replica serving
   the stream (found from the relays), then time from the kill to the first byte of a new
   stream (necessarily through another replica); restart the killed one. p50/p99/max, and
   how many failovers kept the session (same session id: resumed) rather than handshaking
   anew. Baseline: the time to the first byte of a new stream with no fault.
2. **bulk**: single-stream curl downloads through SOCKS (best and median of R runs) with one
   replica of bob and no HA (no ``[ha]``), the ``local`` store, and the ``etcd`` store;
   alice dials the replica directly (no relay). The three run side by side and are
   measured in turn, run after run. Baseline: no HA.
3. **reservations**: compare-and-swap reservations per second (benchmarks/leases.py), local
   SQLite vs the etcd cluster, one reserver each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from addresses import http_url_for  # noqa: E402
from cpu import ForeignCpu, report_idle_cpu  # noqa: E402
from httpserver import bulk_http_server  # noqa: E402
from leases import measure as measure_reservations  # noqa: E402
from load import bulk_throughput, percentile  # noqa: E402
from payload import MIB  # noqa: E402
from report import Row, print_table  # noqa: E402
from socksclient import http_request, socks5_connect  # noqa: E402

from pqlab.etcd import EtcdCluster  # noqa: E402
from pqlab.leaseworker import lab_codec  # noqa: E402
from pqlab.replicas import Replica, ReplicaLab  # noqa: E402
from pqtunneld.etcd import EtcdGateway  # noqa: E402
from pqtunneld.noncestore import EtcdNonceStore, SqliteNonceStore  # noqa: E402

HOST = "web.bob.pq"
ALICE_CONFIG = "[timers]\nkeepalive = 1\ndead_after = 3\n"
STALL_S = 5.0
"""A stream that delivers nothing for this long is abandoned and replaced (as a client would)."""
PACE_S = 0.002
"""Pause after each read: the streaming client takes ~30 MB/s at most, leaving CPU to the tunnel."""
FAILOVER_TIMEOUT_S = 30.0


class BenchmarkError(RuntimeError):
    """The benchmark could not measure what it claims (no serving replica, no recovery)."""


@dataclass
class StreamLog:
    started: float
    first_byte: float | None = None
    ended: float | None = None
    received: int = 0
    error: str = ""


@dataclass
class Streamer:
    """A client that keeps one stream through alice's SOCKS port busy, replacing it when it ends."""

    socks_port: int
    body_size: int
    streams: list[StreamLog] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            log = StreamLog(time.monotonic())
            self.streams.append(log)
            try:
                self._stream(log)
            except OSError as exc:
                log.error = str(exc) or type(exc).__name__
                time.sleep(0.01)
            finally:
                log.ended = time.monotonic()

    def _stream(self, log: StreamLog) -> None:
        with socks5_connect(self.socks_port, HOST, 80, timeout=STALL_S) as sock:
            sock.settimeout(STALL_S)
            sock.sendall(http_request(HOST, 80, "/bulk"))
            while not self.stop.is_set():
                chunk = sock.recv(64 * 1024)
                if not chunk:
                    if log.received < self.body_size:  # headers included: a whole response is longer
                        log.error = f"cut after {log.received} bytes"
                    return
                log.first_byte = log.first_byte or time.monotonic()
                log.received += len(chunk)
                time.sleep(PACE_S)

    def flowing(self, within: float = 0.3) -> bool:
        """A stream is open and received bytes in the last ``within`` seconds."""
        current = self.streams[-1] if self.streams else None
        return current is not None and current.ended is None and current.first_byte is not None \
            and time.monotonic() - current.first_byte > within

    def first_byte_after(self, moment: float) -> float | None:
        """First-byte time of the earliest stream opened after ``moment``."""
        times = [s.first_byte for s in list(self.streams) if s.started >= moment and s.first_byte is not None]
        return min(times) if times else None


@contextmanager
def streaming(socks_port: int, body_size: int) -> Iterator[Streamer]:
    streamer = Streamer(socks_port, body_size)
    thread = threading.Thread(target=streamer.run, daemon=True, name="streamer")
    thread.start()
    try:
        yield streamer
    finally:
        streamer.stop.set()
        thread.join(STALL_S + 5)


@dataclass
class Failover:
    victim: str
    seconds: float
    next_replica: str
    resumed: bool
    """alice still had the same session afterwards (a resume, not a new handshake)."""


def wait_until(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise BenchmarkError(f"{what} within {timeout:.0f} s")
        time.sleep(0.01)


def alice_session_ids(lab: ReplicaLab) -> set[str]:
    assert lab.alice is not None
    return {s["session_id"] for s in lab.alice.sessions() if s.get("peer") == "bob"}


def one_failover(lab: ReplicaLab, streamer: Streamer) -> Failover:
    wait_until(lambda: all(r.running for r in lab.members) and streamer.flowing(), 30, "no steady stream")
    victim: Replica | None = lab.serving()
    if victim is None:
        raise BenchmarkError("the stream flows but no relay carries it")
    before = alice_session_ids(lab)
    killed_at = time.monotonic()
    victim.kill()
    wait_until(lambda: streamer.first_byte_after(killed_at) is not None, FAILOVER_TIMEOUT_S,
               f"no byte through another replica after killing {victim.name}")
    first_byte = streamer.first_byte_after(killed_at)
    assert first_byte is not None
    now_serving = lab.serving()
    resumed = bool(before) and alice_session_ids(lab) == before
    victim.start()
    return Failover(victim.name, first_byte - killed_at, now_serving.name if now_serving else "?", resumed)


def new_stream_baseline(streamer: Streamer, samples: int) -> list[float]:
    """Time to the first byte of a fresh stream with no fault (opened next to the running one)."""
    times = []
    for _ in range(samples):
        started = time.monotonic()
        with socks5_connect(streamer.socks_port, HOST, 80, timeout=STALL_S) as sock:
            sock.sendall(http_request(HOST, 80, "/1"))
            if not sock.recv(1):
                raise BenchmarkError("a fresh stream closed without a byte")
        times.append(time.monotonic() - started)
        time.sleep(0.05)
    return times


def latency_row(name: str, seconds: list[float], note: str) -> Row:
    ms = sorted(s * 1000 for s in seconds)
    return Row(name, {"p50 ms": statistics.median(ms), "p99 ms": percentile(ms, 99), "max ms": ms[-1]}, note)


def measure_failovers(root: Path, cluster: EtcdCluster, web_port: int, body_size: int,
                      count: int) -> tuple[list[Row], dict]:
    with ReplicaLab(root, web_ports=[web_port], store="etcd", etcd=cluster.endpoints,
                    alice_config=ALICE_CONFIG) as lab, streaming(lab.socks_port, body_size) as streamer:
        wait_until(streamer.flowing, 30, "no stream through the replicas")
        baseline = new_stream_baseline(streamer, 20)
        failovers = []
        for index in range(count):
            failovers.append(one_failover(lab, streamer))
            print(f"  failover {index + 1}/{count}: {failovers[-1].victim} killed -> first byte through "
                  f"{failovers[-1].next_replica} after {failovers[-1].seconds * 1000:.0f} ms"
                  f"{' (resumed)' if failovers[-1].resumed else ' (new handshake)'}", flush=True)
        cut = sum(1 for s in streamer.streams if s.error)
    resumed = sum(f.resumed for f in failovers)
    rows = [latency_row("new stream, no fault (baseline)", baseline, "time to the first byte of /1, 20 streams"),
            latency_row("SIGKILL serving replica -> first byte", [f.seconds for f in failovers],
                        f"{count} failovers, {resumed} resumed the session, {count - resumed} handshook anew; "
                        f"{cut} streams cut or failed (the ones on a killed replica end)")]
    return rows, {"baseline_s": baseline, "failovers": [asdict(f) for f in failovers]}


BULK_CONFIGS = (("none", "no HA (no [ha])"), ("local", "[ha] store = local"), ("etcd", "[ha] store = etcd"))


def measure_bulk(root: Path, cluster: EtcdCluster, web_port: int, size: int, runs: int) -> tuple[list[Row], dict]:
    """The three configurations run side by side and are measured in turn, run after run, so a
    change in the machine's load hits them alike."""
    rates: dict[str, list[float]] = {store: [] for store, _ in BULK_CONFIGS}
    with ExitStack() as stack:
        labs = {}
        for store, _ in BULK_CONFIGS:
            home = root / f"bulk-{store}"
            home.mkdir()
            labs[store] = stack.enter_context(ReplicaLab(home, web_ports=[web_port], replicas=1, store=store,
                                                         etcd=cluster.endpoints, relays=False))
        for _ in range(runs):
            for store, lab in labs.items():
                result = bulk_throughput(lab.socks_port, http_url_for(f"http://{HOST}"), runs=1, expected_size=size)
                rates[store] += result.runs_mb_s
    rows = [Row(name, {"best MB/s": max(rates[store]), "median MB/s": statistics.median(rates[store])},
                note="runs: " + ", ".join(f"{r:.0f}" for r in rates[store])) for store, name in BULK_CONFIGS]
    return rows, rates


async def reservations(root: Path, endpoints: list[str], seconds: float) -> list[Row]:
    codec = lab_codec("bench-failover")
    return [await measure_reservations("local, 1 reserver", [SqliteNonceStore(root / "nonces.sqlite", codec)], seconds),
            await measure_reservations("etcd 3 members, 1 reserver",
                                       [EtcdNonceStore(EtcdGateway(tuple(endpoints)), codec)], seconds)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 failovers, 128 MiB x 2 bulk, 1 s reservations")
    parser.add_argument("--failovers", type=int, help="number of failovers (default 20, --quick 5)")
    parser.add_argument("--json", type=Path, help="write every raw sample to this file")
    args = parser.parse_args()
    count = args.failovers or (5 if args.quick else 20)
    size, runs, seconds = (128 * MIB, 2, 1.0) if args.quick else (512 * MIB, 5, 3.0)
    raw: dict = {}
    report_idle_cpu()
    foreign = ForeignCpu()
    with tempfile.TemporaryDirectory(prefix="pqbench-failover-") as directory, EtcdCluster() as cluster, \
            bulk_http_server(size) as web:
        root = Path(directory)
        print(f"failover: {count} x SIGKILL of the serving replica (3 replicas, etcd store)", flush=True)
        (root / "failover").mkdir()
        failover_rows, raw["failover"] = measure_failovers(root / "failover", cluster, web.port, size, count)
        print(f"bulk: {size // MIB} MiB, best of {runs}", flush=True)
        bulk_rows, raw["bulk_mb_s"] = measure_bulk(root, cluster, web.port, size, runs)
        reservation_rows = trio.run(reservations, root, cluster.endpoints, seconds)
    other_cpu = foreign.fraction()  # every process of the benchmark is reaped by now
    print()
    print_table(failover_rows, failover_rows[0].name)
    print()
    print_table(bulk_rows, bulk_rows[0].name)
    print()
    print(f"reservations, {seconds:g} s per row")
    print_table(reservation_rows, reservation_rows[0].name)
    print(f"\nother processes used {other_cpu:.0%} of the machine's CPU during the run")
    raw["other_cpu"] = other_cpu
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
