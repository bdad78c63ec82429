#!/usr/bin/env python3
"""Baseline: ``ssh -N -D`` (OpenSSH default hybrid kex) as a SOCKS5 tunnel.

Run as root: ``python3 benchmarks/ssh_baseline.py [--quick] [--json out.json]``.

Starts the benchmark HTTP server and a private sshd on 127.0.0.1 (isolated in
its own mount and PID namespaces), then for each cipher measures, through
``ssh -D``: bulk throughput (curl), new-stream latency (fresh SOCKS5
connection per request), N concurrent 1 MiB streams, and peak RSS of the ssh
client and sshd.  A direct (no proxy) row gives context.  ``--quick`` is a
smoke run (~10 s); the full run takes about 40 s on an idle 2-core machine.

pqtunnel rows go into the same table with the same code, e.g.::

    with bulk_http_server(cfg.bulk_size) as srv:   # bob exposes 127.0.0.1:srv.port
        results = [measure_row("direct (no proxy)", None, srv.url_for, cfg)]
        results += measure_ssh_rows(srv, cfg)
        results.append(measure_row("pqtunnel hybrid", alice_socks_port,
                                   http_url_for("http://web.bob.pq"), cfg,
                                   client_pids=[alice_pid], server_pids=[bob_pid]))
    print_table([r for r, _ in results], ssh_row_name(CIPHERS[0]), metric_names(cfg))
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

# Run as a script (python3 benchmarks/ssh_baseline.py): make the sibling modules importable.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from addresses import UrlFor
from cpu import ForeignCpu, PhaseCpu, phase_cpu, report_idle_cpu
from httpserver import HttpServer, bulk_http_server
from load import bulk_throughput, concurrent_streams, new_stream_latency
from payload import MIB
from processes import peak_rss_mb, process_tree
from report import Row, print_other_cpu, print_table
from sshtunnel import private_sshd, ssh_socks_proxy
from tools import ensure_tools

CIPHERS = (
    "chacha20-poly1305@openssh.com",
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes and repetitions; --quick shrinks them for a smoke run."""

    bulk_size: int
    bulk_runs: int
    latency_n: int
    latency_warmup: int
    streams: int
    stream_size: int
    concurrent_runs: int


FULL = Config(
    bulk_size=1 << 30,
    bulk_runs=5,
    latency_n=500,
    latency_warmup=20,
    streams=200,
    stream_size=MIB,
    concurrent_runs=5,
)
QUICK = Config(
    bulk_size=256 * MIB,
    bulk_runs=3,
    latency_n=200,
    latency_warmup=10,
    streams=100,
    stream_size=MIB,
    concurrent_runs=3,
)


GIB = 1 << 30
CPU_PER_GIB = "tunnel CPU-s/GiB"
CPU_PER_STREAM = "tunnel CPU-ms/stream"


def metric_names(cfg: Config) -> list[str]:
    """Column names, in table order; the concurrency column states its shape."""
    size = f"{cfg.stream_size // MIB}MiB" if cfg.stream_size % MIB == 0 else f"{cfg.stream_size}B"
    return [
        "bulk MB/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        f"{cfg.streams}x{size} 1st s",
        f"{cfg.streams}x{size} median s",
        "client RSS MB",
        "server RSS MB",
        CPU_PER_GIB,
        CPU_PER_STREAM,
    ]


@dataclasses.dataclass(frozen=True)
class TunnelCpu:
    """What bounds the tunnel: its CPU per GiB of bulk and per new stream, and how busy the machine was.

    Bulk on a 2-core box shared by curl, the HTTP server and both tunnel ends is
    CPU-bound, so the tunnel's own CPU per byte is the figure to compare.  The
    latency phase's CPU is divided by every stream it opened, warm-up included.
    Tunnel figures are None for a row without tunnel processes (direct).
    /proc counts CPU in clock ticks (10 ms at the usual 100 Hz), so a --quick
    latency phase that costs ssh ~60 ms in all is resolved to about +-15 %.
    """

    cpu_s_bulk: float | None
    cpu_s_latency: float | None
    cpu_s_per_gib: float | None
    cpu_ms_per_stream: float | None
    machine_busy_bulk: float
    machine_busy_latency: float

    @classmethod
    def from_phases(cls, bulk: PhaseCpu, latency: PhaseCpu, cfg: Config) -> TunnelCpu:
        """Normalise the two phases' CPU by the GiB and the streams they moved."""
        gib = cfg.bulk_runs * cfg.bulk_size / GIB
        streams = cfg.latency_n + cfg.latency_warmup
        return cls(
            cpu_s_bulk=bulk.tree_s,
            cpu_s_latency=latency.tree_s,
            cpu_s_per_gib=None if bulk.tree_s is None else bulk.tree_s / gib,
            cpu_ms_per_stream=None if latency.tree_s is None else 1000 * latency.tree_s / streams,
            machine_busy_bulk=bulk.machine_busy,
            machine_busy_latency=latency.machine_busy,
        )

    def summary(self) -> str:
        """One progress line: tunnel CPU per GiB and per stream, machine busy during bulk."""
        busy = f"machine {self.machine_busy_bulk:.0%} busy during bulk"
        if self.cpu_s_per_gib is None or self.cpu_ms_per_stream is None:
            return busy
        return f"tunnel {self.cpu_s_per_gib:.2f} CPU-s/GiB, {self.cpu_ms_per_stream:.2f} CPU-ms/stream; {busy}"


def measure_row(
    name: str,
    socks: int | None,
    url_for: UrlFor,
    cfg: Config,
    client_pids: list[int] | None = None,
    server_pids: list[int] | None = None,
    note: str = "",
) -> tuple[Row, dict[str, object]]:
    """Run bulk, latency and concurrency against one SOCKS endpoint (or direct).

    RSS is sampled for the whole measurement; client/server pids are roots
    whose descendants count too.  Their CPU is read around the bulk and the
    latency phases (``TunnelCpu``).  Returns the table row and a detail dict
    for JSON output.
    """
    client_pids = client_pids or []
    server_pids = server_pids or []
    tunnel_pids = client_pids + server_pids
    print(f"== {name}", flush=True)
    with peak_rss_mb(tunnel_pids) as rss:
        with phase_cpu(tunnel_pids) as bulk_cpu:
            bulk = bulk_throughput(socks, url_for, runs=cfg.bulk_runs, expected_size=cfg.bulk_size)
        print(f"   bulk   {', '.join(f'{r:.0f}' for r in bulk.runs_mb_s)} MB/s", flush=True)
        with phase_cpu(tunnel_pids) as lat_cpu:
            lat = new_stream_latency(socks, url_for, n=cfg.latency_n, warmup=cfg.latency_warmup)
        print(
            f"   stream p50 {lat.p50_ms:.2f} ms  p99 {lat.p99_ms:.2f} ms  max {lat.max_ms:.1f} ms", flush=True
        )
        cpu = TunnelCpu.from_phases(bulk_cpu, lat_cpu, cfg)
        print(f"   cpu    {cpu.summary()}", flush=True)
        conc = [
            concurrent_streams(socks, url_for, n=cfg.streams, size=cfg.stream_size)
            for _ in range(cfg.concurrent_runs)
        ]
        print(
            f"   {cfg.streams} streams: {', '.join(f'{c.seconds:.2f}' for c in conc)} s"
            f"  (slowest connect {max(c.slowest_connect_ms for c in conc):.0f} ms)",
            flush=True,
        )
    median_conc = statistics.median(c.seconds for c in conc)

    def group_peak(pids: list[int]) -> float | None:
        return sum(rss.peak_mb_by_root[p] for p in pids) if pids else None

    m = metric_names(cfg)
    values: dict[str, float | None] = {
        m[0]: bulk.best_mb_s,
        m[1]: lat.p50_ms,
        m[2]: lat.p99_ms,
        m[3]: lat.max_ms,
        m[4]: conc[0].seconds,
        m[5]: median_conc,
        m[6]: group_peak(client_pids),
        m[7]: group_peak(server_pids),
        m[8]: cpu.cpu_s_per_gib,
        m[9]: cpu.cpu_ms_per_stream,
    }
    note = f"{note}; " if note else ""
    note += f"machine {cpu.machine_busy_bulk:.0%} busy during bulk"
    detail: dict[str, object] = {
        "name": name,
        "note": note,
        "bulk": dataclasses.asdict(bulk),
        "latency": dataclasses.asdict(lat),
        "concurrent": [dataclasses.asdict(c) for c in conc],
        "rss_peak_mb_total": rss.peak_mb if (client_pids or server_pids) else None,
        "rss_hwm_sum_mb": rss.hwm_mb if (client_pids or server_pids) else None,
        "rss_samples": rss.samples,
        "cpu": dataclasses.asdict(cpu),
    }
    return Row(name, values, note), detail


def wait_for_no_children(pid: int, timeout_s: float = 10.0) -> None:
    """Wait until ``pid`` has no descendants, so the previous row's per-connection
    sshd has exited and does not inflate the next row's server RSS."""
    deadline = time.monotonic() + timeout_s
    while len(process_tree([pid])) > 1:
        if time.monotonic() > deadline:
            raise RuntimeError(f"children of pid {pid} still alive after {timeout_s}s")
        time.sleep(0.02)


DIRECT_NOTE = "curl / raw sockets straight to the HTTP server"


def ssh_row_name(cipher: str) -> str:
    """Row name for an ssh cipher, e.g. 'ssh -D chacha20-poly1305' (the default baseline)."""
    return f"ssh -D {cipher.split('@')[0]}"


def measure_ssh_rows(
    srv: HttpServer, cfg: Config, ciphers: Sequence[str] = CIPHERS
) -> list[tuple[Row, dict[str, object]]]:
    """Measure ``ssh -N -D`` with each cipher through one private sshd.

    Each cipher gets a fresh ssh connection (fresh sshd child), so RSS and
    cold-start numbers are per cipher; the negotiated kex goes in the note.
    """
    out: list[tuple[Row, dict[str, object]]] = []
    with private_sshd() as sshd:
        for cipher in ciphers:
            wait_for_no_children(sshd.pid)
            with ssh_socks_proxy(sshd.port, cipher, sshd.identity_file) as px:
                row, det = measure_row(
                    ssh_row_name(cipher),
                    px.socks_port,
                    srv.url_for,
                    cfg,
                    client_pids=[px.pid],
                    server_pids=[sshd.pid],
                    note=f"kex {px.negotiated_kex}, cipher {cipher}",
                )
                det["negotiated_kex"] = px.negotiated_kex
                det["cipher"] = cipher
                out.append((row, det))
    return out


def version(cmd: list[str]) -> str:
    """First line a tool prints for ``cmd`` (``ssh -V`` writes to stderr), for the run's header."""
    out = subprocess.run(cmd, check=False, capture_output=True, text=True)
    return (out.stdout + out.stderr).strip().splitlines()[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, smoke run under a minute")
    ap.add_argument("--json", type=Path, help="also write all results to this JSON file")
    ap.add_argument("--ciphers", nargs="+", default=list(CIPHERS), help="ssh -c ciphers to measure")
    ap.add_argument("--baseline", default=None, help="row name for the ratio column (default: first ssh row)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("ssh_baseline.py must run as root (private sshd in its own mount namespace)", file=sys.stderr)
        return 2
    ensure_tools()
    cfg = QUICK if args.quick else FULL
    print(
        f"host: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, kernel {platform.release()}\n"
        f"{version(['ssh', '-V'])}; {version(['curl', '--version'])}\n"
        f"config: {dataclasses.asdict(cfg)}",
        flush=True,
    )
    report_idle_cpu()
    t_start = time.monotonic()
    foreign = ForeignCpu()
    results: list[tuple[Row, dict[str, object]]] = []
    with bulk_http_server(cfg.bulk_size) as srv:
        results.append(measure_row("direct (no proxy)", None, srv.url_for, cfg, note=DIRECT_NOTE))
        results += measure_ssh_rows(srv, cfg, args.ciphers)
    other_cpu = foreign.fraction()  # after every benchmark process was reaped
    rows = [r for r, _ in results]
    details = [d for _, d in results]
    print()
    baseline = args.baseline or ssh_row_name(args.ciphers[0])
    print_table(rows, baseline, metric_names(cfg))
    print(
        "bulk: best of curl runs, MB = 10^6 B | p50/p99/max: fresh TCP connection + SOCKS5 handshake\n"
        "+ GET of 1 byte, to the last byte | NxSIZE 1st/median: wall time for N simultaneous streams,\n"
        "every body verified; first (cold) run and median of all runs | RSS: sampled peak in MiB\n"
        "(2^20 B); client = ssh, server = sshd incl. its per-connection child | tunnel CPU: user+system\n"
        "CPU of ssh + sshd per GiB moved in the bulk phase and per new stream in the latency phase\n"
        "(warm-up included); lower is better | machine busy (row notes): all cores, during bulk"
    )
    print_other_cpu(other_cpu)
    load1, load5, _ = os.getloadavg()
    print(
        f"total time {time.monotonic() - t_start:.0f} s; load average at end {load1:.2f} (1 min) {load5:.2f} (5 min)"
    )
    if args.json:
        doc = {"config": dataclasses.asdict(cfg), "other_cpu_fraction": other_cpu, "rows": details}
        args.json.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
