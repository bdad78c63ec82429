"""Hostile handover: attacks on moving a session between replicas of bob (docs/ha.md,
PROTOCOL.md 5.2), against real daemons on loopback.

Two replicas of bob share one identity and one SQLite nonce store; alice reaches each
through a capturing relay (pqlab/relay.py), so a test can cut her connection (a move),
capture her RESUME and records, and replay them. Each test names the attack it makes and
what must hold: a refusal in one log line, no traceback, the replicas serving on, and no
(session, direction, counter) sealed twice.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pqlab.relay import C2R, R2C, Relay, repeated_nonces, scan_frames
from pqtunnel.errors import ProtocolError
from pqtunnel.handshake import InitiatorHandshake
from pqtunnel.identity import Identity
from pqtunnel.session import Session, SessionState
from pqtunnel.wire import FrameDecoder, Kind, encode_frame
from pqtunneld.replicas import MOVE_BURST, SHARED_HELLO_BURST, SHARED_HELLO_INTERVAL
from pqtunneld.stores import load_identity
from tests.nodes import Daemon, init_node, pq, replica_home

ALICE_TIMERS = "[timers]\nkeepalive = 1\ndead_after = 4\n"
"""alice notices a frozen replica after 4 s (not 35), so a move happens within a test."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Lab:
    root: Path
    store: Path
    homes: list[Path]
    ports: list[int]
    replicas: list[Daemon]
    relays: list[Relay]
    alice: Daemon
    alice_home: Path
    fp_alice: str
    extra: list[Daemon] = field(default_factory=list)

    def ping(self) -> None:
        result = pq("ping", "bob", home=self.alice_home)
        assert result.returncode == 0, result.stderr

    def alice_session(self) -> dict:
        sessions = self.alice.sessions()
        assert len(sessions) == 1, sessions
        return sessions[0]

    def serving(self) -> int:
        """The index of the replica holding alice's session now."""
        replica = self.alice_session()["replica"]
        return int(replica[1:]) - 1

    def move(self) -> int:
        """Cut alice's connection to the serving replica (a network failure): she resumes at
        the other one. Returns the index of the replica serving afterwards."""
        before = self.alice_session()["migrations"]
        self.relays[self.serving()].cut()
        return self.wait_moved(before)

    def wait_moved(self, before: int, timeout: float = 20) -> int:
        """Wait until alice's session counts more than ``before`` moves; the serving replica."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sessions = self.alice.sessions()
            if sessions and sessions[0]["migrations"] > before:
                return self.serving()
            time.sleep(0.05)
        raise AssertionError(f"the session did not move:\n{self.alice.logs()}")

    def resumes(self) -> list[bytes]:
        """Every RESUME frame alice sent so far, in order (the first frame of a connection
        whose first frame is a RECORD)."""
        found = []
        for relay in self.relays:
            for connection in relay.connections():
                frames = list(scan_frames(connection.captured(C2R)))
                if frames and frames[0].kind == Kind.RECORD and frames[0].complete:
                    found.append((connection.opened, frames[0].data))
        return [data for _, data in sorted(found)]

    def resumed_streams(self) -> list[bytes]:
        """Everything alice sent on each connection that began with a RESUME, in order."""
        found = []
        for relay in self.relays:
            for connection in relay.connections():
                captured = connection.captured(C2R)
                frames = list(scan_frames(captured))
                if frames and frames[0].kind == Kind.RECORD and frames[0].complete:
                    found.append((connection.opened, captured))
        return [data for _, data in sorted(found)]

    def no_traceback(self) -> None:
        for daemon in [self.alice, *self.replicas, *self.extra]:
            assert "Traceback" not in daemon.logs(), daemon.logs()


def start_lab(root: Path, replica_config: str = "") -> Lab:
    bob_home, fp_bob = init_node(root, "bob")
    alice_home, fp_alice = init_node(root, "alice")
    store = root / "shared-nonces.sqlite"
    homes = [bob_home, replica_home(root, bob_home, "bob-r2")]
    ports = [free_port(), free_port()]
    replicas, relays = [], []
    for index, (home, port) in enumerate(zip(homes, ports), start=1):
        pq("trust", "alice", fp_alice, home=home)
        (home / "config.toml").write_text(
            f'[ha]\nstore = "local"\npath = "{store}"\nreplica = "r{index}"\n' + replica_config)
        replicas.append(Daemon(home, ["--listen", f"127.0.0.1:{port}"]).start())
        relays.append(Relay(f"r{index}", ("127.0.0.1", port)).start())
    pq("trust", "bob", fp_bob, home=alice_home)
    (alice_home / "config.toml").write_text(ALICE_TIMERS)
    alice = Daemon(alice_home, ["--peer", "bob=" + ",".join(r.address for r in relays)]).start()
    return Lab(root, store, homes, ports, replicas, relays, alice, alice_home, fp_alice)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = start_lab(tmp_path)
    try:
        lab.ping()
        yield lab
    finally:
        for daemon in [lab.alice, *lab.replicas, *lab.extra]:
            daemon.kill()
        for relay in lab.relays:
            relay.close()


def answer_to(port: int, data: bytes, *, timeout: float = 10, source: str = "127.0.0.1") -> bytes:
    """Send ``data`` as the first bytes of a connection to a replica; its answer (or b"")."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as sock:
        sock.sendall(data)
        try:
            return sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            return b""


def alert_of(answer: bytes) -> bytes:
    frames = FrameDecoder().feed(answer)
    assert frames and frames[0].kind is Kind.ALERT, answer
    return bytes(frames[0].body)


def wait_count(daemon: Daemon, text: str, count: int, timeout: float = 10) -> None:
    """Wait until ``text`` appears ``count`` times in the daemon's log (never more)."""
    deadline = time.monotonic() + timeout
    while daemon.logs().count(text) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon.logs().count(text) == count, daemon.logs()


def reset(sock: socket.socket) -> None:
    """Abort with RST, as a peer that vanished mid-frame."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# --- malformed first frames ----------------------------------------------------------------------------


def test_a_connection_reset_while_a_replica_waits_for_the_rest_of_a_first_record_costs_one_line(lab: Lab) -> None:
    """6 bytes of a RECORD header, silence past the first read's 10 s, then RST: the second
    read of the first frame meets the reset. The replica must refuse it in one line and live."""
    r1 = lab.replicas[0]
    sock = socket.create_connection(("127.0.0.1", lab.ports[0]))
    sock.sendall(struct.pack(">IB", 60, Kind.RECORD) + b"x")
    time.sleep(11)
    reset(sock)
    r1.wait_for_log("refused: the connection ended inside its first frame")
    time.sleep(0.5)
    assert r1.process is not None and r1.process.poll() is None, r1.logs()
    assert answer_to(lab.ports[0], encode_frame(Kind.RECORD, b"\x42" * 40))  # still answering
    lab.ping()
    lab.no_traceback()


MALFORMED = {
    "an empty RECORD": (encode_frame(Kind.RECORD, b""), "RESUME of session ? from"),
    "a RECORD shorter than a session id": (encode_frame(Kind.RECORD, b"abcde"), "RESUME of session ? from"),
    "a RECORD shorter than a record": (encode_frame(Kind.RECORD, b"\x01" * 20), "no session 0101010101010101"),
    "a RECORD of 127 bytes for no session": (encode_frame(Kind.RECORD, b"\x01" * 126), "no session 0101010101010101"),
    "an oversized RECORD": (encode_frame(Kind.RECORD, b"\x01" * 200), "exceeds the limit of 128"),
    "a RECORD claiming 4 GiB": (struct.pack(">IB", 0xFFFFFFFF, Kind.RECORD), "exceeds the limit of 128"),
    "a frame of length 0": (struct.pack(">IB", 0, Kind.RECORD), "frame length 0"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_first_record_is_refused_in_one_line_and_the_replica_serves_on(lab: Lab, name: str) -> None:
    data, logged = MALFORMED[name]
    assert b"unknown session" in alert_of(answer_to(lab.ports[0], data))
    lab.replicas[0].wait_for_log(logged)
    refusals = [line for line in lab.replicas[0].logs().splitlines() if "RESUME of session" in line]
    assert len(refusals) == 1, refusals
    lab.ping()
    lab.no_traceback()


# --- replays ------------------------------------------------------------------------------------------


def test_a_captured_resume_replayed_to_either_replica_after_the_move_is_refused(lab: Lab) -> None:
    """The RESUME that moved the session, replayed as the first frame of a new connection to
    the replica it reached and to the one it left: each RESUME is usable once, across replicas."""
    lab.move()
    (resume,) = lab.resumes()
    session = resume[5:13].hex()
    for index, port in enumerate(lab.ports):
        assert b"unknown session" in alert_of(answer_to(port, resume))
        lab.replicas[index].wait_for_log(f"RESUME of session {session} from")
        assert "was used before (replay)" in lab.replicas[index].logs()
    lab.ping()
    assert lab.alice_session()["migrations"] == 1
    lab.no_traceback()


def test_an_older_resume_replayed_after_a_later_move_is_refused(lab: Lab) -> None:
    """Two moves (r -> other -> r); the first RESUME replayed after the second is older than
    the used mark at every replica."""
    lab.move()
    lab.move()
    first, second = lab.resumes()
    for port in lab.ports:
        for resume in (first, second):
            assert b"unknown session" in alert_of(answer_to(port, resume))
    for replica in lab.replicas:
        wait_count(replica, "was used before (replay)", 2)
    lab.ping()
    lab.no_traceback()


def test_no_nonce_is_sealed_twice_across_quick_moves_and_a_frozen_replica(lab: Lab) -> None:
    """Moves in quick succession, then the serving replica frozen (SIGSTOP) until alice moves
    away, woken (SIGCONT) to send with its old block: every (session, direction, counter)
    on the wire is unique."""
    for _ in range(3):
        lab.move()
        lab.ping()
    frozen = lab.replicas[lab.serving()]
    assert frozen.process is not None
    frozen.process.send_signal(19)  # SIGSTOP
    try:
        lab.wait_moved(3, timeout=30)  # alice finds it silent (dead_after 4 s) and moves
        lab.ping()
    finally:
        frozen.process.send_signal(18)  # SIGCONT
    time.sleep(3)  # the woken replica sends what it had queued, then finds its peer gone
    lab.ping()
    records = [record for relay in lab.relays for record in relay.records()]
    assert len(records) > 20
    assert repeated_nonces(records) == {}
    assert lab.alice_session()["migrations"] == 4
    lab.no_traceback()


# --- the store's data ------------------------------------------------------------------------------


def store_rows(lab: Lab, sql: str, args: tuple = ()) -> list[tuple]:
    """Run one statement on the replicas' SQLite store, as someone with write access to it."""
    with sqlite3.connect(lab.store, timeout=10) as db:
        rows = db.execute(sql, args).fetchall()
    return rows


def test_a_resume_replayed_after_its_used_mark_was_deleted_from_the_store_is_refused(lab: Lab) -> None:
    """Someone who can write the store deletes ``<sid>.resume`` (the used-RESUME mark) and
    replays the captured RESUME: it must not open the session again (the captured records
    that followed it would then be accepted a second time)."""
    lab.move()
    (resume,) = lab.resumes()
    session = resume[5:13].hex()
    store_rows(lab, "DELETE FROM marks WHERE key_id = ?", (f"{session}.resume",))
    other = 1 - lab.serving()
    assert b"unknown session" in alert_of(answer_to(lab.ports[other], resume))
    lab.replicas[other].wait_for_log(f"RESUME of session {session} from")
    assert lab.alice_session()["migrations"] == 1
    lab.no_traceback()


def test_a_snapshot_swapped_for_another_sessions_is_refused_as_store_data(lab: Lab) -> None:
    """Two sessions on the replicas (alice's and carol's); the store's snapshot rows swapped:
    a move finds a blob bound to another state id, refuses it, and alice handshakes anew."""
    carol_home, fp_carol = init_node(lab.root, "carol")
    for home in lab.homes:
        pq("trust", "carol", fp_carol, home=home)
    bob_fp = pq("id", home=lab.homes[0]).stdout.split()[-1]
    pq("trust", "bob", bob_fp, home=carol_home)
    carol = Daemon(carol_home, ["--peer", "bob=" + ",".join(r.address for r in lab.relays)]).start()
    lab.extra.append(carol)
    assert pq("ping", "bob", home=carol_home).returncode == 0
    rows = store_rows(lab, "SELECT state_id, blob FROM states WHERE state_id LIKE 'session.%' ORDER BY state_id")
    assert len(rows) == 2, rows
    (first, blob_a), (second, blob_b) = rows
    store_rows(lab, "UPDATE states SET blob = ? WHERE state_id = ?", (blob_b, first))
    store_rows(lab, "UPDATE states SET blob = ? WHERE state_id = ?", (blob_a, second))
    before = lab.alice_session()["session_id"]
    lab.relays[lab.serving()].cut()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and lab.alice.sessions()[:1] and lab.alice_session()["session_id"] == before:
        time.sleep(0.1)
    lab.ping()
    assert lab.alice_session()["session_id"] != before and lab.alice_session()["migrations"] == 0
    refused = "\n".join(r.logs() for r in lab.replicas)
    assert "fails authentication (corrupt, or another node's)" in refused, refused
    lab.no_traceback()


# --- policy ---------------------------------------------------------------------------------------------


def refuse_alice_at(lab: Lab, index: int, config_tail: str = "", unpin: bool = False) -> None:
    """Change the policy of replica ``index`` (not the serving one) and reload it."""
    home = lab.homes[index]
    if unpin:
        pins = home / "known_peers"
        pins.write_text("".join(line for line in pins.read_text().splitlines(keepends=True) if "alice" not in line))
    if config_tail:
        with (home / "config.toml").open("a") as config:
            config.write(config_tail)
    result = pq("reload", home=home)
    assert result.returncode == 0, result.stderr


def move_refused_at(lab: Lab, index: int, reason: str) -> None:
    """Cut alice's connection: her RESUME at replica ``index`` is refused for ``reason``, and the
    session goes back to the replica it came from (tried last)."""
    served_by = lab.serving()
    assert served_by != index
    session = lab.alice_session()["session_id"]
    assert lab.move() == served_by
    logs = lab.replicas[index].wait_for_log(f"RESUME of session {session} from")
    refusal = [line for line in logs.splitlines() if f"RESUME of session {session}" in line]
    assert len(refusal) == 1 and reason in refusal[0], refusal
    assert lab.replicas[index].sessions() == []
    lab.ping()


def test_a_peer_unpinned_at_a_replica_cannot_move_its_session_there(lab: Lab) -> None:
    other = 1 - lab.serving()
    refuse_alice_at(lab, other, unpin=True)
    move_refused_at(lab, other, lab.fp_alice)
    lab.no_traceback()


def test_a_session_whose_suite_a_replica_no_longer_allows_cannot_move_there(lab: Lab) -> None:
    other = 1 - lab.serving()
    assert lab.alice_session()["suite"] == "hybrid"
    refuse_alice_at(lab, other, '[policy]\n[[policy.grant]]\nsrc = ["*"]\ndst = ["*"]\n'
                    '[[policy.trigger]]\noutside = ["10.0.0.0/8"]\nmin_suite = "pq-strong"\n')
    move_refused_at(lab, other, "suite hybrid is no longer allowed")
    lab.no_traceback()


# --- denial of service ------------------------------------------------------------------------------------


def hello_records(lab: Lab) -> int:
    """HELLO hashes in the shared replay cache: one store write (fsync'd) each."""
    return store_rows(lab, "SELECT count(*) FROM used_once WHERE kind = 'hello'")[0][0]


def test_garbage_hellos_cost_the_shared_store_nothing(lab: Lab) -> None:
    """A stranger's HELLO frames that the handshake refuses on their first bytes (wrong
    version, unknown suite, no payload, stale timestamp) spend no admission budget: they
    must not cost a write to the store the replicas share either."""
    before = hello_records(lab)
    an_hour_ago = int(time.time() * 1000) - 3_600_000
    stale = InitiatorHandshake(Identity.generate("mallory"), lambda peer: "bob").start(an_hour_ago)
    for _ in range(50):
        for frame in (encode_frame(Kind.HELLO, os.urandom(100)), encode_frame(Kind.HELLO, b"\x01\xee" + os.urandom(60)),
                      encode_frame(Kind.HELLO, b"\x01\x02" + os.urandom(1300)), stale):
            answer_to(lab.ports[0], frame)
    assert hello_records(lab) == before
    lab.ping()
    lab.no_traceback()


def test_a_flood_of_fresh_hellos_writes_the_shared_store_at_a_bounded_rate(lab: Lab) -> None:
    """Well-formed, fresh HELLOs (cheap to make: no signature) each ask for a write to the
    shared replay cache; past a node-wide budget a replica relies on its own cache instead,
    so a flood cannot saturate the store the counter reservations of every session need."""
    before = hello_records(lab)
    mallory = Identity.generate("mallory")
    started = time.monotonic()
    for index in range(400):  # from 100 addresses, as an attacker with a network of them
        hello = InitiatorHandshake(mallory, lambda peer: "bob").start(int(time.time() * 1000))
        answer_to(lab.ports[0], hello, source=f"127.0.1.{1 + index % 100}")
    elapsed = time.monotonic() - started
    written = hello_records(lab) - before
    assert written <= SHARED_HELLO_BURST + elapsed / SHARED_HELLO_INTERVAL + 1, (written, elapsed)
    lab.move()  # the store still serves a move
    lab.ping()
    lab.no_traceback()


def test_a_move_after_the_counter_mark_was_deleted_from_the_store_is_refused_in_one_line(lab: Lab) -> None:
    """Without ``<sid>.r2i`` nothing tells a replica which counters the session used: the
    taking-over replica seals nothing, refuses in one line, and alice handshakes anew."""
    session = lab.alice_session()["session_id"]
    store_rows(lab, "DELETE FROM marks WHERE key_id = ?", (f"{session}.r2i",))
    lab.relays[lab.serving()].cut()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not lab.alice.sessions() or lab.alice_session()["session_id"] == session):
        time.sleep(0.1)
    lab.ping()
    assert lab.alice_session()["session_id"] != session and lab.alice_session()["migrations"] == 0
    refusals = "\n".join(r.logs() for r in lab.replicas)
    assert "no counter mark is stored for this key" in refusals, refusals
    for relay in lab.relays:
        for connection in relay.connections():
            frames = list(scan_frames(connection.captured(C2R)))
            if frames and frames[0].kind == Kind.RECORD:  # a RESUME: the replica sealed nothing back
                assert [r for r in connection.records() if r.direction == R2C] == []
    lab.no_traceback()


def test_resumes_for_random_sessions_write_nothing_and_cost_no_admission_budget(lab: Lab) -> None:
    """A stranger's RESUMEs for sessions that do not exist cost one store read each: no write,
    nothing kept, the replica serves on."""
    marks, states = (store_rows(lab, f"SELECT count(*) FROM {table}")[0][0] for table in ("marks", "states"))
    for index in range(200):
        forged = encode_frame(Kind.RECORD, os.urandom(8) + (3).to_bytes(8, "big") + os.urandom(33))
        assert b"unknown session" in alert_of(answer_to(lab.ports[0], forged, source=f"127.0.2.{1 + index % 50}"))
    assert (store_rows(lab, "SELECT count(*) FROM marks")[0][0], store_rows(lab, "SELECT count(*) FROM states")[0][0]) \
        == (marks, states)
    lab.ping()
    lab.no_traceback()


# --- rekeys and moves ----------------------------------------------------------------------------------


@pytest.fixture
def rekeying_lab(tmp_path: Path) -> Iterator[Lab]:
    """The lab with replicas that rekey every second: every move is near a rekey."""
    lab = start_lab(tmp_path, "[timers]\nrekey_after = 1\n")
    try:
        lab.ping()
        yield lab
    finally:
        for daemon in [lab.alice, *lab.replicas]:
            daemon.kill()
        for relay in lab.relays:
            relay.close()


def test_moves_between_rekeys_continue_with_the_current_keys_and_no_nonce_twice(rekeying_lab: Lab) -> None:
    """Moves of a session rekeyed every second: the snapshot follows each rekey, so a move
    continues with the keys of now (or, cut inside a rekey, fails over to a handshake), and
    no (session, direction, counter) is ever on the wire twice."""
    lab = rekeying_lab
    moved = 0
    for _ in range(6):
        time.sleep(1.2)
        before = lab.alice_session()
        lab.relays[lab.serving()].cut()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            now = lab.alice.sessions()
            if now and (now[0]["session_id"] != before["session_id"] or now[0]["migrations"] > before["migrations"]):
                break
            time.sleep(0.05)
        lab.ping()
        moved += lab.alice_session()["session_id"] == before["session_id"]
    assert moved >= 3, moved
    assert "rekeyed" in lab.replicas[0].logs() + lab.replicas[1].logs()
    records = [record for relay in lab.relays for record in relay.records()]
    assert repeated_nonces(records) == {}
    lab.no_traceback()


def test_a_resumed_from_an_earlier_move_answered_to_alice_by_an_impostor_is_refused(lab: Lab) -> None:
    """Someone in the path answers alice's next RESUME with the RESUMED captured at the first
    move (a genuine record under the session's key): its counter is behind alice's, and its
    challenge is not hers. Alice refuses it and moves to a real replica."""
    first = lab.serving()
    second = lab.move()
    (moved,) = [c for c in lab.relays[second].connections()  # the connection alice's RESUME opened
                if getattr(next(scan_frames(c.captured(C2R)), None), "kind", None) == Kind.RECORD]
    resumed = next(scan_frames(moved.captured(R2C))).data
    lab.relays[first].close()
    impostor = socket.create_server(("127.0.0.1", lab.relays[first].port))
    answered = []

    def answer() -> None:
        conn, _ = impostor.accept()
        answered.append(conn.recv(4096))
        conn.sendall(resumed)
        time.sleep(1)
        conn.close()

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        session = lab.alice_session()
        lab.relays[second].cut()
        thread.join(20)
        assert answered and answered[0][4] == Kind.RECORD  # alice's RESUME reached the impostor
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and lab.alice_session()["migrations"] < 2:
            time.sleep(0.05)
    finally:
        impostor.close()
    after = lab.alice_session()
    assert after["session_id"] == session["session_id"] and after["migrations"] == 2
    assert after["replica"] == f"r{second + 1}"
    assert "is not above" in lab.alice.logs()  # the replayed RESUMED, refused by its counter
    lab.ping()
    lab.no_traceback()


def test_a_resume_that_reaches_a_frozen_replica_is_refused_there_once_alice_moved_elsewhere(lab: Lab) -> None:
    """alice's RESUME to a frozen replica times out (2 s) and she resumes at the replica she
    lost instead; when the frozen one wakes and reads the stale RESUME, the used mark is past
    it: refused, and the session stays where it is, no nonce twice."""
    serving = lab.serving()
    frozen = lab.replicas[1 - serving]
    assert frozen.process is not None
    session = lab.alice_session()
    frozen.process.send_signal(19)  # SIGSTOP: the kernel still accepts and buffers
    try:
        lab.relays[serving].cut()
        assert lab.wait_moved(session["migrations"], timeout=30) == serving
    finally:
        frozen.process.send_signal(18)  # SIGCONT
    frozen.wait_for_log("was used before (replay)")
    assert frozen.sessions() == []
    after = lab.alice_session()
    assert after["session_id"] == session["session_id"] and after["replica"] == f"r{serving + 1}"
    lab.ping()
    assert repeated_nonces([record for relay in lab.relays for record in relay.records()]) == {}
    lab.no_traceback()


def test_a_peer_resuming_its_own_session_over_and_over_is_refused_past_a_few_moves(lab: Lab) -> None:
    """An authenticated peer holds its session's keys, so every RESUME it makes is genuine;
    each one costs the replicas durable store writes (used mark, snapshot, a counter block)
    and no admission budget. Past a few moves in a row a replica refuses the session's next
    RESUME (the peer must handshake, which admission rations); alice's own session is untouched."""
    session = handshake_as_alice(lab)
    taken = refused = 0
    for index in range(len(lab.ports) * MOVE_BURST + 6):  # to each replica in turn
        session, resumed = resume_as_alice(lab, session, lab.ports[index % 2])
        taken, refused = taken + resumed, refused + (not resumed)
        if not resumed:
            break
    assert taken == len(lab.ports) * MOVE_BURST and refused == 1, (taken, refused)
    lab.replicas[len(lab.ports) * MOVE_BURST % 2].wait_for_log("moved too often; it must handshake anew")
    lab.no_traceback()


def handshake_as_alice(lab: Lab) -> Session:
    """A session with replica r1 under alice's identity, driven by the library over a socket."""
    session = Session(InitiatorHandshake(load_identity(lab.alice_home), lambda peer: "bob"), now_ms=mono_ms())
    session.start(mono_ms(), int(time.time() * 1000))
    with socket.create_connection(("127.0.0.1", lab.ports[0]), timeout=10) as sock:
        drive(sock, session, lambda s: s.confirmed and bool(s.replica))
    return session


def resume_as_alice(lab: Lab, old: Session, port: int) -> tuple[Session, bool]:
    """RESUME ``old`` at ``port``: (the continuing session, whether the replica took it)."""
    session = Session.resuming(old, mono_ms())
    session.start(mono_ms())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            drive(sock, session, lambda s: s.state is SessionState.ESTABLISHED)
        except (ProtocolError, ConnectionError):
            return session, False
    return session, True


def drive(sock: socket.socket, session: Session, done: Callable[[Session], bool]) -> None:
    sock.sendall(session.data_to_send())
    while not done(session):
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the replica closed the connection")
        session.receive_data(data, mono_ms(), int(time.time() * 1000))
        sock.sendall(session.data_to_send())


def mono_ms() -> int:
    return int(time.monotonic() * 1000)


def test_a_resume_naming_a_live_session_with_a_garbage_body_is_refused_in_one_line(lab: Lab) -> None:
    """Session ids travel in clear in every record header: a stranger can name alice's live
    session. A RESUME that does not open under its keys is refused, and the session stays."""
    session = lab.alice_session()["session_id"]
    for index, port in enumerate(lab.ports):
        forged = encode_frame(Kind.RECORD, bytes.fromhex(session) + (1 << 40).to_bytes(8, "big") + os.urandom(40))
        assert b"unknown session" in alert_of(answer_to(port, forged))
        lab.replicas[index].wait_for_log(f"RESUME of session {session} from")
        assert "failed authentication" in lab.replicas[index].logs()
    assert lab.alice_session()["session_id"] == session and lab.alice_session()["migrations"] == 0
    lab.ping()
    lab.no_traceback()


def test_a_resume_and_its_records_replayed_after_the_store_was_rolled_back_move_no_data(lab: Lab) -> None:
    """The used-RESUME mark put back to an older genuine value (0, as when the session
    started), then everything alice sent on her resumed connection (RESUME, RESUME_CONFIRM,
    her stream records) replayed to the other replica: the RESUME is answered again, but
    the replayed RESUME_CONFIRM cannot echo the new RESUMED's challenge, so no replayed
    record is accepted and alice's session is untouched."""
    session = lab.alice_session()["session_id"]
    ((genuine,),) = store_rows(lab, "SELECT value FROM marks WHERE key_id = ?", (f"{session}.resume",))
    lab.move()
    lab.ping()
    (stream,) = lab.resumed_streams()
    store_rows(lab, "UPDATE marks SET value = ? WHERE key_id = ?", (genuine, f"{session}.resume"))
    other = 1 - lab.serving()
    resume = next(scan_frames(stream))
    with socket.create_connection(("127.0.0.1", lab.ports[other]), timeout=10) as sock:
        sock.sendall(resume.data)
        assert FrameDecoder().feed(sock.recv(65536))[0].kind is Kind.RECORD  # RESUMED: answered again
        sock.sendall(stream[len(resume.data):])  # alice's RESUME_CONFIRM and records, replayed
        lab.replicas[other].wait_for_log("does not echo this replica's challenge (a replayed RESUME?)")
    assert "stream" not in lab.replicas[other].logs().split("moved to replica")[-1]
    assert lab.alice_session()["session_id"] == session
    lab.ping()
    lab.no_traceback()
