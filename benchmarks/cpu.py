"""How busy the machine's CPUs are, and how much of that is not the benchmark.

Benchmarks on a 2-core box are only comparable when nothing else runs:
``report_idle_cpu`` prints the load before a run, ``ForeignCpu`` the share
other processes took during it, ``phase_cpu`` what the tunnel processes spent
during one phase of a row and how busy the whole machine was meanwhile.
Standard library only; Linux only (reads /proc/stat and /proc/PID/stat).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import time
from collections.abc import Iterator, Sequence

from processes import tree_cpu_s


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already included in user/nice
    return total - idle, total


def cpu_busy_fraction(interval_s: float = 1.0) -> float:
    """Fraction of all CPUs busy during ``interval_s`` (0..1), e.g. before a run.

    Benchmarks on a 2-core box are only comparable when nothing else runs;
    callers print this so a contaminated table is recognisable as such.
    """
    b0, t0 = cpu_times()
    time.sleep(interval_s)
    b1, t1 = cpu_times()
    return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


def report_idle_cpu() -> float:
    """Print how busy other processes keep the CPU before a run, warning when it is not idle."""
    busy = cpu_busy_fraction()
    print(f"CPU busy before the run (other processes): {busy:.0%}", flush=True)
    if busy > 0.10:
        print("WARNING: the machine is not idle; numbers will be low and noisy", flush=True)
    return busy


class ForeignCpu:
    """Share of the machine's CPU used by processes other than this one and its children.

    Busy time from /proc/stat minus our own and our reaped children's CPU
    time (getrusage), over the life of the object.  Stop it only after every
    process the benchmark started has been reaped, or their time counts as
    foreign.  Loopback softirq work is not always charged to a task, so an
    idle machine reads a few percent, not exactly 0.
    """

    def __init__(self) -> None:
        self._busy0, self._total0 = cpu_times()
        self._own0 = self._own_cpu_s()

    @staticmethod
    def _own_cpu_s() -> float:
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def fraction(self) -> float:
        """Foreign CPU since construction, as a fraction of all CPUs (0..1)."""
        hz = os.sysconf("SC_CLK_TCK")
        busy, total = cpu_times()
        if total <= self._total0:
            return 0.0
        foreign_s = (busy - self._busy0) / hz - (self._own_cpu_s() - self._own0)
        return max(0.0, foreign_s / ((total - self._total0) / hz))


@dataclasses.dataclass
class PhaseCpu:
    """CPU of one measurement phase, filled in when the ``phase_cpu`` block ends.

    ``tree_s``: user+system seconds of the watched process trees (None when no
    pids were given, e.g. the direct row); ``machine_busy``: share of all CPUs
    busy (1 - idle+iowait / total), to tell whether the cores were saturated.
    """

    tree_s: float | None = None
    machine_busy: float = 0.0


@contextlib.contextmanager
def phase_cpu(pids: Sequence[int]) -> Iterator[PhaseCpu]:
    """Measure the CPU that ``pids`` (and descendants) and the whole machine spend in the block."""
    result = PhaseCpu()
    tree0 = tree_cpu_s(pids) if pids else None
    busy0, total0 = cpu_times()
    try:
        yield result
    finally:
        busy1, total1 = cpu_times()
        if tree0 is not None:
            result.tree_s = tree_cpu_s(pids) - tree0
        result.machine_busy = (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0
