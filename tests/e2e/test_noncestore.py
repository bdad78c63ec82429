"""Spec for the HA nonce store contract (pqtunnel/stores.py NonceStore), on BOTH backends.

``local`` is a SQLite file; ``etcd`` is a real 3-member etcd cluster on loopback (one per
module: a start takes 0.3-2.6 s). Every contract test runs against both. The etcd-only
tests kill the leader mid-run and freeze a majority (a minority partition), and restore
the cluster before they end, so the tests after them find three healthy members.
"""

from __future__ import annotations

import base64
import http.server
import json
import secrets
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from pqlab.etcd import EtcdCluster, free_port
from pqlab.leaseworker import lab_codec
from pqtunnel.errors import (LeaseStoppedError, LocalProtocolError, StateTooLargeError, StoreDataError, StoreKeyError,
                             StoreOpenError, StoreUnavailableError)
from pqtunnel.events import Event, StoreDataRefused
from pqtunnel.leases import CounterLease, Granted, KeyMissing, MarkMoved
from pqtunnel.stores import MAX_STATE_SIZE, NonceStore, StoreCodec
from pqtunneld.etcd import EtcdGateway, b64
from pqtunneld.leasekeeper import LeaseKeeper, takeover_lease
from pqtunneld.noncestore import EtcdNonceStore, SqliteNonceStore

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def etcd_cluster() -> Iterator[EtcdCluster]:
    with EtcdCluster() as cluster:
        yield cluster


@pytest.fixture
def namespace() -> str:
    """Each test writes under its own namespace: tests sharing one cluster never meet."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["local", "etcd"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> dict:
    """How to open one more client of the same store (two clients = two replicas)."""
    if request.param == "etcd":
        endpoints = tuple(request.getfixturevalue("etcd_cluster").endpoints)
        return {"kind": "etcd", "etcd": endpoints, "args": [a for e in endpoints for a in ("--etcd", e)]}
    path = tmp_path / "nonces.sqlite"
    return {"kind": "local", "path": path, "args": ["--path", str(path)]}


def open_client(backend: dict, codec: StoreCodec, events: list[Event] | None = None,
                deadline: float = 8.0) -> SqliteNonceStore | EtcdNonceStore:
    emit = events.append if events is not None else (lambda event: None)
    if backend["kind"] == "etcd":
        return EtcdNonceStore(EtcdGateway(backend["etcd"], deadline=deadline), codec, emit)
    return SqliteNonceStore(backend["path"], codec, emit)


@pytest.fixture
async def store(backend: dict, namespace: str) -> AsyncIterator[NonceStore]:
    client = open_client(backend, lab_codec(namespace))
    yield client
    await client.aclose()


async def use_counters(keeper: LeaseKeeper, count: int, into: list[int], pause_every: int = 0) -> None:
    for index in range(count):
        into.append(await keeper.next_counter())
        if pause_every and index % pause_every == 0:
            await trio.sleep(0)  # let the other replica run


def assert_disjoint(*runs: list[int]) -> None:
    seen: set[int] = set()
    for run in runs:
        assert run == sorted(set(run)), "a replica's counters must strictly increase"
        assert not seen & set(run), f"counters used twice: {sorted(seen & set(run))[:5]}"
        seen |= set(run)


# --- compare-and-swap ---------------------------------------------------------------------------------


async def test_a_mark_is_created_once_and_then_only_moved_by_compare_and_swap(store: NonceStore) -> None:
    assert await store.read_mark("k1") is None
    assert await store.reserve("k1", None, 64) == Granted()
    assert await store.reserve("k1", None, 64) == MarkMoved(64)  # exists: create refused
    assert await store.reserve("k1", 64, 128) == Granted()
    assert await store.reserve("k1", 64, 192) == MarkMoved(128)  # someone moved it: here is where to
    assert await store.read_mark("k1") == 128


async def test_a_retried_reservation_never_commits_twice(store: NonceStore) -> None:
    """A lost reply is retried with the same expected mark: the retry finds the mark moved."""
    assert await store.reserve("k2", None, 64) == Granted()
    assert await store.reserve("k2", 64, 128) == Granted()
    assert await store.reserve("k2", 64, 128) == MarkMoved(128)


async def test_a_deleted_mark_cannot_be_moved_or_taken_over(store: NonceStore) -> None:
    assert await store.reserve("k3", None, 64) == Granted()
    await store.delete("k3")
    assert await store.read_mark("k3") is None
    assert await store.reserve("k3", 64, 128) == KeyMissing()
    lease = await takeover_lease(store, "k3")
    with pytest.raises(LeaseStoppedError, match="state is gone"):
        lease.next_counter()


async def test_keys_of_one_node_are_separate_from_another_nodes(backend: dict, namespace: str) -> None:
    ours, theirs = open_client(backend, lab_codec(namespace)), open_client(backend, lab_codec(namespace + "x"))
    try:
        assert await ours.reserve("shared-name", None, 64) == Granted()
        assert await theirs.read_mark("shared-name") is None
        assert await theirs.reserve("shared-name", None, 640) == Granted()
        assert await ours.read_mark("shared-name") == 64
    finally:
        await ours.aclose()
        await theirs.aclose()


# --- concurrent reservers -------------------------------------------------------------------------------


async def test_two_replicas_in_one_process_never_get_overlapping_counters(backend: dict, namespace: str) -> None:
    first, second = open_client(backend, lab_codec(namespace)), open_client(backend, lab_codec(namespace))
    counters: tuple[list[int], list[int]] = ([], [])
    try:
        async with trio.open_nursery() as nursery:
            keepers = [LeaseKeeper(CounterLease.fresh("race", block_size=16, low_water=4), client)
                       for client in (first, second)]
            for keeper in keepers:
                await nursery.start(keeper.run)
            async with trio.open_nursery() as users:
                for keeper, into in zip(keepers, counters):
                    users.start_soon(use_counters, keeper, 600, into, 7)
            nursery.cancel_scope.cancel()
        mark = await first.read_mark("race")
    finally:
        await first.aclose()
        await second.aclose()
    assert len(counters[0]) == len(counters[1]) == 600
    assert_disjoint(*counters)
    assert mark is not None and mark > max(counters[0] + counters[1])


def run_worker(backend: dict, namespace: str, *args: str) -> subprocess.Popen[str]:
    """A replica process (pqlab/leaseworker.py); its stderr joins stdout, so a traceback shows in the failure."""
    argv = [sys.executable, "-m", "pqlab.leaseworker", "--store", backend["kind"], *backend["args"],
            "--namespace", namespace, *args]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)


def worker_counters(process: subprocess.Popen[str], timeout: float = 60) -> tuple[list[int], dict]:
    """Every counter the worker printed (reading its pipe to the end), and its last line."""
    assert process.stdout is not None
    out = process.stdout.read()
    process.wait(timeout)
    assert process.returncode == 0 and out.endswith("}\n"), out[-3000:]
    lines = [json.loads(line) for line in out.splitlines()]
    counters = [c for line in lines if "used" in line for c in range(line["used"][0], line["used"][1] + 1)]
    return counters, lines[-1]


def test_two_replica_processes_never_get_overlapping_counters(backend: dict, namespace: str) -> None:
    workers = [run_worker(backend, namespace, "--key", "procs", "--count", "1500", "--block", "32") for _ in range(2)]
    results = [worker_counters(w) for w in workers]
    assert [len(counters) for counters, _ in results] == [1500, 1500]
    assert_disjoint(results[0][0], results[1][0])


def test_a_frozen_replica_resumes_with_its_old_block_and_nothing_overlaps(backend: dict, namespace: str) -> None:
    """SIGSTOP a replica holding a block, let another take over from the stored mark, SIGCONT."""
    frozen = run_worker(backend, namespace, "--key", "freeze", "--count", "200", "--block", "100",
                        "--every", "10", "--pause", "0.05")
    assert frozen.stdout is not None
    first = json.loads(frozen.stdout.readline())  # it holds [0, 100) and has used some of it
    assert first["used"][0] == 0
    frozen.send_signal(signal.SIGSTOP)
    try:
        takeover = run_worker(backend, namespace, "--key", "freeze", "--takeover", "--count", "300", "--block", "100")
        taken, _ = worker_counters(takeover)
    finally:
        frozen.send_signal(signal.SIGCONT)
    rest, _ = worker_counters(frozen)
    old = list(range(first["used"][0], first["used"][1] + 1)) + rest
    assert min(taken) >= 100  # the takeover started at the stored mark, above the frozen block
    assert any(c < 100 for c in rest)  # the frozen replica did go on with its old block
    assert_disjoint(old, taken)


# --- single-use records --------------------------------------------------------------------------------


async def test_a_single_use_record_is_accepted_once(store: NonceStore) -> None:
    assert await store.use_once("ticket", "abc123", 60) is True
    assert await store.use_once("ticket", "abc123", 60) is False
    assert await store.use_once("ticket", "abc124", 60) is True
    assert await store.use_once("replay", "abc123", 60) is True  # kinds are separate


async def test_two_replicas_redeeming_the_same_records_at_once_succeed_once_each(backend: dict,
                                                                               namespace: str) -> None:
    clients = [open_client(backend, lab_codec(namespace)) for _ in range(2)]
    wins: dict[str, list[bool]] = {f"t{i}": [] for i in range(25)}

    async def redeem(client: NonceStore) -> None:
        for record_id in wins:
            wins[record_id].append(await client.use_once("ticket", record_id, 30))

    try:
        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(redeem, client)
    finally:
        for client in clients:
            await client.aclose()
    assert all(sorted(results) == [False, True] for results in wins.values()), wins


async def test_a_local_single_use_record_expires_after_its_ttl(tmp_path: Path) -> None:
    store = SqliteNonceStore(tmp_path / "n.sqlite", lab_codec())
    assert await store.use_once("ticket", "t", 0.2) is True
    assert await store.use_once("ticket", "t", 0.2) is False
    await trio.sleep(0.3)
    assert await store.use_once("ticket", "t", 0.2) is True
    await store.aclose()


# --- data we cannot vouch for ---------------------------------------------------------------------------


async def write_raw(backend: dict, client: NonceStore, key_id: str, value: bytes) -> None:
    """Put ``value`` where the mark of ``key_id`` lives, behind the store's back."""
    if isinstance(client, EtcdNonceStore):
        await client.gateway.call("/v3/kv/put", {"key": b64(client.mark_key(key_id)), "value": b64(value)})
        return
    db = sqlite3.connect(backend["path"])
    with db:
        db.execute("INSERT OR REPLACE INTO marks VALUES (?, ?, ?)", (client.codec.namespace, key_id, value))
    db.close()


@pytest.mark.parametrize("value", [b"garbage", b"pqtunnel-mark/1 64 " + b"0" * 32, "foreign"])
async def test_corrupt_or_foreign_marks_are_refused_and_logged(backend: dict, namespace: str,
                                                               value: bytes | str) -> None:
    events: list[Event] = []
    client = open_client(backend, lab_codec(namespace), events)
    if value == "foreign":  # a well-formed mark of another node (other store key)
        value = StoreCodec(namespace, bytes(32)).encode_mark("bad", 64)
    try:
        await write_raw(backend, client, "bad", value)
        with pytest.raises(StoreDataError):
            await client.read_mark("bad")
        with pytest.raises(StoreDataError):
            await client.reserve("bad", 64, 128)
        lease = await takeover_lease(client, "bad")
        with pytest.raises(LeaseStoppedError, match="refused"):
            lease.next_counter()
    finally:
        await client.aclose()
    refusals = [e for e in events if isinstance(e, StoreDataRefused)]
    assert len(refusals) == 3 and refusals[0].key == "bad" and refusals[0].store == backend["kind"]


def test_a_file_that_is_not_a_nonce_store_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
    with pytest.raises(StoreOpenError, match="not a pqtunnel nonce store"):
        SqliteNonceStore(other, lab_codec())
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreOpenError, match="cannot open"):
        SqliteNonceStore(garbage, lab_codec())


async def test_a_healthy_store_says_so(store: NonceStore) -> None:
    health = await store.health()
    assert health.ok and health.detail


# --- etcd faults -----------------------------------------------------------------------------------------


async def test_etcd_leader_killed_mid_run_reservations_stall_briefly_and_never_overlap(
        etcd_cluster: EtcdCluster, namespace: str) -> None:
    backend = {"kind": "etcd", "etcd": tuple(etcd_cluster.endpoints)}
    clients = [open_client(backend, lab_codec(namespace)) for _ in range(2)]
    counters: tuple[list[int], list[int]] = ([], [])
    gaps: list[float] = []
    leader = etcd_cluster.leader()

    async def replica(keeper: LeaseKeeper, into: list[int]) -> None:
        last = time.monotonic()
        while len(into) < 1200:
            into.append(await keeper.next_counter())
            now = time.monotonic()
            gaps.append(now - last)
            last = now
            await trio.sleep(0)

    async def kill_leader_when_running() -> None:
        while len(counters[0]) + len(counters[1]) < 400:
            await trio.sleep(0.01)
        await trio.to_thread.run_sync(etcd_cluster.kill, leader)

    try:
        async with trio.open_nursery() as nursery:
            keepers = [LeaseKeeper(CounterLease.fresh("leader", block_size=8, low_water=2), c) for c in clients]
            for keeper in keepers:
                await nursery.start(keeper.run)
            async with trio.open_nursery() as users:
                for keeper, into in zip(keepers, counters):
                    users.start_soon(replica, keeper, into)
                users.start_soon(kill_leader_when_running)
            nursery.cancel_scope.cancel()
        assert not leader.running
        assert etcd_cluster.leader() is not leader  # a new leader was elected
    finally:
        for client in clients:
            await client.aclose()
        await trio.to_thread.run_sync(etcd_cluster.restart, leader)
    assert_disjoint(*counters)
    assert max(gaps) < 8.0, f"stalled {max(gaps):.1f} s"


async def test_etcd_minority_partition_reservations_wait_then_continue(etcd_cluster: EtcdCluster,
                                                                       namespace: str) -> None:
    """Two members frozen: the one left cannot commit, so nothing is granted; after, all goes on."""
    backend = {"kind": "etcd", "etcd": tuple(etcd_cluster.endpoints)}
    client = open_client(backend, lab_codec(namespace), deadline=3.0)
    frozen = etcd_cluster.members[:2]
    try:
        assert await client.reserve("minority", None, 64) == Granted()
        for member in frozen:
            etcd_cluster.freeze(member)
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="no endpoint answered"):
            await client.reserve("minority", 64, 128)
        assert time.monotonic() - started < 6
        assert not (await client.health()).ok or "1/3" in (await client.health()).detail
    finally:
        for member in frozen:
            etcd_cluster.thaw(member)
        await client.aclose()
    # healed: the unanswered request may or may not have committed, only the stored mark says
    client = open_client(backend, lab_codec(namespace))
    try:
        lease = await takeover_lease(client, "minority", block_size=64)
        keeper = LeaseKeeper(lease, client)
        async with trio.open_nursery() as nursery:
            await nursery.start(keeper.run)
            with trio.fail_after(15):
                assert await keeper.next_counter() >= 64  # above the block granted before the partition
            nursery.cancel_scope.cancel()
    finally:
        await client.aclose()
        await trio.to_thread.run_sync(etcd_cluster.wait_healthy)


async def test_etcd_health_counts_the_members_that_answer(etcd_cluster: EtcdCluster, namespace: str) -> None:
    client = open_client({"kind": "etcd", "etcd": tuple(etcd_cluster.endpoints)}, lab_codec(namespace))
    try:
        assert (await client.health()).detail.startswith("3/3")
        unreachable = open_client({"kind": "etcd", "etcd": ("http://127.0.0.1:9",)}, lab_codec(namespace),
                                  deadline=1.0)
        health = await unreachable.health()
        assert not health.ok and health.detail.startswith("0/1")
        with pytest.raises(StoreUnavailableError):
            await unreachable.read_mark("k")
        await unreachable.aclose()
    finally:
        await client.aclose()


class ElectionStub:
    """An HTTP endpoint that answers every request as a follower does mid-election: 503."""

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = b'{"error":"etcdserver: leader changed","code":14,"message":"etcdserver: leader changed"}'
                self.send_response(503)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def test_etcd_requests_fail_over_past_dead_and_electing_endpoints(etcd_cluster: EtcdCluster,
                                                                        namespace: str) -> None:
    stub = ElectionStub()
    endpoints = (f"http://127.0.0.1:{free_port()}", stub.url, etcd_cluster.endpoints[0])
    gateway = EtcdGateway(endpoints)
    client = EtcdNonceStore(gateway, lab_codec(namespace))
    try:
        assert await client.reserve("failover", None, 64) == Granted()
        assert gateway.preferred == etcd_cluster.endpoints[0]  # asked first next time
        assert await client.read_mark("failover") == 64
        alone = EtcdNonceStore(EtcdGateway((stub.url,), deadline=1.0), lab_codec(namespace))
        with pytest.raises(StoreUnavailableError, match="503 etcdserver: leader changed"):
            await alone.read_mark("failover")
        await alone.aclose()
    finally:
        await client.aclose()
        stub.close()


# --- session-state blobs (what migration keeps) ----------------------------------------------------------


async def test_a_state_blob_is_stored_replaced_listed_and_deleted(store: NonceStore) -> None:
    assert await store.get_state("session.0123456789abcdef") is None
    await store.put_state("session.0123456789abcdef", b"wrapped state v1")
    await store.put_state("session.fedcba9876543210", b"\x00another\xff")
    assert await store.get_state("session.0123456789abcdef") == b"wrapped state v1"
    await store.put_state("session.0123456789abcdef", b"wrapped state v2, after a rekey")
    assert await store.get_state("session.0123456789abcdef") == b"wrapped state v2, after a rekey"
    assert await store.list_states("session.") == ["session.0123456789abcdef", "session.fedcba9876543210"]
    assert await store.list_states("session.f") == ["session.fedcba9876543210"]
    await store.delete_state("session.0123456789abcdef")
    assert await store.get_state("session.0123456789abcdef") is None
    await store.delete_state("session.0123456789abcdef")  # again: nothing to forget, no error
    assert await store.get_state("session.fedcba9876543210") == b"\x00another\xff"
    assert await store.list_states("") == ["session.fedcba9876543210"]


async def test_states_are_kept_apart_from_marks_and_single_use_records(store: NonceStore) -> None:
    await store.put_state("same-id", b"state")
    assert await store.read_mark("same-id") is None
    assert await store.reserve("same-id", None, 64) == Granted()
    assert await store.use_once("ticket", "same-id", 60) is True
    await store.delete("same-id")
    assert await store.get_state("same-id") == b"state"


async def test_a_state_written_by_one_replica_is_read_by_another(backend: dict, namespace: str) -> None:
    writer, reader = open_client(backend, lab_codec(namespace)), open_client(backend, lab_codec(namespace))
    other_node = open_client(backend, lab_codec(namespace + "x"))
    blob = secrets.token_bytes(MAX_STATE_SIZE)
    try:
        await writer.put_state("session.00000000000000aa", blob)
        assert await reader.get_state("session.00000000000000aa") == blob
        assert await other_node.get_state("session.00000000000000aa") is None  # another node's namespace
        await reader.delete_state("session.00000000000000aa")
        assert await writer.get_state("session.00000000000000aa") is None
    finally:
        for client in (writer, reader, other_node):
            await client.aclose()


@pytest.mark.parametrize("state_id", ["", "session/0123", "session 0123", "../session", ".session", "sessión",
                                      "s" * 129, "session\n", 42],
                         ids=["empty", "slash", "space", "dotdot", "leading-dot", "non-ascii", "too-long",
                              "newline", "not-a-string"])
async def test_an_invalid_state_id_is_refused_and_nothing_is_stored(store: NonceStore, state_id: object) -> None:
    with pytest.raises(StoreKeyError, match="state id"):
        await store.put_state(state_id, b"blob")  # type: ignore[arg-type]
    with pytest.raises(StoreKeyError, match="state id"):
        await store.get_state(state_id)  # type: ignore[arg-type]
    with pytest.raises(StoreKeyError, match="state id"):
        await store.delete_state(state_id)  # type: ignore[arg-type]
    assert await store.list_states("") == []


async def test_a_bad_list_prefix_or_a_blob_that_is_not_bytes_is_refused(store: NonceStore) -> None:
    with pytest.raises(StoreKeyError, match="prefix"):
        await store.list_states("session/")
    with pytest.raises(StoreKeyError, match="must be bytes"):
        await store.put_state("session.1", "text, not bytes")  # type: ignore[arg-type]


async def test_an_oversized_state_is_refused_as_our_bug(store: NonceStore) -> None:
    await store.put_state("session.max", bytes(MAX_STATE_SIZE))
    with pytest.raises(StateTooLargeError, match=f"{MAX_STATE_SIZE + 1} bytes, more than {MAX_STATE_SIZE}") as refused:
        await store.put_state("session.max", bytes(MAX_STATE_SIZE + 1))
    assert isinstance(refused.value, ValueError) and isinstance(refused.value, LocalProtocolError)
    assert await store.get_state("session.max") == bytes(MAX_STATE_SIZE)  # the old blob is untouched


async def test_a_stored_state_bigger_than_we_ever_write_is_refused_and_logged(backend: dict, namespace: str) -> None:
    events: list[Event] = []
    client = open_client(backend, lab_codec(namespace), events)
    too_big = bytes(MAX_STATE_SIZE + 1)
    try:
        if isinstance(client, EtcdNonceStore):  # behind the store's back
            await client.gateway.put(client.state_key("session.big"), too_big)
        else:
            db = sqlite3.connect(backend["path"])
            with db:
                db.execute("INSERT INTO states VALUES (?, ?, ?)", (namespace, "session.big", too_big))
            db.close()
        with pytest.raises(StoreDataError, match="more than pqtunnel writes"):
            await client.get_state("session.big")
    finally:
        await client.aclose()
    assert [(e.store, e.key) for e in events if isinstance(e, StoreDataRefused)] == [(backend["kind"], "session.big")]


# --- forgetting: a deleted state is gone from the store's history ------------------------------------------


def range_at(endpoint: str, key: bytes, revision: int) -> dict:
    """Ask one etcd member's gateway for ``key`` as it was at ``revision``: the JSON answer (errors too)."""
    body = json.dumps({"key": b64(key), "revision": str(revision)}).encode()
    request = urllib.request.Request(f"{endpoint}/v3/kv/range", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


def written_at(endpoint: str, key: bytes) -> int:
    """The revision that wrote the current value of ``key``."""
    answer = range_at(endpoint, key, 0)
    return int(answer["kvs"][0]["mod_revision"])


async def test_a_deleted_state_is_gone_from_etcd_history(etcd_cluster: EtcdCluster, namespace: str) -> None:
    client = EtcdNonceStore(EtcdGateway(tuple(etcd_cluster.endpoints)), lab_codec(namespace))
    endpoint = etcd_cluster.endpoints[0]
    first, second = secrets.token_bytes(64), secrets.token_bytes(64)
    key = client.state_key("session.00000000000000f5")
    try:
        await client.put_state("session.00000000000000f5", first)
        first_revision = written_at(endpoint, key)
        await client.put_state("session.00000000000000f5", second)  # replaced: the first is history now
        second_revision = written_at(endpoint, key)
        old = range_at(endpoint, key, first_revision)
        assert base64.b64decode(old["kvs"][0]["value"]) == first  # history holds it before the delete
        await client.delete_state("session.00000000000000f5")
    finally:
        await client.aclose()
    for revision in (first_revision, second_revision):
        for member in etcd_cluster.endpoints:
            answer = range_at(member, key, revision)
            assert "required revision has been compacted" in answer.get("message", ""), answer
    assert "kvs" not in range_at(endpoint, key, 0)


async def test_many_etcd_deletes_share_a_few_compactions_and_each_returns_forgotten(
        etcd_cluster: EtcdCluster, namespace: str) -> None:
    """Rate limit: 20 deletes at once, then one more later: at most one compaction per interval,
    and each delete returns only once its history is compacted."""
    client = EtcdNonceStore(EtcdGateway(tuple(etcd_cluster.endpoints)), lab_codec(namespace), compact_interval=0.5)
    endpoint = etcd_cluster.endpoints[0]
    ids = [f"session.{index:016x}" for index in range(21)]
    try:
        revisions = {}
        for state_id in ids:
            await client.put_state(state_id, secrets.token_bytes(64))
            revisions[state_id] = written_at(endpoint, client.state_key(state_id))
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for state_id in ids[:20]:
                nursery.start_soon(client.delete_state, state_id)
        assert client.compactor.compactions <= 2
        assert trio.current_time() - started >= 0.5 or client.compactor.compactions == 1
        for state_id in ids[:20]:
            answer = range_at(endpoint, client.state_key(state_id), revisions[state_id])
            assert "required revision has been compacted" in answer.get("message", ""), answer
        before = client.compactor.compactions
        await client.delete_state(ids[20])  # the trailing delete gets its own compaction
        assert client.compactor.compactions == before + 1
        assert "compacted" in range_at(endpoint, client.state_key(ids[20]), revisions[ids[20]]).get("message", "")
    finally:
        await client.aclose()


def files_hold(path: Path, needle: bytes) -> list[str]:
    """Which of the SQLite file and its -wal contain ``needle``."""
    candidates = [path, path.with_name(path.name + "-wal")]
    return [candidate.name for candidate in candidates if candidate.exists() and needle in candidate.read_bytes()]


@pytest.mark.parametrize("checkpointed", [False, True], ids=["blob-in-wal", "blob-in-main-file"])
async def test_a_deleted_state_leaves_no_bytes_in_the_sqlite_files(tmp_path: Path, checkpointed: bool) -> None:
    path = tmp_path / "nonces.sqlite"
    store, replica = SqliteNonceStore(path, lab_codec()), SqliteNonceStore(path, lab_codec())  # two replicas
    secret, neighbour = secrets.token_bytes(64), secrets.token_bytes(64)
    try:
        await store.put_state("session.000000000000000a", neighbour)
        await store.put_state("session.000000000000000b", secret)
        await replica.put_state("session.000000000000000c", neighbour)
        if checkpointed:
            with sqlite3.connect(path) as db:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            assert files_hold(path, secret) == ["nonces.sqlite"]
        else:
            assert "nonces.sqlite-wal" in files_hold(path, secret)  # the search would find it
        await replica.delete_state("session.000000000000000b")
        assert files_hold(path, secret) == []
        assert await store.get_state("session.000000000000000a") == neighbour
        assert await store.get_state("session.000000000000000b") is None
    finally:
        await store.aclose()
        await replica.aclose()


async def test_a_replaced_state_is_forgotten_by_the_next_delete(tmp_path: Path) -> None:
    path = tmp_path / "nonces.sqlite"
    store = SqliteNonceStore(path, lab_codec())
    old, new = secrets.token_bytes(64), secrets.token_bytes(64)
    try:
        await store.put_state("session.1", old)
        await store.put_state("session.1", new)
        assert files_hold(path, old)  # the replaced blob's page is still in the WAL
        await store.put_state("session.2", b"x")
        await store.delete_state("session.2")
        assert files_hold(path, old) == []
        assert files_hold(path, new) == ["nonces.sqlite"]
    finally:
        await store.aclose()


async def test_etcd_states_are_written_and_read_after_the_leader_is_killed(etcd_cluster: EtcdCluster,
                                                                         namespace: str) -> None:
    client = EtcdNonceStore(EtcdGateway(tuple(etcd_cluster.endpoints)), lab_codec(namespace), compact_interval=0.2)
    leader = etcd_cluster.leader()
    blob = secrets.token_bytes(4096)
    try:
        await client.put_state("session.00000000000000b1", blob)
        await trio.to_thread.run_sync(etcd_cluster.kill, leader)
        started = time.monotonic()
        await client.put_state("session.00000000000000b2", blob[::-1])  # waits out the election
        assert time.monotonic() - started < 8.0
        assert etcd_cluster.leader() is not leader
        assert await client.get_state("session.00000000000000b1") == blob
        assert await client.get_state("session.00000000000000b2") == blob[::-1]
        await client.delete_state("session.00000000000000b1")
        assert await client.get_state("session.00000000000000b1") is None
    finally:
        await client.aclose()
        await trio.to_thread.run_sync(etcd_cluster.restart, leader)
