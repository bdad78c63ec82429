"""Where a daemon's CPU time goes during a benchmark row: py-spy attached by pid.

py-spy samples a running process from outside (ptrace, root), so the daemons run
unchanged: no profiler hook in their code and no profiler overhead inside them beyond
the sampling pauses (``--nonblocking`` avoids even those).  Only threads that are on
the CPU are sampled (py-spy leaves idle threads out), so the shares below are shares of
the daemon's busy time; a thread that py-spy catches just entering or leaving
``epoll_wait`` still counts, so trio's ``get_events`` shows up when the loop wakes often.
Time inside a C extension (AEAD, socket send) is counted to the Python function that
called it.

Standard library only, like the other benchmark modules; ``py-spy`` is an optional
tool (``pip install py-spy``) needed only for ``--profile``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

SAMPLE_RATE_HZ = 250
TOP = 12
OUR_PACKAGES = ("pqtunnel/", "daemon/", "pqtunneld/")


class ProfilerMissing(RuntimeError):
    """py-spy is not installed next to this Python nor on PATH."""


def py_spy_path() -> str:
    """The py-spy executable: next to this interpreter first (a venv), then on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    found = shutil.which("py-spy")
    if found is None:
        raise ProfilerMissing("--profile needs py-spy: pip install py-spy (into the Python that runs this script)")
    return found


@dataclasses.dataclass(frozen=True)
class FunctionShare:
    """One function's samples: self (on top of the stack) and inclusive (anywhere in it)."""

    name: str
    self_samples: int
    inclusive_samples: int


@dataclasses.dataclass(frozen=True)
class Profile:
    """Samples of one process over one row."""

    who: str
    samples: int
    functions: tuple[FunctionShare, ...]

    def top_self(self, n: int = TOP) -> list[FunctionShare]:
        """The n functions that spent the most samples themselves."""
        on_top = [f for f in self.functions if f.self_samples]
        return sorted(on_top, key=lambda f: f.self_samples, reverse=True)[:n]

    def top_inclusive_ours(self, n: int = TOP) -> list[FunctionShare]:
        """The n pqtunnel/daemon functions with the most samples including their callees.

        The chain from the entry point down to the event loop (the functions that hold
        every sample, ``main``, ``cmd_up``...) says nothing and is left out.
        """
        ours = [f for f in self.functions if any(p in f.name for p in OUR_PACKAGES)]
        if not ours:
            return []
        root = max(f.inclusive_samples for f in ours)
        below_root = [f for f in ours if f.inclusive_samples < root]
        return sorted(below_root, key=lambda f: f.inclusive_samples, reverse=True)[:n]


def parse_collapsed(who: str, text: str) -> Profile:
    """A Profile from py-spy's raw (collapsed stack) output: ``f1 (file:line);f2 (...) COUNT`` lines."""
    self_counts: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        self_counts[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    functions = tuple(FunctionShare(name, self_counts[name], inclusive[name]) for name in inclusive)
    return Profile(who, total, functions)


@contextlib.contextmanager
def sampling(targets: Sequence[tuple[str, int]]) -> Iterator[list[Profile]]:
    """Sample each (name, pid) while the block runs; the yielded list is filled on exit."""
    exe = py_spy_path() if targets else ""
    profiles: list[Profile] = []
    with tempfile.TemporaryDirectory(prefix="pqbench-profile-") as tmp:
        runs = []
        for who, pid in targets:
            out = Path(tmp) / f"{who}.txt"
            argv = [exe, "record", "--pid", str(pid), "--rate", str(SAMPLE_RATE_HZ), "--format", "raw",
                    "--function", "--nonblocking", "--output", str(out)]
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            runs.append((who, proc, out))
        try:
            yield profiles
        finally:
            for who, proc, out in runs:
                _stop(proc)
                text = out.read_text() if out.exists() else ""
                profiles.append(parse_collapsed(who, text))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Ask py-spy to finish (SIGINT writes its output file) and reap it."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _short(frame: str) -> str:
    """``name (path:line)`` with the path cut to its package-relative tail."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "/lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})" if where else name


def format_profiles(row: str, profiles: Sequence[Profile], top: int = TOP) -> str:
    """The summary printed after a row: per daemon, top functions by self and by inclusive time."""
    lines = [f"   profile of {row} (py-spy, {SAMPLE_RATE_HZ} Hz, on-CPU samples only):"]
    for prof in profiles:
        if prof.samples == 0:
            lines.append(f"     {prof.who}: no samples")
            continue
        secs = prof.samples / SAMPLE_RATE_HZ
        lines.append(f"     {prof.who}: {prof.samples} samples (~{secs:.1f} CPU-s of Python threads)")
        lines.append("       self %  function")
        for f in prof.top_self(top):
            lines.append(f"       {100 * f.self_samples / prof.samples:5.1f}  {_short(f.name)}")
        lines.append("       incl %  pqtunnel/daemon function (with its callees)")
        for f in prof.top_inclusive_ours(top):
            lines.append(f"       {100 * f.inclusive_samples / prof.samples:5.1f}  {_short(f.name)}")
    return "\n".join(lines)
