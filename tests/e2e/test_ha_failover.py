"""End to end, the HA promise under faults (docs/ha.md, issue 8): three replicas of bob share
one identity and a real 3-member etcd cluster; alice pulls data through SOCKS with curl
while the replica serving her is killed (SIGKILL) and restarted, or frozen (SIGSTOP) and
thawed, again and again, and the etcd leader is killed once mid-run.

Every byte between alice and the replicas crosses a capturing relay (pqlab/relay.py), one
per replica, so the invariants are checked on the wire itself:

* no (session id, direction, counter) is ever sent twice: no AEAD nonce is reused;
* sessions move: one session id is seen through two different replicas;
* every fetch that completes is intact (failed fetches during a failover are allowed).

Two more tests replay what an attacker on the path would have captured: a record from
before a move, injected into the new connection, and a RESUME replayed on a new connection
to another replica. Both are refused, and the session goes on.
"""

from __future__ import annotations

import hashlib
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pqlab.etcd import EtcdCluster
from pqlab.relay import C2R, RecordSeen, repeated_nonces, scan_frames
from pqlab.replicas import Replica, ReplicaLab
from pqtunnel.wire import Kind
from tests.http_fixture import HttpServer, body_digest

PAYLOAD = 4 * 1024 * 1024
SEED = 8
DIGEST = body_digest(PAYLOAD, SEED)
ALICE_CONFIG = "[timers]\nkeepalive = 1\ndead_after = 3\n"  # a frozen replica is given up on after 3 s
SCHEDULE = ("kill", "freeze", "kill", "kill+freeze", "etcd-leader", "kill", "freeze", "kill", "kill+freeze", "freeze",
            "kill")
"""``kill+freeze``: the serving replica dies while another is frozen, so only the third can take over."""
RUN_BUDGET = 75.0
"""Seconds the fault schedule may take; faults left when it runs out are skipped (and counted)."""
FREEZE_SECONDS = 4.5
MIN_COMPLETED = 8
FETCHERS = 2


@dataclass
class Fetch:
    started: float
    seconds: float
    completed: bool
    """curl exited 0: the whole body arrived with its Content-Length."""
    digest: str
    detail: str


@dataclass
class ChaosRun:
    """What happened during the run, for the tests below to judge."""

    fetches: list[Fetch] = field(default_factory=list)
    faults: list[tuple[float, str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    migrations_seen: int = 0
    alice_session_ids: set[str] = field(default_factory=set)
    records: list[RecordSeen] = field(default_factory=list)
    logs: dict[str, str] = field(default_factory=dict)
    serving_at_end: tuple[list[str], str] = ([], "")
    """(``replica`` of alice's sessions, the replica whose relay carried her traffic), at the end."""


def curl_fetch(socks_port: int, max_time: float = 20) -> Fetch:
    """One GET of the payload through alice's SOCKS port, by real curl, hashed."""
    started = time.monotonic()
    result = subprocess.run(
        ["curl", "-sS", "--socks5-hostname", f"127.0.0.1:{socks_port}", "--max-time", str(max_time),
         "-o", "-", f"http://web.bob.pq/bytes/{PAYLOAD}/{SEED}"], capture_output=True, timeout=max_time + 10)
    return Fetch(started, time.monotonic() - started, result.returncode == 0,
                 hashlib.sha256(result.stdout).hexdigest(), result.stderr.decode(errors="replace").strip())


def fetch_until_ok(lab: ReplicaLab, timeout: float = 30) -> Fetch:
    deadline = time.monotonic() + timeout
    while True:
        fetch = curl_fetch(lab.socks_port)
        if fetch.completed or time.monotonic() > deadline:
            assert fetch.completed, f"no fetch completed within {timeout:.0f} s: {fetch.detail}"
            assert fetch.digest == DIGEST
            return fetch
        time.sleep(0.2)


def fetch_forever(lab: ReplicaLab, stop: threading.Event, into: list[Fetch]) -> None:
    while not stop.is_set():
        fetch = curl_fetch(lab.socks_port)
        into.append(fetch)
        if not fetch.completed:
            time.sleep(0.1)  # a failover is under way; do not spin


def alice_sessions(lab: ReplicaLab) -> list[dict]:
    assert lab.alice is not None
    return [s for s in lab.alice.sessions() if s.get("peer") == "bob"]


def wait_for_serving(lab: ReplicaLab, timeout: float = 10) -> Replica | None:
    """The replica that carries alice's traffic now: live connection, data in the last second."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replica = lab.serving()
        if replica is not None and replica.running and not replica.frozen and replica.relay is not None:
            last = max((c.last_data or 0 for c in replica.relay.live()), default=0)
            if time.monotonic() - last < 1.0:
                return replica
        time.sleep(0.05)
    return None


def wait_for_progress(run: ChaosRun, since: float, timeout: float = 15) -> None:
    """Until a fetch started after ``since`` completed (the tunnel works again) or ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not any(f.completed and f.started >= since for f in list(run.fetches)):
        time.sleep(0.1)


def note_alice(lab: ReplicaLab, run: ChaosRun) -> None:
    for session in alice_sessions(lab):
        run.migrations_seen = max(run.migrations_seen, int(session.get("migrations") or 0))
        run.alice_session_ids.add(session["session_id"])


def inflict(fault: str, lab: ReplicaLab, cluster: EtcdCluster, run: ChaosRun) -> None:
    if fault == "etcd-leader":
        leader = cluster.leader()
        cluster.kill(leader)
        run.faults.append((time.monotonic(), fault, leader.name))
        return
    replica = wait_for_serving(lab)
    if replica is None:
        run.skipped.append(f"{fault}: no replica was serving")
        return
    run.faults.append((time.monotonic(), fault, replica.name))
    if fault == "kill":
        replica.kill()
        time.sleep(0.5)
        replica.start()
    elif fault == "kill+freeze":
        other = next(r for r in lab.members if r is not replica)
        other.freeze()
        replica.kill()
        wait_for_progress(run, since=time.monotonic(), timeout=FREEZE_SECONDS * 2)
        replica.start()
        other.thaw()
    else:
        replica.freeze()
        time.sleep(FREEZE_SECONDS)
        replica.thaw()


@pytest.fixture(scope="module")
def cluster() -> Iterator[EtcdCluster]:
    with EtcdCluster() as started:
        yield started


@pytest.fixture(scope="module")
def web() -> Iterator[list[int]]:
    servers = [HttpServer() for _ in range(3)]
    for server in servers:
        server.__enter__()
    yield [server.port for server in servers]
    for server in servers:
        server.__exit__(None, None, None)


def lab_on(root: Path, cluster: EtcdCluster, web: list[int]) -> ReplicaLab:
    return ReplicaLab(root, web_ports=web, store="etcd", etcd=cluster.endpoints, alice_config=ALICE_CONFIG)


@pytest.fixture(scope="module")
def chaos(cluster: EtcdCluster, web: list[int], tmp_path_factory: pytest.TempPathFactory) -> ChaosRun:
    """One run of the fault schedule, judged by the tests below."""
    run = ChaosRun()
    stop = threading.Event()
    with lab_on(tmp_path_factory.mktemp("chaos"), cluster, web) as lab:
        fetch_until_ok(lab)
        fetchers = [threading.Thread(target=fetch_forever, args=(lab, stop, run.fetches), daemon=True)
                    for _ in range(FETCHERS)]
        for fetcher in fetchers:
            fetcher.start()
        started = time.monotonic()
        try:
            for fault in SCHEDULE:
                if time.monotonic() - started > RUN_BUDGET:
                    run.skipped.append(f"{fault}: out of time")
                    continue
                wait_for_progress(run, since=run.faults[-1][0] if run.faults else started)
                note_alice(lab, run)
                inflict(fault, lab, cluster, run)
            wait_for_progress(run, since=run.faults[-1][0] if run.faults else started)
            note_alice(lab, run)
            serving = wait_for_serving(lab)
            run.serving_at_end = ([s.get("replica") for s in alice_sessions(lab)], serving.name if serving else "")
        finally:
            stop.set()
            for fetcher in fetchers:
                fetcher.join(30)
            run.records = lab.records()
            run.logs = lab.daemon_logs()
        for member in cluster.members:
            if not member.running:
                cluster.restart(member)
    return run


# --- the run under faults ------------------------------------------------------------------------------


def test_the_faults_really_happened(chaos: ChaosRun) -> None:
    """The harness did what the other tests rely on: kills, freezes, the leader, traffic on each relay."""
    kinds = [fault for _, fault, _ in chaos.faults]
    assert kinds.count("kill") >= 4 and kinds.count("freeze") >= 2 and kinds.count("kill+freeze") >= 1, \
        (chaos.faults, chaos.skipped)
    assert kinds.count("etcd-leader") == 1
    assert {r.replica for r in chaos.records} == {"r1", "r2", "r3"}, "not every replica served alice"
    assert len(chaos.records) > PAYLOAD * sum(f.completed for f in chaos.fetches) // (256 * 1024)


def test_no_counter_is_sent_twice_in_one_direction_of_one_session(chaos: ChaosRun) -> None:
    """The nonce invariant, on every byte of every relay: no (session id, direction, counter) twice."""
    repeats = repeated_nonces(chaos.records)
    shown = [(use, [(r.replica, r.connection, r.index) for r in sightings])
             for use, sightings in list(repeats.items())[:5]]
    assert not repeats, f"{len(repeats)} nonces used twice, e.g. {shown}"


def test_every_completed_fetch_is_intact_and_enough_of_them_completed(chaos: ChaosRun) -> None:
    completed = [f for f in chaos.fetches if f.completed]
    assert [f.digest for f in completed] == [DIGEST] * len(completed)
    failed = [f.detail for f in chaos.fetches if not f.completed]
    assert len(completed) >= MIN_COMPLETED, f"{len(completed)} completed, {len(failed)} failed: {failed[:5]}"


def test_a_session_moved_through_two_replicas(chaos: ChaosRun) -> None:
    replicas_by_session: dict[str, set[str]] = {}
    for record in chaos.records:
        replicas_by_session.setdefault(record.session_id, set()).add(record.replica)
    moved = {sid: names for sid, names in replicas_by_session.items() if len(names) >= 2}
    assert moved, (f"no session id crossed two replicas: {len(replicas_by_session)} sessions, each on one replica "
                   "(every failover was a new handshake)")


def test_alice_counted_the_migrations(chaos: ChaosRun) -> None:
    assert chaos.migrations_seen >= 1, f"alice's sessions never showed migrations >= 1 ({chaos.alice_session_ids})"


def test_alice_names_the_replica_her_traffic_crosses(chaos: ChaosRun) -> None:
    names, serving = chaos.serving_at_end
    assert serving and names == [serving]


def test_no_daemon_died_of_a_traceback(chaos: ChaosRun) -> None:
    assert {name: "Traceback" in text for name, text in chaos.logs.items()} == {name: False for name in chaos.logs}


# --- replays after a move ------------------------------------------------------------------------------


@dataclass
class Moved:
    """A session that moved from ``old`` to ``new`` (old killed and restarted since)."""

    session_id: str
    old: Replica
    new: Replica
    before: RecordSeen
    """A record alice sent to ``old`` before the move."""
    resume: RecordSeen
    """The first RECORD frame alice sent to ``new``: her RESUME."""


def records_of(replica: Replica, session_id: str, direction: str = C2R) -> list[RecordSeen]:
    assert replica.relay is not None
    return [r for r in replica.relay.records() if r.session_id == session_id and r.direction == direction]


def move_session(lab: ReplicaLab) -> Moved:
    fetch_until_ok(lab)
    [session] = alice_sessions(lab)
    old = wait_for_serving(lab, timeout=2) or lab.serving()
    assert old is not None
    before = [r for r in records_of(old, session["session_id"]) if r.complete][-1]
    old.kill()
    fetch_until_ok(lab)
    after = alice_sessions(lab)
    assert [s["session_id"] for s in after] == [session["session_id"]], \
        f"alice's session after the kill is {after}, not {session['session_id']} resumed (a new handshake)"
    new = next(r for r in lab.members if r is not old and records_of(r, session["session_id"]))
    resume = next(r for r in records_of(new, session["session_id"]) if r.index == 0)
    old.start()
    return Moved(session["session_id"], old, new, before, resume)


def new_log_lines(replica: Replica, since: int, pattern: str, timeout: float = 10) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in replica.logs()[since:].splitlines() if re.search(pattern, line, re.IGNORECASE)]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


@pytest.fixture
def lab(cluster: EtcdCluster, web: list[int], tmp_path: Path) -> Iterator[ReplicaLab]:
    with lab_on(tmp_path, cluster, web) as started:
        yield started


def test_a_record_from_before_a_move_injected_into_the_new_connection_is_refused(lab: ReplicaLab) -> None:
    moved = move_session(lab)
    assert moved.new.relay is not None
    [connection] = [c for c in moved.new.relay.live() if any(r.session_id == moved.session_id for r in c.records())]
    log_size = len(moved.new.logs())
    connection.inject(moved.before.frame)
    refusals = new_log_lines(moved.new, log_size, rf"\b{moved.before.counter}\b.*replay")
    assert len(refusals) == 1, f"{moved.new.name} did not log the replayed record {moved.before.counter}: {refusals}"
    fetch_until_ok(lab)  # the session goes on
    assert [s["session_id"] for s in alice_sessions(lab)] == [moved.session_id]
    assert "Traceback" not in moved.new.logs()


def resume_replayed_to(replica: Replica, resume: bytes) -> list[int]:
    """Send a captured RESUME as the first frame of a new connection (through the replica's relay);
    the kinds of the frames that came back before the replica closed the connection."""
    assert replica.relay is not None
    with socket.create_connection(("127.0.0.1", replica.relay.port), timeout=10) as sock:
        sock.sendall(resume)
        answer = bytearray()
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    return [frame.kind for frame in scan_frames(answer)]


def test_a_resume_replayed_on_a_new_connection_to_another_replica_is_refused(lab: ReplicaLab) -> None:
    moved = move_session(lab)
    for other in [r for r in lab.members if r is not moved.new]:
        log_size = len(other.logs())
        kinds = resume_replayed_to(other, moved.resume.frame)
        assert Kind.RECORD not in kinds, f"{other.name} answered a replayed RESUME with a record: {kinds}"
        refusals = new_log_lines(other, log_size, f"{moved.session_id}.*refused")
        assert refusals, f"{other.name} did not log the refused RESUME of {moved.session_id}"
    fetch_until_ok(lab)
    assert [s["session_id"] for s in alice_sessions(lab)] == [moved.session_id]
