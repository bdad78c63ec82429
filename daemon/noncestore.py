"""The two NonceStore backends (pqtunnel/stores.py): ``local`` (SQLite) and ``etcd``.

Both keep the same things under the node's namespace (its fingerprint): counter-lease
marks in ``StoreCodec`` format, changed only by compare-and-swap, single-use records, and
opaque session-state blobs (wrapped by the caller) whose delete also erases their history.
Both refuse a mark that fails the codec's checks, emit ``StoreDataRefused`` (one log line)
and raise StoreDataError: corrupt or foreign data is never trusted.

``local``: one SQLite file (default ``HOME/nonces.sqlite``; ``[ha] path`` shares one file
between replicas or worker processes on one host). WAL with ``synchronous=FULL``: a
reservation is one ``BEGIN IMMEDIATE`` transaction, on disk (fsync'd) before it is granted;
the file lock serialises processes. Calls run in a worker thread, one at a time. With
``secure_delete`` on, freed pages are zeroed; a state delete then checkpoints the WAL
(``TRUNCATE``), so the deleted blob is in neither the file nor its ``-wal``.

``etcd``: etcd v3 through its JSON gateway (daemon/etcd.py). A reservation is one
transaction: compare the stored value with the expected mark's value, put the new mark;
on failure it reads the key back, which gives the current mark. Single-use records are
created with ``create_revision == 0`` under an etcd lease (their TTL). A state delete is
followed by a compaction of the cluster's history (``HistoryCompactor``: at most one per
``COMPACT_INTERVAL``), so no older revision still holds the blob.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import trio

from pqtunnel.errors import StoreDataError, StoreKeyError, StoreOpenError, StoreUnavailableError
from pqtunnel.events import Event, StoreDataRefused
from pqtunnel.leases import Granted, KeyMissing, MarkMoved, ReserveResult
from pqtunnel.stores import StoreCodec, StoreHealth, check_state, check_state_prefix, check_store_id, stored_state

from .etcd import EtcdGateway, EtcdRequestRefused, TxnResult, b64

Emit = Callable[[Event], None]
APPLICATION_ID = 0x70714E53  # "pqNS": PRAGMA application_id of a pqtunnel nonce store
SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 5000
PURGE_EVERY = 256
"""Single-use records: expired ones are purged every this many ``use_once`` calls."""
MAX_TTL_S = 30 * 86400
"""Longest a single-use record is kept (a resumption ticket's lifetime is far shorter)."""
ETCD_PREFIX = "/pqtunnel/v1"
LEASE_SLACK_S = 60
"""An etcd lease for single-use records is reused while it lives at least the record's TTL;
each is granted for the TTL plus this slack, so records may outlive their TTL, never fall short."""
COMPACT_INTERVAL = 1.0
"""etcd: at most one history compaction per this many seconds; the deletes in between share
the next one (a trailing compaction after the last delete)."""


def _ignore(event: Event) -> None:
    """The default ``emit``: tests and tools that need no log."""


def _check_ttl(ttl_s: float) -> None:
    if not 0 < ttl_s <= MAX_TTL_S:
        raise StoreKeyError(f"a single-use record's TTL must be 0 < ttl <= {MAX_TTL_S} s, not {ttl_s}")


class _Refusals:
    """Decode a stored mark with the codec, check a stored state's size; refuse (log, raise) what fails."""

    kind = "?"

    def __init__(self, codec: StoreCodec, emit: Emit) -> None:
        self.codec = codec
        self.emit = emit

    def _decode(self, key_id: str, value: bytes) -> int:
        try:
            return self.codec.decode_mark(key_id, value)
        except StoreDataError as exc:
            self.emit(StoreDataRefused(self.kind, key_id, str(exc)))
            raise

    def _state(self, state_id: str, blob: bytes) -> bytes:
        try:
            return stored_state(state_id, blob)
        except StoreDataError as exc:
            self.emit(StoreDataRefused(self.kind, state_id, str(exc)))
            raise


# --- local: SQLite ---------------------------------------------------------------------------------


def _claim(db: sqlite3.Connection, path: Path) -> None:
    """Check and create the schema in one write transaction, so processes opening a new file
    at once never see each other's half-made store."""
    db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    db.execute("BEGIN IMMEDIATE")
    try:
        application_id = db.execute("PRAGMA application_id").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if application_id != APPLICATION_ID and (application_id != 0 or tables != 0):
            raise StoreOpenError(f"nonce store {path} is not a pqtunnel nonce store (refusing to use it)")
        if version > SCHEMA_VERSION:
            raise StoreOpenError(f"nonce store {path} has format {version}, newer than this pqtunnel's {SCHEMA_VERSION}")
        db.execute(f"PRAGMA application_id={APPLICATION_ID}")
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.execute("CREATE TABLE IF NOT EXISTS marks (namespace TEXT NOT NULL, key_id TEXT NOT NULL, "
                   "value BLOB NOT NULL, PRIMARY KEY (namespace, key_id)) WITHOUT ROWID")
        db.execute("CREATE TABLE IF NOT EXISTS used_once (namespace TEXT NOT NULL, kind TEXT NOT NULL, "
                   "id TEXT NOT NULL, expires REAL NOT NULL, PRIMARY KEY (namespace, kind, id)) WITHOUT ROWID")
        db.execute("CREATE TABLE IF NOT EXISTS states (namespace TEXT NOT NULL, state_id TEXT NOT NULL, "
                   "blob BLOB NOT NULL, PRIMARY KEY (namespace, state_id))")  # rowid: blobs are large rows
        db.execute("COMMIT")
    finally:
        if db.in_transaction:
            db.execute("ROLLBACK")


class SqliteNonceStore(_Refusals):
    """NonceStore on one SQLite file, safe for several processes on one host."""

    kind = "local"

    def __init__(self, path: Path, codec: StoreCodec, emit: Emit = _ignore) -> None:
        super().__init__(codec, emit)
        self.path = path
        self._limiter = trio.CapacityLimiter(1)
        self._db = self._open(path)
        self._uses = 0

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        """Open (or create) the file; a file that is not a nonce store of ours is refused untouched."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
            try:
                _claim(db, path)
            except BaseException:
                db.close()
                raise
            db.execute("PRAGMA journal_mode=WAL")  # persistent: after the first open, a no-op
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA secure_delete=ON")  # per connection: freed pages (deleted states) are zeroed
            return db
        except sqlite3.Error as exc:
            raise StoreOpenError(f"cannot open nonce store {path}: {exc}") from None
        except OSError as exc:
            raise StoreOpenError(f"cannot open nonce store {path}: {exc.strerror or exc}") from None

    async def _run(self, work: Callable[[sqlite3.Connection], object]) -> object:
        def guarded() -> object:
            try:
                return work(self._db)
            except sqlite3.OperationalError as exc:  # locked past busy_timeout, disk I/O: nothing committed
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise StoreUnavailableError(f"nonce store {self.path}: {exc}") from None

        return await trio.to_thread.run_sync(guarded, limiter=self._limiter)

    def _read_value(self, db: sqlite3.Connection, key_id: str) -> bytes | None:
        row = db.execute("SELECT value FROM marks WHERE namespace = ? AND key_id = ?",
                         (self.codec.namespace, key_id)).fetchone()
        return None if row is None else bytes(row[0])

    async def read_mark(self, key_id: str) -> int | None:
        check_store_id(key_id)
        value = await self._run(lambda db: self._read_value(db, key_id))
        return None if value is None else self._decode(key_id, value)

    async def reserve(self, key_id: str, expected_mark: int | None, new_mark: int) -> ReserveResult:
        check_store_id(key_id)
        new_value = self.codec.encode_mark(key_id, new_mark)
        refused: list[StoreDataError] = []

        def swap(db: sqlite3.Connection) -> ReserveResult | None:
            db.execute("BEGIN IMMEDIATE")
            try:
                value = self._read_value(db, key_id)
                if value is None and expected_mark is not None:
                    return KeyMissing()
                if value is not None:
                    try:
                        current = self.codec.decode_mark(key_id, value)
                    except StoreDataError as exc:
                        refused.append(exc)
                        return None
                    if current != expected_mark:
                        return MarkMoved(current)
                db.execute("INSERT OR REPLACE INTO marks (namespace, key_id, value) VALUES (?, ?, ?)",
                           (self.codec.namespace, key_id, new_value))
                db.execute("COMMIT")  # fsync'd (synchronous=FULL) before the grant is returned
                return Granted()
            finally:
                if db.in_transaction:
                    db.execute("ROLLBACK")

        result = await self._run(swap)
        if refused:
            self.emit(StoreDataRefused(self.kind, key_id, str(refused[0])))
            raise refused[0]
        return result  # type: ignore[return-value]

    async def delete(self, key_id: str) -> None:
        check_store_id(key_id)
        await self._run(lambda db: db.execute("DELETE FROM marks WHERE namespace = ? AND key_id = ?",
                                              (self.codec.namespace, key_id)))

    async def use_once(self, kind: str, record_id: str, ttl_s: float) -> bool:
        _check_ttl(ttl_s)
        check_store_id(kind, "record kind")
        check_store_id(record_id, "record id")
        self._uses += 1
        purge = self._uses % PURGE_EVERY == 0

        def use(db: sqlite3.Connection) -> bool:
            now = time.time()
            key = (self.codec.namespace, kind, record_id)
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM used_once WHERE namespace = ? AND kind = ? AND id = ? AND expires <= ?",
                           (*key, now))
                inserted = db.execute("INSERT OR IGNORE INTO used_once (namespace, kind, id, expires) "
                                      "VALUES (?, ?, ?, ?)", (*key, now + ttl_s)).rowcount == 1
                if purge:
                    db.execute("DELETE FROM used_once WHERE expires <= ?", (now,))
                db.execute("COMMIT")
                return inserted
            finally:
                if db.in_transaction:
                    db.execute("ROLLBACK")

        return bool(await self._run(use))

    async def put_state(self, state_id: str, blob: bytes) -> None:
        blob = check_state(state_id, blob)
        await self._run(lambda db: db.execute("INSERT OR REPLACE INTO states (namespace, state_id, blob) "
                                              "VALUES (?, ?, ?)", (self.codec.namespace, state_id, blob)))

    async def get_state(self, state_id: str) -> bytes | None:
        check_store_id(state_id, "state id")
        row = await self._run(lambda db: db.execute("SELECT blob FROM states WHERE namespace = ? AND state_id = ?",
                                                    (self.codec.namespace, state_id)).fetchone())
        return None if row is None else self._state(state_id, bytes(row[0]))  # type: ignore[index]

    async def delete_state(self, state_id: str) -> None:
        """Delete (its pages zeroed: secure_delete), then checkpoint the WAL and truncate it to nothing."""
        check_store_id(state_id, "state id")

        def forget(db: sqlite3.Connection) -> bool:
            db.execute("DELETE FROM states WHERE namespace = ? AND state_id = ?", (self.codec.namespace, state_id))
            busy = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            return busy == 0

        if not await self._run(forget):
            raise StoreUnavailableError(f"nonce store {self.path}: state {state_id} is deleted, but another process "
                                        "kept the WAL busy, so its old bytes may remain there (delete it again)")

    async def list_states(self, prefix: str) -> list[str]:
        check_state_prefix(prefix)
        rows = await self._run(lambda db: db.execute(
            "SELECT state_id FROM states WHERE namespace = ? AND substr(state_id, 1, ?) = ? ORDER BY state_id",
            (self.codec.namespace, len(prefix), prefix)).fetchall())
        return [row[0] for row in rows]  # type: ignore[attr-defined]

    async def health(self) -> StoreHealth:
        try:
            await self._run(lambda db: db.execute("SELECT count(*) FROM marks").fetchone())
        except StoreUnavailableError as exc:
            return StoreHealth(False, str(exc))
        return StoreHealth(True, str(self.path))

    async def aclose(self) -> None:
        await self._run(lambda db: db.close())


# --- etcd ---------------------------------------------------------------------------------------------


class _CompactionRound:
    """One compaction that callers wait for; ``failure`` says why it did not finish."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.failure: str | None = None


class HistoryCompactor:
    """Compacts etcd's history after state deletes, at most once per ``interval`` seconds.

    etcd keeps every old revision of a key (a deleted blob too) until its history is
    compacted, and a compaction is cluster-wide work, so deletes share compactions: a delete
    waits for the next compaction that *begins after it* (at once if none ran in the last
    ``interval``, else when the interval has passed), so when it returns no revision older
    than its delete is left.
    """

    def __init__(self, gateway: EtcdGateway, interval: float = COMPACT_INTERVAL) -> None:
        self.gateway = gateway
        self.interval = interval
        self.compactions = 0
        self._last: float | None = None  # trio clock: when the last compaction began
        self._next: _CompactionRound | None = None

    async def after_delete(self) -> None:
        """Return once a compaction that began after the caller's (committed) delete finished."""
        if self._next is not None:
            joined = self._next
            await joined.done.wait()
            if joined.failure is not None:
                raise StoreUnavailableError(f"etcd history compaction did not finish: {joined.failure}")
            return
        round_ = self._next = _CompactionRound()
        try:
            if self._last is not None:
                await trio.sleep_until(self._last + self.interval)
            self._next = None  # a delete from now on needs a compaction that begins after it
            self._last = trio.current_time()
            await self.gateway.compact(await self.gateway.revision())
            self.compactions += 1
        except BaseException as exc:
            round_.failure = str(exc) or type(exc).__name__
            raise
        finally:
            if self._next is round_:
                self._next = None
            round_.done.set()


class EtcdNonceStore(_Refusals):
    """NonceStore on an etcd v3 cluster (keys under ``/pqtunnel/v1/<fingerprint>/``)."""

    kind = "etcd"

    def __init__(self, gateway: EtcdGateway, codec: StoreCodec, emit: Emit = _ignore, *,
                 compact_interval: float = COMPACT_INTERVAL) -> None:
        super().__init__(codec, emit)
        self.gateway = gateway
        self.compactor = HistoryCompactor(gateway, compact_interval)
        self._prefix = f"{ETCD_PREFIX}/{codec.namespace}"
        self._lease: tuple[int, float] | None = None  # (etcd lease id, monotonic expiry)

    def mark_key(self, key_id: str) -> bytes:
        return f"{self._prefix}/mark/{check_store_id(key_id)}".encode()

    def once_key(self, kind: str, record_id: str) -> bytes:
        return f"{self._prefix}/once/{check_store_id(kind, 'record kind')}/{check_store_id(record_id, 'record id')}".encode()

    def state_key(self, state_id: str) -> bytes:
        return f"{self._prefix}/state/{check_store_id(state_id, 'state id')}".encode()

    async def read_mark(self, key_id: str) -> int | None:
        found = await self.gateway.range(self.mark_key(key_id))
        return self._decode(key_id, found[0].value) if found else None

    async def reserve(self, key_id: str, expected_mark: int | None, new_mark: int) -> ReserveResult:
        key = b64(self.mark_key(key_id))
        if expected_mark is None:
            compare = {"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
        else:
            compare = {"key": key, "target": "VALUE", "result": "EQUAL",
                       "value": b64(self.codec.encode_mark(key_id, expected_mark))}
        result = await self.gateway.txn(
            [compare], [{"request_put": {"key": key, "value": b64(self.codec.encode_mark(key_id, new_mark))}}],
            [{"request_range": {"key": key}}])
        if result.succeeded:
            return Granted()
        found = result.range(0)
        if not found:
            return KeyMissing()
        return MarkMoved(self._decode(key_id, found[0].value))

    async def delete(self, key_id: str) -> None:
        await self.gateway.delete(self.mark_key(key_id))

    async def use_once(self, kind: str, record_id: str, ttl_s: float) -> bool:
        """Create the record if absent; a retried create that finds its own token was the first use."""
        _check_ttl(ttl_s)
        key = b64(self.once_key(kind, record_id))
        token = f"pqtunnel-once/1 {secrets.token_hex(16)}".encode()
        try:
            result = await self._create_once(key, token, await self._lease_for(ttl_s))
        except EtcdRequestRefused:  # e.g. our cached lease is gone (cluster restored): a new one, once
            self._lease = None
            result = await self._create_once(key, token, await self._lease_for(ttl_s))
        if result.succeeded:
            return True
        found = result.range(0)
        return bool(found) and found[0].value == token  # our own write, answered late

    async def _create_once(self, key: str, token: bytes, lease_id: int) -> TxnResult:
        return await self.gateway.txn(
            [{"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
            [{"request_put": {"key": key, "value": b64(token), "lease": str(lease_id)}}],
            [{"request_range": {"key": key}}])

    async def _lease_for(self, ttl_s: float) -> int:
        now = time.monotonic()
        if self._lease is not None and self._lease[1] - now >= ttl_s:
            return self._lease[0]
        lease_id, granted = await self.gateway.grant_lease(ttl_s + LEASE_SLACK_S)
        self._lease = (lease_id, now + granted)  # counted from before the request: errs short, never long
        return lease_id

    async def put_state(self, state_id: str, blob: bytes) -> None:
        await self.gateway.put(self.state_key(state_id), check_state(state_id, blob))

    async def get_state(self, state_id: str) -> bytes | None:
        found = await self.gateway.range(self.state_key(state_id))
        return self._state(state_id, found[0].value) if found else None

    async def delete_state(self, state_id: str) -> None:
        """Delete, then wait for a history compaction that began after the delete (HistoryCompactor)."""
        await self.gateway.delete(self.state_key(state_id))
        await self.compactor.after_delete()

    async def list_states(self, prefix: str) -> list[str]:
        start = f"{self._prefix}/state/".encode()
        keys = await self.gateway.keys_with_prefix(start + check_state_prefix(prefix).encode())
        return [key[len(start):].decode("ascii", "replace") for key in keys]

    async def health(self) -> StoreHealth:
        healthy, problems = await self.gateway.health()
        total = len(self.gateway.endpoints)
        detail = f"{healthy}/{total} endpoints healthy" + (f" ({'; '.join(problems)})" if problems else "")
        return StoreHealth(healthy > 0, detail)

    async def aclose(self) -> None:
        await self.gateway.aclose()


# --- choosing one ----------------------------------------------------------------------------------


def open_nonce_store(kind: str, *, codec: StoreCodec, path: Path | None = None, etcd: tuple[str, ...] = (),
                     emit: Emit = _ignore) -> SqliteNonceStore | EtcdNonceStore:
    """The store ``[ha] store`` names; opening contacts nothing remote (see ``health``)."""
    if kind == "etcd":
        return EtcdNonceStore(EtcdGateway(etcd), codec, emit)
    if path is None:
        raise StoreOpenError("the local nonce store needs a file path")
    return SqliteNonceStore(path, codec, emit)
