"""The audit file: writes the hash chain (``pqtunnel.audit``) from the node's event bus,
rotates it, and reads it back for ``pqtunnel audit``.

Writing. ``AuditLog.record`` subscribes to the event bus: one line per audited event,
written with a single ``os.write`` on an ``O_APPEND`` descriptor (no user-space buffer, so a
line is in the kernel when the event returns and survives a crash of the daemon). ``fsync``
runs in a worker thread 100 ms later (``AuditLog.run``): every line written before an fsync
starts is on disk when it ends (group commit), so a burst of streams costs one fsync, not
one per line, and the event loop never waits for the disk.

Failures. A full disk or an unwritable file is logged as an error at once and every 30 s
while it lasts; the events meanwhile are counted, and the first line written afterwards is
an ``audit_gap`` record saying how many were lost and since when. A partly written line is
cut off again (``ftruncate``) so the file stays a chain. With ``[audit] required = true``,
``refusal`` names the problem and the node's Policy refuses new sessions and streams with
it (rule ``audit-required``) until the file can be written again.

Files. ``audit.jsonl`` is the current file; rotated files are ``audit.jsonl.1`` (newest)
... ``audit.jsonl.N`` (oldest). The current file is rotated when a line would take it past
``[audit] max_bytes``, and when the daemon starts (each run writes its own file, so a line
cut short by a crash stays where it happened). A new file continues the chain: its first
``prev`` is the last hash of the file before it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import trio

from pqtunnel import audit as chain
from pqtunnel.errors import UserError
from pqtunnel.events import Event

from .config import NodeConfig
from .logs import LOG

RETRY_SECONDS = 5.0
SYNC_DELAY_SECONDS = 0.1
"""Lines written within this long share one fsync: a power cut loses at most this much of the
audit, and a stream costs no fsync of its own (one per stream added ~0.6 ms to a new stream)."""
REMIND_SECONDS = 30.0
TAIL_BYTES = 1024 * 1024
"""How much of the newest file is read to find the hash a new file continues from."""


class AuditFileError(UserError):
    """The audit files cannot be read (missing, unreadable, not a regular file)."""


class BadTimeError(UserError):
    """``--since`` is neither an ISO 8601 time nor a duration such as 30m, 2h or 7d."""


def utc_timestamp(now: datetime | None = None) -> str:
    """``ts`` of a record: UTC, ISO 8601, milliseconds, ``Z`` (sorts as text)."""
    moment = now or datetime.now(timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- the files ---------------------------------------------------------------------------------------


def rotated(path: Path, index: int) -> Path:
    return path.with_name(f"{path.name}.{index}")


def rotated_indexes(path: Path) -> list[int]:
    """The numbers of the rotated files that exist next to ``path``, ascending (1 = newest)."""
    pattern = re.compile(re.escape(path.name) + r"\.([1-9][0-9]*)")
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for name in names if (m := pattern.fullmatch(name)))


def chain_files(path: Path) -> list[Path]:
    """Every file of the chain, oldest first: ``path.N`` ... ``path.1``, then ``path``."""
    files = [rotated(path, i) for i in reversed(rotated_indexes(path))]
    return files + [path] if path.exists() else files


def read_chain(path: Path) -> list[chain.RawLine]:
    """All lines of all files, oldest first, as stored (for verification)."""
    files = chain_files(path)
    if not files:
        raise AuditFileError(f"no audit file at {path} (the daemon writes it; [audit] path moves it)")
    lines: list[chain.RawLine] = []
    for file in files:
        lines += chain.split_lines(file.name, _read_bytes(file))
    return lines


def _read_bytes(file: Path) -> bytes:
    try:
        if not stat.S_ISREG(file.stat().st_mode):
            raise AuditFileError(f"audit file {file} is not a regular file")
        return file.read_bytes()
    except OSError as exc:
        raise AuditFileError(f"cannot read audit file {file}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class Unreadable:
    """A stored line that does not decode, reported instead of silently skipped."""

    where: str
    reason: str


def read_records(lines: Sequence[chain.RawLine]) -> Iterator[dict[str, Any] | Unreadable]:
    """The stored records, oldest first, with their ``prev`` and ``hash`` (or Unreadable)."""
    for raw in lines:
        try:
            line = chain.decode_line(raw.data)
        except chain.AuditFormatError as exc:
            yield Unreadable(raw.where, str(exc))
            continue
        yield {**line.fields, "hash": line.hash}


def since_filter(records: Iterator[dict[str, Any] | Unreadable], since: str | None) -> list[dict[str, Any] | Unreadable]:
    """Records stamped at or after ``since`` (a ``utc_timestamp``); every record when None."""
    return [r for r in records if since is None or isinstance(r, Unreadable)
            or (isinstance(r.get("ts"), str) and r["ts"] >= since)]


SHOWN_FIELDS = ("peer", "fingerprint", "addr", "service", "port", "target", "decision", "rule", "suite", "kem",
                "signature", "aead", "bytes_in", "bytes_out", "duration", "reason")
"""The order ``pqtunnel audit`` shows fields in; any others follow, sorted."""


def render_record(record: dict[str, Any]) -> str:
    """One record as one line of text: time, event, then key=value (chain fields left out)."""
    rest = {k: v for k, v in record.items() if k not in ("ts", "event", "prev", "hash")}
    keys = [k for k in SHOWN_FIELDS if k in rest] + sorted(k for k in rest if k not in SHOWN_FIELDS)
    pairs = " ".join(f"{k}={_text(rest[k])}" for k in keys)
    return f"{record.get('ts', '-')} {record.get('event', '-'):<15} {pairs}".rstrip()


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return json.dumps(text) if (not text or any(c.isspace() or c in "\"=" for c in text)) else text


def render_verification(result: chain.Verification, files: Sequence[Path]) -> str:
    if result.problem is not None:
        return str(result.problem)
    names = ", ".join(f.name for f in files)
    return (f"chain intact: {result.lines} line(s) in {len(files)} file(s) ({names}); anchor {result.anchor}; "
            f"last hash {result.last_hash}")


def render_report(report: dict[str, Any], verdict: str) -> list[str]:
    """The compliance report as text, for humans (``--json`` has every number)."""
    pq = report["post_quantum"]
    lines = [f"audit of {', '.join(report['nodes']) or 'unknown node'}: {report['first'] or '-'} .. "
             f"{report['last'] or '-'}, {report['lines']} record(s); {verdict}",
             f"sessions: {report['sessions']}, {report['bytes']} B",
             f"post-quantum: {pq['sessions']} of {report['sessions']} session(s) ({_share(pq['share_of_sessions'])}), "
             f"{pq['bytes']} of {report['bytes']} B ({_share(pq['share_of_bytes'])})"]
    for key, title in (("by_kem", "KEM"), ("by_signature", "signature"), ("by_aead", "AEAD")):
        lines.append(f"by {title}:")
        lines += [f"  {name:<24} {row['sessions']:>6} session(s) {row['bytes']:>14} B"
                  for name, row in report[key].items()] or ["  -"]
    lines.append("legacy (non-post-quantum) sessions:")
    lines += [f"  {row['started'] or '-'} {row['peer']} {row['fingerprint']} {row['addr']} {row['suite']} "
              f"({row['kem']}, {row['signature']}) {row['bytes']} B" for row in report["legacy_sessions"]] or ["  none"]
    denials = report["denials"]
    lines.append(f"denials: {denials['total']}" + "".join(f"\n  {rule:<24} {count}"
                                                        for rule, count in denials["by_rule"].items()))
    lines.append("peers never seen with a post-quantum suite:")
    lines += [f"  {row['peer']} ({row['sessions']} session(s)) {' '.join(row['fingerprints'])}"
              for row in report["peers_never_post_quantum"]] or ["  none"]
    streams = report["streams"]
    lines.append(f"streams: {streams['allowed']} allowed, {streams['denied']} denied, {streams['closed']} closed; "
                 f"handshakes failed: {report['handshakes_failed']}; events lost (audit gaps): {report['lost_events']}")
    reloads = report["reloads"]
    lines.append(f"reloads: {reloads['applied']} applied, {reloads['refused']} refused (previous policy kept)")
    migrations = report.get("migrations", [])
    lines.append(f"migrations (peers pinned through a legacy anchor): {len(migrations)}" + "".join(
        f"\n  {m['peer']:<16} {m['fingerprint']} {m['method']} {m['ts']}" for m in migrations))
    return lines


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:g} %"


def parse_since(text: str, now: datetime | None = None) -> str:
    """``--since``: an ISO 8601 time (UTC unless it says otherwise) or a duration back from
    now (``90s``, ``30m``, ``2h``, ``7d``), as a ``ts`` to compare records with."""
    now = now or datetime.now(timezone.utc)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if match:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
        return utc_timestamp(now - timedelta(**{unit: float(match.group(1))}))
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise BadTimeError(f"--since {text!r}: expected a time like 2026-12-01T10:00 or a duration like 30m, 2h, 7d") \
            from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return utc_timestamp(moment)


# --- the writer --------------------------------------------------------------------------------------


class AuditLog:
    """The node's audit file. ``record`` is the event-bus subscriber; ``run`` (in the node's
    nursery) fsyncs and retries; ``refusal`` feeds the Policy's ``audit-required`` rule."""

    def __init__(self, path: Path, *, required: bool, max_bytes: int, node: str, fingerprint: str,
                 clock: Callable[[], str] = utc_timestamp) -> None:
        self.path = path
        self.required = required
        self.max_bytes = max_bytes
        self.node = node
        self.fingerprint = fingerprint
        self.clock = clock
        self.problem: str | None = None
        self.failing_since: str | None = None
        self.lost = 0
        self._fd: int | None = None
        self._size = 0
        self._prev: str | None = None
        self._unsynced = False
        self._wake = trio.Event()

    @classmethod
    def for_node(cls, config: NodeConfig, node: str, fingerprint: str) -> AuditLog:
        return cls(config.audit_path, required=config.audit.required, max_bytes=config.audit.max_bytes,
                   node=node, fingerprint=fingerprint)

    # --- what the node asks ------------------------------------------------------------------------

    def refusal(self) -> str | None:
        """Why new sessions and streams must be refused now (None: go ahead)."""
        if not self.required or self.problem is None:
            return None
        return f"audit log {self.path} cannot be written ({self.problem}) and [audit] required = true"

    def record(self, event: Event) -> None:
        """The event-bus subscriber: one chained line per audited event."""
        record = chain.record_for(event, self.clock())
        if record is not None:
            self.write(record)

    def write(self, record: dict[str, Any]) -> bool:
        """Append ``record`` (after an ``audit_gap`` line if events were lost); False if it was lost."""
        try:
            if self._fd is None:
                self._open()
            if self.problem is not None:
                self._append(self._gap_record())
                self._recovered()
            self._append(record)
        except OSError as exc:
            self._failed(exc)
            return False
        return True

    def open(self) -> None:
        """Start this run's file (rotating the last run's), beginning with ``audit_opened``.
        A failure is logged and remembered, never raised: the node decides what it means."""
        try:
            self._open()
        except OSError as exc:
            self._failed(exc, counted=False)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.fsync(fd)
            except OSError as exc:
                LOG.error("AUDIT: cannot sync %s on close: %s", self.path, _reason(exc))
            os.close(fd)

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Group-commit fsync after writes; while the file is failing, retry and remind."""
        task_status.started()
        last_reminder = trio.current_time()
        while True:
            with trio.move_on_after(RETRY_SECONDS):
                await self._wake.wait()
            self._wake = trio.Event()
            if self._unsynced and self._fd is not None:
                await trio.sleep(SYNC_DELAY_SECONDS)  # let a burst of lines gather: one fsync for all
                if self._fd is not None:
                    await self._sync()
            if self.problem is not None:
                self._retry()
                if self.problem is not None and trio.current_time() - last_reminder >= REMIND_SECONDS:
                    last_reminder = trio.current_time()
                    LOG.error("AUDIT: %s still cannot be written (%s); %d event(s) not recorded%s", self.path,
                              self.problem, self.lost, self._consequence())

    # --- internals ---------------------------------------------------------------------------------

    def _open(self) -> None:
        """Rotate a non-empty current file, then open a fresh one continuing the chain."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._prev is None:
            self._prev = last_hash(self.path)
        _refuse_special(self.path)
        if self.path.exists() and self.path.stat().st_size > 0:
            self._rotate_names()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._fd, self._size = fd, os.fstat(fd).st_size
        new = self._prev is None
        if new:
            self._prev = chain.new_anchor()
        try:
            self._append({"ts": self.clock(), "event": chain.OPENED, "chain": chain.CHAIN_NEW if new else
                          chain.CHAIN_CONTINUED, "node": self.node, "fingerprint": self.fingerprint})
        except OSError:
            if new:
                self._prev = None
            raise

    def _append(self, record: dict[str, Any]) -> None:
        assert self._fd is not None and self._prev is not None
        line, digest = chain.encode_line(record, self._prev)
        if self._size > 0 and self._size + len(line) > self.max_bytes:
            self._rotate()
        try:
            written = 0
            while written < len(line):
                written += os.write(self._fd, line[written:])
        except OSError:
            self._cut_back()
            raise
        self._size += len(line)
        self._prev = digest
        self._unsynced = True
        self._wake.set()

    def _cut_back(self) -> None:
        """Remove a partly written line, so the file ends on a whole line again."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, self._size)
        except OSError as exc:
            LOG.error("AUDIT: cannot cut a partial line off %s: %s", self.path, _reason(exc))

    def _rotate(self) -> None:
        """Size rotation: close the full file and continue the chain in a fresh one."""
        self.close()
        self._rotate_names()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._fd, self._size = fd, 0

    def _rotate_names(self) -> None:
        for index in reversed(rotated_indexes(self.path)):
            os.rename(rotated(self.path, index), rotated(self.path, index + 1))
        os.rename(self.path, rotated(self.path, 1))

    async def _sync(self) -> None:
        """fsync a duplicate of the descriptor in a thread: a rotation may close the original
        meanwhile, and its number must never be synced as some other file."""
        assert self._fd is not None
        try:
            fd = os.dup(self._fd)
        except OSError:  # no descriptor free this moment (EMFILE): sync at the next wake-up
            return
        self._unsynced = False
        try:
            await trio.to_thread.run_sync(os.fsync, fd)
        except OSError as exc:
            self._failed(exc, counted=False)
        finally:
            os.close(fd)

    def _retry(self) -> None:
        """Write the gap record (after this run's first line, if that failed too) as soon as
        the file takes it."""
        if self._fd is None:
            self.open()
            if self._fd is None:
                return
        try:
            self._append(self._gap_record())
        except OSError as exc:
            self._failed(exc, counted=False)
            return
        self._recovered()

    def _gap_record(self) -> dict[str, Any]:
        """What the chain says about a time it could not be written: since when, why, and how
        many events are missing from it."""
        return {"ts": self.clock(), "event": chain.GAP, "lost": self.lost, "since": self.failing_since,
                "reason": self.problem or "unknown"}

    def _failed(self, exc: OSError, counted: bool = True) -> None:
        if counted:
            self.lost += 1
        first = self.problem is None
        self.problem = _reason(exc)
        if first:
            self.failing_since = self.clock()
            LOG.error("AUDIT: cannot write %s: %s; events are not being recorded%s", self.path, self.problem,
                      self._consequence())

    def _recovered(self) -> None:
        if self.problem is not None:
            LOG.warning("AUDIT: %s can be written again; %d event(s) were not recorded (see its audit_gap line)",
                        self.path, self.lost)
        self.problem, self.failing_since, self.lost = None, None, 0

    def _consequence(self) -> str:
        return "; new sessions and streams are refused ([audit] required = true)" if self.required else \
            " ([audit] required = false: the node keeps running unaudited)"


def _refuse_special(path: Path) -> None:
    """Only a regular file is ever rotated or written: never rename /dev/null or a FIFO."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise OSError(errno.EINVAL, f"{path} is not a regular file")


def last_hash(path: Path) -> str | None:
    """The hash a new file continues from: the last intact line of the newest file that has
    one (None: no chain yet, a new one starts)."""
    for file in reversed(chain_files(path)):
        _refuse_special(file)
        with file.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - TAIL_BYTES))
            tail = handle.read()
        digest = _last_intact(chain.split_lines(file.name, tail))
        if digest is not None:
            return digest
    return None


def _last_intact(lines: Sequence[chain.RawLine]) -> str | None:
    for raw in reversed(lines):
        if not raw.terminated:
            continue
        try:
            line = chain.decode_line(raw.data)
        except chain.AuditFormatError:
            continue
        if line.hash_ok:
            return line.hash
    return None


def _reason(exc: OSError) -> str:
    """``No space left on device``, or with the file named when the error has one."""
    text = exc.strerror or str(exc)
    return f"{text}: {exc.filename}" if exc.filename else text

