"""Process trees from /proc: find descendants, stop and reap, wait for a log line, sample RSS and CPU.

``peak_rss_mb([client_pid, server_pid])`` samples the summed RSS of process
trees in a background thread while a measurement runs; children are
re-scanned every sample because sshd forks per connection.  Standard library
only; Linux only (reads /proc).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol


def ppid_map() -> dict[int, int]:
    """pid -> parent pid for every process (no /proc/PID/task/*/children here)."""
    out: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # comm may contain spaces/parens: fields after the last ')' are fixed.
        fields = stat[stat.rfind(b")") + 2 :].split()
        out[int(name)] = int(fields[1])
    return out


def _children_map() -> dict[int, list[int]]:
    """parent pid -> child pids, from one scan of /proc."""
    children: dict[int, list[int]] = {}
    for pid, ppid in ppid_map().items():
        children.setdefault(ppid, []).append(pid)
    return children


def _subtree(root: int, children: Mapping[int, list[int]]) -> list[int]:
    """root and all its descendants in ``children``."""
    out: list[int] = []
    stack = [root]
    while stack:
        p = stack.pop()
        if p not in out:
            out.append(p)
            stack.extend(children.get(p, []))
    return out


def process_tree(pids: Iterable[int]) -> list[int]:
    """The given pids plus all their live descendants (e.g. sshd per-connection children)."""
    children = _children_map()
    out: list[int] = []
    for root in pids:
        out += [p for p in _subtree(root, children) if p not in out]
    return out


def _cpu_s(pid: int, hz: int) -> float:
    """utime+stime+cutime+cstime of one process in seconds (all its threads), 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(b")") + 2 :].split()
    return sum(int(x) for x in fields[11:15]) / hz


def tree_cpu_s(pids: Iterable[int]) -> float:
    """CPU seconds used so far by the given pids and their live descendants.

    Meant to be read before and after a phase (the delta is what the trees
    spent).  Children reaped by a parent inside the tree stay counted through
    the parent's cutime/cstime, but a descendant that is born and exits between
    two reads without being waited for inside the tree (or is re-parented to
    init) is missed.
    """
    hz = os.sysconf("SC_CLK_TCK")
    return sum(_cpu_s(pid, hz) for pid in process_tree(pids))


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; always reaps."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Stoppable(Protocol):
    """A started daemon: ``stop`` asks it to exit (RuntimeError if it does not), ``kill`` makes sure."""

    def stop(self) -> Any: ...

    def kill(self) -> Any: ...


def stop_daemons(daemons: Iterable[Stoppable | None]) -> None:
    """Stop each daemon politely, then kill it: one whose stop timed out (RuntimeError) is killed too.

    ``None`` stands for a daemon that was never started.
    """
    for daemon in daemons:
        if daemon is not None:
            with contextlib.suppress(RuntimeError):
                daemon.stop()
            daemon.kill()


def wait_for_log(proc: subprocess.Popen[bytes], log: Path, patterns: Sequence[str], timeout: float) -> str:
    """Poll a log file until every regex in ``patterns`` matched; raise with the log otherwise."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if all(re.search(p, text, re.MULTILINE) for p in patterns):
            return text
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    raise RuntimeError(
        f"{proc.args!r} not ready (exit={proc.poll()}), waiting for {patterns!r}; log:\n{text[-4000:]}"
    )


def _read_status_kb(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in kB from /proc/PID/status, or None if gone/kernel thread."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return None
    rss = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    hwm = re.search(r"^VmHWM:\s+(\d+) kB", text, re.MULTILINE)
    if not rss or not hwm:
        return None
    return int(rss.group(1)), int(hwm.group(1))


class RssSampler:
    """Background sampler of the summed RSS of process trees.

    ``peak_mb``: highest sum of VmRSS over all given trees seen in one sample
    (what the processes really held at once).  ``peak_mb_by_root[pid]``: the
    same for one given pid and its descendants (e.g. ssh client vs sshd), from
    one shared sampling thread.  ``hwm_mb``: sum of each process's VmHWM, an
    upper bound that also catches spikes between samples.  Children are
    re-scanned every sample because sshd forks per connection.  MB = 2^20 bytes.
    The 50 ms default interval resolves a peak that lasts ~1 s while costing
    only ~1 ms of Python per sample, so it barely competes with the tunnel.
    """

    def __init__(self, pids: Iterable[int], interval_s: float = 0.05, children: bool = True) -> None:
        self.pids = list(pids)
        self.interval_s = interval_s
        self.children = children
        self.peak_mb = 0.0
        self.peak_mb_by_root: dict[int, float] = {p: 0.0 for p in self.pids}
        self.samples = 0
        self._hwm_kb: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    @property
    def hwm_mb(self) -> float:
        return sum(self._hwm_kb.values()) / 1024

    def _trees(self) -> dict[int, list[int]]:
        if not self.children:
            return {p: [p] for p in self.pids}
        children = _children_map()
        return {root: _subtree(root, children) for root in self.pids}

    def sample(self) -> None:
        """Take one reading now (also called by the thread)."""
        rss_kb: dict[int, int] = {}
        trees = self._trees()
        for tree in trees.values():
            for pid in tree:
                if pid in rss_kb:
                    continue
                st = _read_status_kb(pid)
                if st is None:
                    continue
                rss_kb[pid] = st[0]
                self._hwm_kb[pid] = max(self._hwm_kb.get(pid, 0), st[1])
        for root, tree in trees.items():
            mb = sum(rss_kb.get(p, 0) for p in tree) / 1024
            self.peak_mb_by_root[root] = max(self.peak_mb_by_root[root], mb)
        self.peak_mb = max(self.peak_mb, sum(rss_kb.values()) / 1024)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


@contextlib.contextmanager
def peak_rss_mb(pids: Iterable[int], interval_s: float = 0.05, children: bool = True) -> Iterator[RssSampler]:
    """Sample the RSS of ``pids`` (and their descendants) while the block runs.

    ``with peak_rss_mb([client_pid, server_pid]) as rss: ...`` then read
    ``rss.peak_mb``, ``rss.peak_mb_by_root[server_pid]`` or ``rss.hwm_mb``
    after the block.  Sampling happens in a thread so the
    measurement code itself stays unchanged.
    """
    sampler = RssSampler(pids, interval_s, children).start()
    try:
        yield sampler
    finally:
        sampler.stop()
