#!/usr/bin/env python3
"""Streams benchmark: pqtunnel vs ``ssh -D`` as SOCKS5 tunnels, in one run on one machine.

Run as root: ``python3 benchmarks/streams.py [--quick] [--json out.json]``.

Rows, all measured by the same code (``ssh_baseline.measure_row``):

* ``direct (no proxy)``: curl / raw sockets straight to the HTTP server (context);
* ``ssh -D <cipher>``: ``ssh -N -D`` through a private sshd, one row per cipher;
* ``pqtunnel <aead>``: two real daemons on loopback, alice (SOCKS5 endpoint) and bob
  (exposes the HTTP server as service ``web``); clients ask alice for
  ``http://web.bob.pq/...``.  One row with the default configuration (the AEAD this CPU
  prefers negotiated: AES-256-GCM with AES instructions, else ChaCha20-Poly1305) and one
  with the other AEAD forced by ``[node] aeads = [...]`` on both nodes.  The
  negotiated AEAD is read back from ``pqtunnel sessions --json`` on both daemons.

Metrics: single-stream bulk (curl), new-stream latency over a live session (p50/p99/max),
N concurrent 1 MiB streams (wall time), peak RSS of each side.  With ``--profile``, py-spy
samples both daemons during each pqtunnel row and the top functions of each are printed
after the row (``profiling.py``).  The ratio column is
against the ssh row with the best bulk throughput in this run; a "targets" section
states which pqtunnel targets were met.  Full mode takes about 70 s on an idle 2-core
machine (up to 2 minutes when other processes compete), ``--quick`` about 25 s.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import ssh_baseline as sb  # noqa: E402
from addresses import free_port, http_url_for  # noqa: E402
from cpu import ForeignCpu, cpu_times, report_idle_cpu  # noqa: E402
from httpserver import HttpServer, bulk_http_server  # noqa: E402
from processes import process_tree, stop_daemons, tree_cpu_s  # noqa: E402
from profiling import ProfilerMissing, format_profiles, py_spy_path, sampling  # noqa: E402
from report import Row, print_other_cpu, print_table, write_dated_json  # noqa: E402
from tools import ensure_tools  # noqa: E402

from pqlab.process import Daemon, init_node, pq  # noqa: E402
from pqtunneld.cpufeatures import hardware_aeads  # noqa: E402

PQ_AEADS = tuple(a.label for a in hardware_aeads())  # first = the default on this CPU, config left untouched
PQ_URL = "http://web.bob.pq"
TARGET_P99_MS = 2.0
TARGET_CONCURRENT_FRACTION = 0.5
TARGET_RSS_MB = 100.0  # in the table's unit, MiB (2^20 B), as peak_rss_mb reports

Result = tuple[Row, dict[str, Any]]


# --------------------------------------------------------------------------
# pqtunnel daemons
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PqPair:
    """Two running daemons: alice offers SOCKS5 on ``socks_port``, bob serves ``web``."""

    alice: Daemon
    bob: Daemon
    socks_port: int

    @property
    def pids(self) -> tuple[int, int]:
        """(alice pid, bob pid) of the daemon processes."""
        assert self.alice.process is not None and self.bob.process is not None
        return self.alice.process.pid, self.bob.process.pid


def _checked(result: Any, what: str) -> str:
    """stdout of a finished ``pqtunnel`` command, or RuntimeError with its stderr."""
    if result.returncode != 0:
        raise RuntimeError(f"pqtunnel {what} failed: {result.stderr.strip()}")
    return str(result.stdout)


def _write_configs(alice_home: Path, bob_home: Path, http_port: int, aead: str) -> None:
    """bob exposes the HTTP server as ``web``; a non-default AEAD is forced on both nodes."""
    node = "" if aead == PQ_AEADS[0] else f'[node]\naeads = ["{aead}"]\n'
    if node:
        (alice_home / "config.toml").write_text(node)
    (bob_home / "config.toml").write_text(f'{node}[services]\nweb = "127.0.0.1:{http_port}"\n')


def _start_alice(home: Path, bob_port: int) -> tuple[Daemon, int]:
    """Start alice with a SOCKS5 endpoint; retry if the free port was taken meanwhile."""
    last: Exception | None = None
    for _attempt in range(3):
        socks_port = free_port()
        daemon = Daemon(home, ["--socks", f"127.0.0.1:{socks_port}", "--peer", f"bob=127.0.0.1:{bob_port}"])
        try:
            return daemon.start(), socks_port
        except RuntimeError as exc:
            daemon.kill()
            last = exc
    raise RuntimeError(f"alice did not start: {last}")


@contextlib.contextmanager
def pqtunnel_pair(http_port: int, aead: str) -> Iterator[PqPair]:
    """Fresh identities, mutual pinning, bob then alice started; both killed and reaped on exit."""
    with tempfile.TemporaryDirectory(prefix="pqbench-pq-") as tmp:
        root = Path(tmp)
        alice_home, alice_fp = init_node(root, "alice")
        bob_home, bob_fp = init_node(root, "bob")
        _checked(pq("trust", "bob", bob_fp, home=alice_home), "trust bob")
        _checked(pq("trust", "alice", alice_fp, home=bob_home), "trust alice")
        _write_configs(alice_home, bob_home, http_port, aead)
        bob = Daemon(bob_home)
        alice: Daemon | None = None
        try:
            bob.start()
            alice, socks_port = _start_alice(alice_home, bob.port)
            yield PqPair(alice, bob, socks_port)
        finally:
            stop_daemons((alice, bob))


def live_session(pair: PqPair, aead: str) -> dict[str, Any]:
    """Handshake now (``pqtunnel ping bob``) and check both daemons negotiated ``aead``.

    Returns alice's session record from ``pqtunnel sessions --json``.
    """
    _checked(pq("ping", "bob", home=pair.alice.home), "ping bob")
    return negotiated(pair, aead)


def negotiated(pair: PqPair, aead: str) -> dict[str, Any]:
    """alice's one session, after checking that alice and bob both report ``aead``."""
    records = {"alice": pair.alice.sessions(), "bob": pair.bob.sessions()}
    for who, sessions in records.items():
        if len(sessions) != 1:
            raise RuntimeError(f"{who} has {len(sessions)} sessions, expected 1: {sessions}")
        if sessions[0]["aead"] != aead:
            raise RuntimeError(f"{who} negotiated {sessions[0]['aead']}, expected {aead}")
    return records["alice"][0]


def pq_row_name(aead: str) -> str:
    """Row name, e.g. 'pqtunnel aes-256-gcm (default)' or 'pqtunnel chacha20-poly1305'."""
    return f"pqtunnel {aead} (default)" if aead == PQ_AEADS[0] else f"pqtunnel {aead}"


def measure_pq_row(srv: HttpServer, cfg: sb.Config, aead: str, profile: bool = False) -> Result:
    """Start a daemon pair negotiating ``aead`` and measure it through alice's SOCKS5 port.

    With ``profile``, both daemons are sampled by py-spy during the row and the summary is
    printed after it (and kept in the row's JSON detail).
    """
    with pqtunnel_pair(srv.port, aead) as pair:
        before = live_session(pair, aead)
        print(f"   negotiated (pqtunnel sessions --json, alice and bob): {before['suite']} "
              f"{before['kem']} | {before['signature']} | {before['aead']}", flush=True)
        alice_pid, bob_pid = pair.pids
        note = f"suite {before['suite']} ({before['kem']}, {before['signature']}), AEAD {before['aead']}"
        targets = [("alice", alice_pid), ("bob", bob_pid)] if profile else []
        with sampling(targets) as profiles:
            row, detail = sb.measure_row(pq_row_name(aead), pair.socks_port, http_url_for(PQ_URL), cfg,
                                         client_pids=[alice_pid], server_pids=[bob_pid], note=note)
        if profile:
            print(format_profiles(pq_row_name(aead), profiles), flush=True)
            detail["profile"] = {p.who: {"samples": p.samples,
                                         "top_self": [dataclasses.asdict(f) for f in p.top_self()],
                                         "top_inclusive": [dataclasses.asdict(f) for f in p.top_inclusive_ours()]}
                                 for p in profiles}
        after = negotiated(pair, aead)  # same single session, still the same AEAD
        if after["session_id"] != before["session_id"]:
            raise RuntimeError("the session was replaced during the measurement")
        note = f"{row.note}; {after['rekeys']} rekeys during the run"
        row = dataclasses.replace(row, note=note)
        detail.update(note=note, aead=aead, session_before=before, session_after=after)
    return row, detail


# --------------------------------------------------------------------------
# Baseline and targets
# --------------------------------------------------------------------------


def fastest_ssh(results: Sequence[Result], bulk_metric: str) -> Result:
    """The ssh row (and its detail) with the best single-stream bulk throughput in this run."""
    ssh_rows = [result for result in results if result[0].name.startswith("ssh -D")]
    return max(ssh_rows, key=lambda result: result[0].values[bulk_metric] or 0.0)


@dataclasses.dataclass(frozen=True)
class Target:
    """One target for one pqtunnel row: the measured value against its limit."""

    row: str
    target: str
    value: float
    limit: float
    unit: str
    higher_is_better: bool
    bound: str = ""  # when missed: what the row's CPU figures say bounds it

    @property
    def met(self) -> bool:
        """True when the measured value is on the right side of the limit."""
        return self.value >= self.limit if self.higher_is_better else self.value <= self.limit

    def line(self) -> str:
        """One line of the targets section, plus the bound when the target was missed."""
        op = ">=" if self.higher_is_better else "<="
        verdict = "MET   " if self.met else "MISSED"
        text = f"  {verdict} {self.row}: {self.target}: {self.value:.2f} {self.unit} (need {op} {self.limit:.2f})"
        return f"{text}\n           {self.bound}" if self.bound and not self.met else text


def cpu_bound(phase: str, metric: str, busy: str, row: Result, base: Result) -> str:
    """E.g. 'bulk bound: pqtunnel ... 2.50 CPU-s/GiB in its two daemons against ssh -D ...'s 1.10 (2.3x), ...'.

    ``metric`` is a table column (tunnel CPU per unit of work), ``busy`` the key in the
    row's CPU detail for how busy the machine was in that phase.
    """
    (r, r_detail), (b, b_detail) = row, base
    value, ref = r.values.get(metric), b.values.get(metric)
    if value is None or ref is None:
        return ""
    unit = metric.removeprefix("tunnel ")
    ratio = f" ({value / ref:.1f}x)" if ref else ""
    return (f"{phase} bound: {r.name} {value:.2f} {unit} in its two daemons against {b.name}'s "
            f"{ref:.2f} in ssh + sshd{ratio}, machine {r_detail['cpu'][busy]:.0%} busy "
            f"({b_detail['cpu'][busy]:.0%} in the ssh row)")


def targets_for(result: Result, base_result: Result, cfg: sb.Config) -> list[Target]:
    """Targets for one pqtunnel row: bulk, p99, concurrency (vs the baseline), RSS of alice and bob.

    The bulk and p99 targets carry the CPU bound (``cpu_bound``) printed when they are missed.
    """
    row, base = result[0], base_result[0]
    m = sb.metric_names(cfg)
    bulk, p99, conc, alice_rss, bob_rss = m[0], m[2], m[5], m[6], m[7]
    bulk_bound = cpu_bound("bulk", sb.CPU_PER_GIB, "machine_busy_bulk", result, base_result)
    p99_bound = cpu_bound("new-stream", sb.CPU_PER_STREAM, "machine_busy_latency", result, base_result)

    def val(r: Row, k: str) -> float:
        v = r.values[k]
        assert v is not None, f"{r.name} has no {k}"
        return v

    return [
        Target(row.name, f"single-stream bulk >= {base.name}", val(row, bulk), val(base, bulk), "MB/s", True,
               bulk_bound),
        Target(row.name, f"new-stream p99 <= {TARGET_P99_MS:g} ms", val(row, p99), TARGET_P99_MS, "ms", False,
               p99_bound),
        Target(row.name, f"{conc} <= {TARGET_CONCURRENT_FRACTION:g}x {base.name}", val(row, conc),
               TARGET_CONCURRENT_FRACTION * val(base, conc), "s", False),
        Target(row.name, f"alice peak RSS <= {TARGET_RSS_MB:g} MB", val(row, alice_rss), TARGET_RSS_MB, "MB", False),
        Target(row.name, f"bob peak RSS <= {TARGET_RSS_MB:g} MB", val(row, bob_rss), TARGET_RSS_MB, "MB", False),
    ]


def print_targets(targets: Sequence[Target]) -> None:
    """The targets section: each target, its number in this run and whether it was met."""
    print("\ntargets (pqtunnel, this run):")
    for t in targets:
        print(t.line())
    met = sum(t.met for t in targets)
    print(f"  {met} of {len(targets)} met (RSS in MiB, the table's unit; 100 MB = 95.4 MiB if you read MB as 10^6 B)")


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


@functools.cache
def source_digest() -> str:
    """Short sha256 over daemon/ and pqtunnel/ sources at start: which code the numbers belong to."""
    digest = hashlib.sha256()
    for path in sorted([*(REPO / "daemon").rglob("*.py"), *(REPO / "pqtunnel").rglob("*.py")]):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def use_this_checkout() -> None:
    """Daemon subprocesses import daemon/ and pqtunnel/ from this repo, whatever the cwd."""
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


def print_preamble(cfg: sb.Config) -> None:
    """Machine, tool versions, config, and how busy the CPU was before starting."""
    print(
        f"host: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, kernel {platform.release()}, "
        f"Python {platform.python_version()}\n"
        f"{sb.version(['ssh', '-V'])}; {sb.version(['curl', '--version'])}\n"
        f"pqtunnel sources (daemon/, pqtunnel/) sha256 {source_digest()}\n"
        f"config: {dataclasses.asdict(cfg)}",
        flush=True,
    )
    report_idle_cpu()


def _own_cpu_s() -> float:
    """CPU seconds of this process, its reaped children and every live descendant.

    Unlike ``ForeignCpu`` this also counts descendants that are still running
    (the HTTP server, daemons, sshd), so it can be read between rows.
    """
    total = tree_cpu_s(process_tree([os.getpid()])[1:])
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


class OtherCpu:
    """Share of the machine's CPU used by processes outside this benchmark's tree."""

    def __init__(self) -> None:
        self._busy0, self._total0 = cpu_times()
        self._own0 = _own_cpu_s()

    def fraction(self) -> float:
        """Other processes' CPU since construction, as a fraction of all CPUs (0..1)."""
        busy, total = cpu_times()
        if total <= self._total0:
            return 0.0
        hz = os.sysconf("SC_CLK_TCK")
        other_s = (busy - self._busy0) / hz - (_own_cpu_s() - self._own0)
        return max(0.0, other_s / ((total - self._total0) / hz))


def with_other_cpu(measure: Callable[[], Result]) -> Result:
    """Run one row's measurement and note how much CPU other processes took meanwhile."""
    other = OtherCpu()
    row, detail = measure()
    share = other.fraction()
    detail["other_cpu_fraction"] = share
    note = f"{row.note}; other processes used {share:.0%} CPU meanwhile"
    return dataclasses.replace(row, note=note), detail


def measure_all(cfg: sb.Config, profile: bool = False) -> list[Result]:
    """Every row, in table order, against one HTTP server.

    Each ssh cipher gets its own private sshd so every row can carry the CPU share
    other processes used while it was measured (this box may not be idle).
    """
    with bulk_http_server(cfg.bulk_size) as srv:
        results = [with_other_cpu(lambda: sb.measure_row("direct (no proxy)", None, srv.url_for, cfg,
                                                         note=sb.DIRECT_NOTE))]
        for cipher in sb.CIPHERS:
            results.append(with_other_cpu(lambda c=cipher: sb.measure_ssh_rows(srv, cfg, [c])[0]))
        for aead in PQ_AEADS:
            results.append(with_other_cpu(lambda a=aead: measure_pq_row(srv, cfg, a, profile)))
    return results


def print_legend(base: Row, other_cpu: float, elapsed_s: float) -> None:
    """What the columns mean, and whether the run was disturbed."""
    print(
        f"baseline: {base.name} = the ssh -D cipher with the best bulk throughput in this run\n"
        "bulk: best of curl runs, MB = 10^6 B | p50/p99/max: new stream over a live session = fresh TCP\n"
        "connection + SOCKS5 handshake + GET of 1 byte, to the last byte | NxSIZE 1st/median: wall time\n"
        "for N simultaneous streams, every body verified; first run and median of all runs | RSS: sampled\n"
        "peak in MiB (2^20 B); client = ssh or alice's daemon, server = sshd (incl. per-connection child)\n"
        "or bob's daemon | tunnel CPU: user+system CPU of both tunnel ends (ssh + sshd, or alice + bob)\n"
        "per GiB moved in the bulk phase (all curl runs) and per new stream in the latency phase (warm-up\n"
        "included); lower is better | machine busy (row notes): all cores, during bulk"
    )
    print_other_cpu(other_cpu)
    print(f"total time {elapsed_s:.0f} s")


def write_json(path: Path, cfg: sb.Config, results: Sequence[Result], base: Row,
               targets: Sequence[Target], other_cpu: float, elapsed_s: float) -> None:
    """All rows (table values and raw details), the baseline and the target verdicts."""
    doc = {
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "kernel": platform.release(),
                 "python": platform.python_version()},
        "source_sha256_16": source_digest(),
        "config": dataclasses.asdict(cfg),
        "baseline": base.name,
        "rows": [{"values": dict(row.values), **detail} for row, detail in results],
        "targets": [{**dataclasses.asdict(t), "met": t.met} for t in targets],
        "other_cpu_fraction": other_cpu,
        "elapsed_s": elapsed_s,
    }
    write_dated_json(path, doc)


def main() -> int:
    """Measure every row, print the table and the targets; exit status 0 on success."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, smoke run (~25 s)")
    ap.add_argument("--json", type=Path, help="also write all results to this JSON file")
    ap.add_argument("--profile", action="store_true",
                    help="sample both daemons with py-spy during each pqtunnel row and print their top functions")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("streams.py must run as root (private sshd in its own mount namespace)", file=sys.stderr)
        return 2
    if args.profile:
        try:
            py_spy_path()
        except ProfilerMissing as exc:
            print(exc, file=sys.stderr)
            return 2
    ensure_tools()
    use_this_checkout()
    cfg = sb.QUICK if args.quick else sb.FULL
    print_preamble(cfg)
    t_start = time.monotonic()
    foreign = ForeignCpu()
    results = measure_all(cfg, args.profile)
    other_cpu = foreign.fraction()  # after every benchmark process was reaped
    elapsed = time.monotonic() - t_start
    metrics = sb.metric_names(cfg)
    base_result = fastest_ssh(results, metrics[0])
    base = base_result[0]
    print()
    print_table([row for row, _ in results], base.name, metrics)
    print_legend(base, other_cpu, elapsed)
    targets = [t for result in results if result[0].name.startswith("pqtunnel")
               for t in targets_for(result, base_result, cfg)]
    print_targets(targets)
    if args.json:
        write_json(args.json, cfg, results, base, targets, other_cpu, elapsed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
