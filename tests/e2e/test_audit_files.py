"""The audit writer (daemon/audit.py) on real files: rotation by size and on reopen, a chain
that spans the rotated files, and a real full disk (a tiny tmpfs): the failure is counted,
no partial line is left behind, an ``audit_gap`` line tells what was lost, and while the
disk is full a required audit refuses new sessions and streams.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import trio

from pqtunnel.audit import verify
from pqtunnel.events import StreamAllowed
from pqtunnel.policy import PeerRequest, Policy, StreamRequest
from pqtunnel.audit import audit_required_rule
from pqtunneld.audit import AuditLog, chain_files, read_chain, read_records


def clock() -> Iterator[str]:
    second = 0
    while True:
        second += 1
        yield f"2026-12-01T10:{second // 60:02d}:{second % 60:02d}.000Z"


def audit_log(path: Path, *, required: bool = False, max_bytes: int = 1 << 20) -> AuditLog:
    ticks = clock()
    return AuditLog(path, required=required, max_bytes=max_bytes, node="bob", fingerprint="pq1:bob",
                    clock=lambda: next(ticks))


def stream_event(n: int, reason_size: int = 0) -> StreamAllowed:
    return StreamAllowed("alice", "pq1:alice", n, "service web", "service:web" + "x" * reason_size, service="web")


def records(path: Path) -> list[dict]:
    return [r for r in read_records(read_chain(path)) if isinstance(r, dict)]


def test_a_new_chain_starts_with_an_anchored_audit_opened_line(tmp_path: Path) -> None:
    log = audit_log(tmp_path / "audit.jsonl")
    log.open()
    log.record(stream_event(1))
    log.close()
    first, second = records(tmp_path / "audit.jsonl")
    assert (first["event"], first["chain"], first["node"]) == ("audit_opened", "new", "bob")
    assert second["prev"] == first["hash"] and second["stream_id"] == 1
    assert oct((tmp_path / "audit.jsonl").stat().st_mode & 0o777) == "0o600"


def test_size_rotation_continues_the_chain_across_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = audit_log(path, max_bytes=4096)
    log.open()
    for n in range(60):
        log.record(stream_event(n))
    log.close()
    files = chain_files(path)
    assert len(files) >= 4 and files[-1] == path and files[0].name == f"audit.jsonl.{len(files) - 1}"
    assert all(f.stat().st_size <= 4096 for f in files)
    result = verify(read_chain(path))
    assert result.ok and result.lines == 61
    newest_rotated = json.loads(files[-2].read_bytes().splitlines()[-1])
    assert json.loads(path.read_bytes().splitlines()[0])["prev"] == newest_rotated["hash"]


def test_reopening_rotates_the_last_run_and_continues_its_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    for run in range(3):
        log = audit_log(path)
        log.open()
        log.record(stream_event(run))
        log.close()
    assert [f.name for f in chain_files(path)] == ["audit.jsonl.2", "audit.jsonl.1", "audit.jsonl"]
    opened = [r for r in records(path) if r["event"] == "audit_opened"]
    assert [r["chain"] for r in opened] == ["new", "continued", "continued"]
    assert verify(read_chain(path)).ok


def test_a_crash_mid_line_is_kept_as_evidence_and_the_next_run_continues_after_it(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = audit_log(path)
    log.open()
    log.record(stream_event(1))
    log.close()
    last_whole = records(path)[-1]["hash"]
    with path.open("ab") as handle:
        handle.write(b'{"event":"stream_allowed","pe')  # what a crash during a write leaves
    restarted = audit_log(path)
    restarted.open()
    restarted.close()
    assert json.loads(path.read_bytes().splitlines()[0])["prev"] == last_whole
    problem = verify(read_chain(path)).problem
    assert problem is not None and (problem.source, problem.number, problem.kind) == ("audit.jsonl.1", 3, "truncated")


def test_a_path_that_is_not_a_regular_file_is_never_rotated_or_written(tmp_path: Path) -> None:
    fifo = tmp_path / "audit.jsonl"
    os.mkfifo(fifo)
    log = audit_log(fifo, required=True)
    log.open()
    assert log.problem is not None and "not a regular file" in log.problem
    assert log.refusal() is not None and not (tmp_path / "audit.jsonl.1").exists()


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB filesystem, to be filled up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


def fill(disk: Path, leave_bytes: int = 0) -> Path:
    """Fill ``disk`` up, then free ``leave_bytes`` (rounded to pages by the filesystem)."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    if leave_bytes:
        os.truncate(filler, max(0, filler.stat().st_size - leave_bytes))
    return filler


def test_a_full_disk_loses_no_line_silently_and_leaves_no_partial_line(tiny_disk: Path) -> None:
    path = tiny_disk / "audit.jsonl"
    log = audit_log(path, required=True)
    log.open()
    log.record(stream_event(1))
    filler = fill(tiny_disk, leave_bytes=4096)
    for n in range(2, 40):  # big records: the one that no longer fits is cut off mid-write
        log.record(stream_event(n, reason_size=1500))
    assert log.problem == "No space left on device" and log.lost > 0
    assert verify(read_chain(path)).ok, "a partly written line was left in the file"
    refusal = log.refusal()
    assert refusal is not None and "No space left on device" in refusal and "[audit] required = true" in refusal

    lost = log.lost
    filler.unlink()
    log.record(stream_event(99))
    log.close()
    assert log.problem is None and log.refusal() is None
    gap, last = records(path)[-2:]
    assert (gap["event"], gap["lost"], gap["reason"]) == ("audit_gap", lost, "No space left on device")
    assert gap["since"] <= gap["ts"] and last["stream_id"] == 99
    assert verify(read_chain(path)).ok


def test_while_a_required_audit_is_full_the_policy_refuses_sessions_and_streams(tiny_disk: Path) -> None:
    log = audit_log(tiny_disk / "audit.jsonl", required=True)
    rule = audit_required_rule(log.refusal)
    policy = Policy("bob", pins={"alice": "pq1:alice"}, services={"web": "127.0.0.1:80"},
                    extra_rules={PeerRequest: [rule], StreamRequest: [rule]})
    log.open()
    assert policy.decide(StreamRequest(peer="alice", target={"service": "web"})).allowed
    filler = fill(tiny_disk)
    log.record(stream_event(1, reason_size=8000))
    session = policy.decide(PeerRequest(fingerprint="pq1:alice", now=0, dialled="alice"))
    stream = policy.decide(StreamRequest(peer="alice", target={"service": "web"}))
    assert (session.allowed, session.rule, stream.allowed, stream.rule) == (False, "audit-required",
                                                                           False, "audit-required")
    filler.unlink()

    async def retry_once() -> None:  # the node's audit task retries on its own, without new events
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.run)
            with trio.fail_after(10):
                while log.problem is not None:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    trio.run(retry_once)
    log.close()
    assert policy.decide(StreamRequest(peer="alice", target={"service": "web"})).allowed
    assert records(tiny_disk / "audit.jsonl")[-1]["event"] == "audit_gap"
