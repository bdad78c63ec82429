#!/usr/bin/env python3
"""HELLO-flood benchmark: does an established tunnel keep its throughput while strangers flood?

Run: ``python3 benchmarks/flood.py [--workers 24] [--size-mib 256] [--runs 5] [--compare REV]``
(no root needed; loopback only).

Two real daemons on loopback: alice (SOCKS endpoint) and bob (serves the benchmark HTTP
server as ``web``), with a live session. ``--workers`` processes flood bob's tunnel port,
each from its own loopback address (127.0.1.N, so per-source limits alone cannot stop
them), one connection at a time, as fast as bob answers: a genuine-looking HELLO, new to
the replay cache (``pqlab/flood.py``), and if bob sends a RETRY, the HELLO again with the
cookie, as an honest initiator would.

``--runs`` times, in turn: curl downloads ``/bulk`` through alice's SOCKS endpoint with
the flood off (baseline), then the flood is switched on, and after a second the same
download runs under flood. Interleaving makes whatever else the machine does hit both
halves alike. ``ratio`` = median under flood / median baseline; the goal (issue 13,
finding 2) is >= 0.80. The table also shows what the flood achieved (HELLOs and
signatures per second), bob's CPU while it ran, the log lines bob wrote about it, and the
CPU other processes used during the row. ``--compare REV`` first measures the daemon and
library of git revision REV (exported to a temporary directory, first on PYTHONPATH), so
a before/after pair is measured back to back with the same flood; ``--code DIR`` measures
the library and daemon in DIR (``pqtunnel/`` and ``pqtunneld/``) instead of this checkout.

The flood workers run on the same machine and use CPU a remote attacker's would not; the
table gives their share.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from addresses import free_port, http_url_for  # noqa: E402
from httpserver import bulk_http_server  # noqa: E402
from cpu import ForeignCpu, report_idle_cpu  # noqa: E402
from load import bulk_throughput  # noqa: E402

from pqlab.flood import FloodTally, flood  # noqa: E402
from pqlab.process import Daemon, init_node, pq  # noqa: E402

TARGET_RATIO = 0.80
WARMUP_S = 1.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    """One code version's row."""

    name: str
    baseline: list[float] = field(default_factory=list)
    flooded: list[float] = field(default_factory=list)
    tally: FloodTally = field(default_factory=FloodTally)
    flood_seconds: float = 0.0
    bob_cpu: float = 0.0
    workers_cpu: float = 0.0
    log_lines: int = 0
    foreign_cpu: float = 0.0

    @property
    def ratio(self) -> float:
        return statistics.median(self.flooded) / statistics.median(self.baseline)


# --------------------------------------------------------------------------
# processes and CPU
# --------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _flood_worker(port: int, source: str, active: Any, stop: Any, results: Any) -> None:
    """One flood process: knock while ``active`` is set, until ``stop``; then report answers and CPU."""
    tally = FloodTally()
    while not stop.is_set():
        if active.wait(timeout=0.2):
            tally.merge(flood(port, source=source, stop=lambda: stop.is_set() or not active.is_set()))
    results.put((dict(tally.answers), cpu_seconds(os.getpid())))


class FloodControl:
    """``workers`` flood processes (one source address each), switched on and off between downloads."""

    def __init__(self, port: int, workers: int) -> None:
        ctx = multiprocessing.get_context("fork")
        self._active, self._stop, self._results = ctx.Event(), ctx.Event(), ctx.Queue()
        self._procs = [ctx.Process(target=_flood_worker, args=(port, f"127.0.1.{n + 1}", self._active, self._stop,
                                                                self._results), daemon=True)
                       for n in range(workers)]
        self.tally = FloodTally()
        self.workers_cpu_s = 0.0
        self.active_s = 0.0
        self._since = 0.0

    def start(self) -> None:
        for proc in self._procs:
            proc.start()

    def on(self) -> None:
        self._active.set()
        self._since = time.monotonic()

    def off(self) -> None:
        self._active.clear()
        self.active_s += time.monotonic() - self._since

    def finish(self) -> None:
        """Stop every worker and collect what it did."""
        self._active.clear()
        self._stop.set()
        for _ in self._procs:
            answers, cpu = self._results.get(timeout=60)
            self.tally.merge(FloodTally(answers=Counter(answers)))
            self.workers_cpu_s += cpu
        for proc in self._procs:
            proc.join(timeout=10)
        self.tally.seconds = self.active_s


@contextlib.contextmanager
def code_from(source: Path | None) -> Iterator[None]:
    """Start daemons (and CLI calls) with the library and daemon in ``source`` first on the path."""
    if source is None:
        yield
        return
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(source) + (os.pathsep + previous if previous else "")
    try:
        yield
    finally:
        if previous is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = previous


def export_revision(rev: str, into: Path) -> Path:
    """``git archive`` REV's pqtunnel/ and daemon/ (as pqtunneld/) into ``into``."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "pqtunnel", "daemon"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "daemon").rename(into / "pqtunneld")
    return into


# --------------------------------------------------------------------------
# one row
# --------------------------------------------------------------------------


def _checked(result: subprocess.CompletedProcess[str], what: str) -> str:
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed: {result.stderr.strip()}")
    return result.stdout


@contextlib.contextmanager
def tunnel_pair(http_port: int) -> Iterator[tuple[Daemon, Daemon, int]]:
    """alice (SOCKS) and bob (web service, listening on every loopback address), session up."""
    with tempfile.TemporaryDirectory(prefix="pq-flood-") as tmp:
        root = Path(tmp)
        alice_home, alice_fp = init_node(root, "alice")
        bob_home, bob_fp = init_node(root, "bob")
        _checked(pq("trust", "bob", bob_fp, home=alice_home), "trust bob")
        _checked(pq("trust", "alice", alice_fp, home=bob_home), "trust alice")
        (bob_home / "config.toml").write_text(f'[services]\nweb = "127.0.0.1:{http_port}"\n')
        bob = Daemon(bob_home, ["--listen", "0.0.0.0:0"]).start()
        socks = free_port()
        alice = Daemon(alice_home, ["--socks", f"127.0.0.1:{socks}", "--peer", f"bob=127.0.0.1:{bob.port}"]).start()
        try:
            _checked(pq("ping", "bob", home=alice_home), "ping bob")
            yield alice, bob, socks
        finally:
            alice.stop()
            bob.stop()


def measure(name: str, http_port: int, size: int, runs: int, workers: int) -> Result:
    """Interleaved: a download without flood, then one under flood, ``runs`` times, so that
    whatever else the machine does hits both halves alike."""
    result = Result(name)
    url_for = http_url_for("http://web.bob.pq")
    foreign = ForeignCpu()
    with tunnel_pair(http_port) as (alice, bob, socks):
        def download() -> float:
            return bulk_throughput(socks, url_for, runs=1, expected_size=size).best_mb_s

        assert bob.process is not None
        control = FloodControl(bob.port, workers)
        control.start()
        log_before = len(bob.logs().splitlines())
        bob_cpu_s = 0.0
        try:
            for _ in range(runs):
                result.baseline.append(download())
                control.on()
                time.sleep(WARMUP_S)
                cpu_before, started = cpu_seconds(bob.process.pid), time.monotonic()
                result.flooded.append(download())
                result.flood_seconds += time.monotonic() - started
                bob_cpu_s += cpu_seconds(bob.process.pid) - cpu_before
                control.off()
        finally:
            control.finish()
        result.tally = control.tally
        result.bob_cpu = bob_cpu_s / result.flood_seconds
        result.workers_cpu = control.workers_cpu_s / max(control.active_s, 1e-9)
        result.log_lines = len(bob.logs().splitlines()) - log_before
        if _session_count(alice) != 1:
            raise RuntimeError("the session did not survive the flood")
    result.foreign_cpu = foreign.fraction()
    return result


def _session_count(alice: Daemon) -> int:
    return len(alice.sessions())


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------


def print_report(results: list[Result], workers: int, size: int) -> None:
    print(f"\nHELLO flood: {workers} workers (one source address each), curl of {size >> 20} MiB through the tunnel,"
          f" with and without flood in turn; MB/s are medians (1 MB = 10^6 B)\n")
    header = ("code", "baseline MB/s", "flood MB/s", "ratio", "HELLO/s", "signed/s", "refused/s",
              "bob CPU", "workers CPU", "log lines", "other CPU")
    rows = []
    for r in results:
        per_s = r.tally.seconds or 1.0
        refused = r.tally.sent - r.tally.signed
        rows.append((r.name, f"{statistics.median(r.baseline):.0f}", f"{statistics.median(r.flooded):.0f}",
                     f"{r.ratio:.2f}", f"{r.tally.sent / per_s:.0f}", f"{r.tally.signed / per_s:.1f}",
                     f"{refused / per_s:.0f}", f"{r.bob_cpu:.0%}", f"{r.workers_cpu:.0%}", str(r.log_lines),
                     f"{r.foreign_cpu:.0%}"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    print()
    for r in results:
        answers = ", ".join(f"{k} {v}" for k, v in sorted(r.tally.answers.items()))
        print(f"{r.name}: MB/s without flood {_runs(r.baseline)}, under flood {_runs(r.flooded)}; "
              f"flood answers: {answers}")
    print("\nbob CPU: share of one core bob used while the flood ran (it also carries the download); "
          "workers CPU: the flood processes' share of one core; other CPU: the machine's CPU used by "
          "processes outside this benchmark (trust rows near 0%).")
    latest = results[-1]
    verdict = "MET" if latest.ratio >= TARGET_RATIO else "MISSED"
    print(f"\ntarget: under flood >= {TARGET_RATIO:.0%} of the baseline: {verdict} ({latest.ratio:.0%}, {latest.name})")


def _runs(values: list[float]) -> str:
    return "/".join(f"{v:.0f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=24, help="flood processes, one source address each (24)")
    parser.add_argument("--size-mib", type=int, default=256, help="size of each download (256 MiB)")
    parser.add_argument("--runs", type=int, default=5, help="pairs of downloads, without and under flood, in turn (5)")
    parser.add_argument("--compare", metavar="REV", help="also measure git revision REV first (e.g. the commit before a fix)")
    parser.add_argument("--code", metavar="DIR", type=Path,
                        help="measure the library and daemon in DIR (holding pqtunnel/ and pqtunneld/) instead of this checkout")
    args = parser.parse_args()
    size = args.size_mib << 20
    report_idle_cpu()
    results = []
    with bulk_http_server(size) as server, tempfile.TemporaryDirectory(prefix="pq-flood-code-") as code:
        if args.compare:
            rev = _checked(subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.compare],
                                          capture_output=True, text=True), "git rev-parse").strip()
            with code_from(export_revision(rev, Path(code))):
                results.append(measure(f"{rev} (--compare)", server.port, size, args.runs, args.workers))
            print_progress(results[-1])
        with code_from(args.code):
            name = f"{args.code} (--code)" if args.code else "this checkout"
            results.append(measure(name, server.port, size, args.runs, args.workers))
    print_report(results, args.workers, size)


def print_progress(result: Result) -> None:
    """One line as soon as a row is measured, so a later failure does not lose it."""
    print(f"{result.name}: MB/s without flood {_runs(result.baseline)}, under flood {_runs(result.flooded)}, "
          f"ratio {result.ratio:.2f}; flood answers {dict(result.tally.answers)}", flush=True)


if __name__ == "__main__":
    main()
