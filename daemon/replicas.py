"""A replica's shared sessions (``[ha]``, docs/ha.md): reserved counters, wrapped snapshots,
and sessions taken over from another replica.

With ``[ha]`` configured, every session this node answers is *shared*: its keys may move to
another replica of the node. So before it sends a single record the session needs

1. its wrapped snapshot in the store (so another replica can continue it), and
2. a counter block reserved by compare-and-swap (so no replica ever seals twice with one
   counter under its key),

and only then does it confirm the keys to the peer (``Tunnel.attach_counters``). A peer that
lost its connection to another replica comes back with a RESUME record as the first frame
of a new connection: ``take_over`` finds the snapshot, authenticates the RESUME under the
session's keys, makes sure through the store that no replica accepted that RESUME before,
asks the policy again, and continues the session from the stored counter marks.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import msgpack
import trio

from pqtunnel import events
from pqtunnel.crypto.backend import KEM_SIZES
from pqtunnel.crypto.suites import SUITES_BY_WIRE_ID, Suite
from pqtunnel.entropy import SYSTEM_ENTROPY
from pqtunnel.errors import (
    LeaseStoppedError,
    ProtocolError,
    ResumeRefusedError,
    StoreDataError,
    StoreUnavailableError,
    UntrustedPeerError,
)
from pqtunnel.handover import StateWrapper, resume_key_id, state_id
from pqtunnel.handshake import PROTOCOL_VERSION, alert_frame
from pqtunnel.identity import Identity
from pqtunnel.leases import CounterLease, Granted, MarkMoved, counter_key_id
from pqtunnel.noisestate import DHLEN
from pqtunnel.ratelimit import TokenBucket
from pqtunnel.session import Session, SessionTimers
from pqtunnel.tunnel import Tunnel, TunnelLimits
from pqtunnel.wire import FRAME_HEADER, Frame, FrameDecoder, Kind

from .connection import Connection
from .firstframe import MAX_FIRST_RECORD
from .ha import HaWiring
from .leasekeeper import LeaseKeeper, takeover_lease
from .logs import LOG
from .netio import monotonic_ms, wall_ms, write_now
from .trustpolicy import Admission

RESERVE_TIMEOUT = 5.0
"""Seconds a new or taken-over session may wait for its snapshot and first counter block."""
FIRST_FRAME_TIMEOUT = 10.0
RESUME_CAS_ATTEMPTS = 8
MOVE_BURST = 4
MOVE_INTERVAL = 10.0
"""How often one session may move to this replica: 4 times at once, then once every 10 s.
Sessions move when a replica or a path fails, rarely; a peer RESUMEing its own session over
and over (each time durable store writes, and no admission budget) is refused past that and
must handshake, which admission rations. Only a RESUME that was used counts: a replayed one
spends nothing of its session's allowance."""
MAX_MOVING_SESSIONS = 4096
"""Sessions whose recent moves a replica remembers (the least recent are forgotten)."""
SWEEP_INTERVAL = 60.0
"""Seconds between sweeps for the stored state of sessions that no replica holds any more."""
STATE_PREFIX = "session."
SHARED_HELLO_BURST = 40
SHARED_HELLO_INTERVAL = 0.05
"""The node-wide budget of HELLOs recorded in the shared replay cache (each one a durable
store write): 40 at once, then 20 a second, the handshakes admission lets a node sign
(pqtunnel/admission.py). Past it a replica relies on its own cache, as when the store does
not answer: a flood of fresh HELLOs cannot crowd out the counter reservations in the store."""


@dataclass(frozen=True)
class FixedSuite:
    """The suite of a session being resumed, as the admission reads it from a handshake."""

    suite: Suite


def plausible_hello(body: bytes, now_wall_ms: int, replay_window_ms: int) -> bool:
    """Whether a HELLO passes the handshake's first cheap checks (version, suite, a payload
    whose timestamp is inside the replay window): only such a HELLO is worth a store write.
    The handshake refuses the others itself, with the precise reason, before any signing."""
    suite = SUITES_BY_WIRE_ID.get(body[1]) if len(body) > 1 and body[0] == PROTOCOL_VERSION else None
    if suite is None:
        return False
    try:  # version, suite, e (32), e1 (the KEM key, hybrid suites), then the payload in clear
        payload = msgpack.unpackb(body[2 + DHLEN + (KEM_SIZES[suite.kem].public_key if suite.kem else 0):], raw=False)
    except (ValueError, msgpack.UnpackException):
        return False
    stamp = payload.get("ts") if isinstance(payload, dict) else None
    return isinstance(stamp, int) and not isinstance(stamp, bool) and abs(now_wall_ms - stamp) <= replay_window_ms


async def read_first_frame(stream: trio.SocketStream, preread: bytes) -> tuple[Frame, bytes]:
    """The first frame of a connection (a RESUME) and whatever bytes followed it."""
    decoder = FrameDecoder(max_record=MAX_FIRST_RECORD)
    data = preread
    with trio.fail_after(FIRST_FRAME_TIMEOUT):
        while True:
            frames = decoder.feed(data)  # FramingError if oversized: the caller refuses it
            if frames:
                used = FRAME_HEADER.size + len(frames[0].body)
                rest = preread[used:]
                return frames[0], rest
            try:
                data = await stream.receive_some(4096)
            except (trio.BrokenResourceError, OSError):
                data = b""  # reset by the peer: refused like an end, never a crash of the node
            if not data:
                raise ResumeRefusedError("the connection ended inside its first frame")
            preread += data


class ReplicaSessions:
    """The node's shared sessions: confirms new ones, takes over moved ones, forgets ended ones."""

    def __init__(self, ha: HaWiring, identity: Identity, emit: Callable[[events.Event], None]) -> None:
        self.ha = ha
        self.enabled = ha.settings.enabled
        self.replica = ha.settings.replica
        self.wrapper = StateWrapper.for_identity(identity, SYSTEM_ENTROPY)
        self.emit = emit
        self._hello_budget = TokenBucket.full(SHARED_HELLO_BURST, monotonic_ms())
        self._moves: OrderedDict[bytes, TokenBucket] = OrderedDict()

    @property
    def store(self):  # noqa: ANN201 - SqliteNonceStore | EtcdNonceStore
        return self.ha.store

    # --- new and taken-over sessions: snapshot first, then a counter block, then confirm -----------

    def counters_needed(self, conn: Connection) -> None:
        """The connection's session waits in RESERVING: reserve for it in its own nursery."""
        conn.start_task(self.confirm, conn)

    async def confirm(self, conn: Connection) -> None:
        session = conn.tunnel.session
        assert session.result is not None
        session_id = session.result.session_id
        try:
            with trio.fail_after(RESERVE_TIMEOUT):
                await self.store.put_state(state_id(session_id), self.wrapper.wrap(session.snapshot(wall_ms())))
                if session.handshake is not None:
                    await self._create_resume_mark(session_id)
                keeper = LeaseKeeper(await self._lease(session, session_id), self.store, self.emit)  # metrics
                await conn.start_service(keeper.run)
                await keeper.wait_ready()
        except (trio.TooSlowError, StoreUnavailableError, StoreDataError, LeaseStoppedError) as exc:
            reason = "it did not answer in time" if isinstance(exc, trio.TooSlowError) else str(exc)
            conn.abort(f"no counter block from the nonce store ({self.store.kind}): {reason}")
            return
        conn.counter_block = lambda: _held_block(keeper.lease)
        conn.start_task(_wake_writers_on_refill, conn, keeper)
        conn.apply(conn.tunnel.attach_counters(keeper.counters(), monotonic_ms(), self.replica))
        if session.migrations:
            conn.emit(conn.moved_event(self.replica, session.migrations))

    async def _create_resume_mark(self, session_id: bytes) -> None:
        """A new session's used-RESUME mark, created at 0 with it. A RESUME is taken only while
        the mark exists, so deleting it from the store cannot make a used RESUME new again."""
        if not isinstance(await self.store.reserve(resume_key_id(session_id), None, 0), Granted):
            raise StoreDataError(f"the RESUME mark of new session {session_id.hex()} exists already")

    async def hello_replayed(self, preread: bytes, replay_window_ms: int) -> bool:
        """The handshake's replay cache, shared by the replicas: True if a HELLO starting
        ``preread`` reached one of them before, within the replay window. Checked before the
        handshake spends a signature on it; each replica also keeps its own cache in memory.
        A store that does not answer decides nothing here (the local cache still applies, and
        no shared key is used without the store anyway)."""
        try:
            frames = FrameDecoder(max_record=MAX_FIRST_RECORD).feed(preread)
        except ProtocolError:
            return False  # the handshake itself refuses it, with the precise reason
        if not frames or frames[0].kind is not Kind.HELLO:
            return False
        body = bytes(frames[0].body)
        if not plausible_hello(body, wall_ms(), replay_window_ms):
            return False  # no store write for what the handshake refuses on its first bytes
        if not self._hello_budget.take(monotonic_ms(), SHARED_HELLO_BURST, SHARED_HELLO_INTERVAL * 1000):
            return False  # a flood: this replica's own cache decides, the store stays free
        digest = hashlib.sha256(body).hexdigest()
        try:
            return not await self.store.use_once("hello", digest, 2 * replay_window_ms / 1000)
        except (StoreUnavailableError, StoreDataError):
            return False

    async def _lease(self, session: Session, session_id: bytes) -> CounterLease:
        key_id = counter_key_id(session_id, "r2i")
        if session.handshake is not None:  # a new session: its key id is new, the mark is created
            return CounterLease.fresh(key_id)
        return await takeover_lease(self.store, key_id)  # from the stored mark: above every old block

    async def persist(self, conn: Connection) -> None:
        """After a rekey: the snapshot follows the new keys (the old one is replaced)."""
        try:
            await self.store.put_state(state_id(conn.tunnel.session.result.session_id),  # type: ignore[union-attr]
                                       self.wrapper.wrap(conn.tunnel.session.snapshot(wall_ms())))
        except (StoreUnavailableError, StoreDataError) as exc:
            LOG.warning("session %s: new keys not stored (%s): it cannot move to another replica until stored",
                        conn.peer_label, exc)

    async def forget(self, session_id: bytes, migrations: int) -> None:
        """A session ended for good (CLOSE): delete its snapshot and marks, unless another
        replica took it over since (its snapshot then counts more moves)."""
        try:
            blob = await self.store.get_state(state_id(session_id))
            if blob is None or self.wrapper.unwrap(session_id, blob).migrations != migrations:
                return
            await self.store.delete_state(state_id(session_id))
            for key_id in (counter_key_id(session_id, "r2i"), resume_key_id(session_id)):
                await self.store.delete(key_id)
        except (StoreUnavailableError, StoreDataError) as exc:
            LOG.info("session %s: its stored state stays for now (%s)", session_id.hex(), exc)

    async def sweep(self, held: Callable[[], set[bytes]], stale_after_ms: int) -> None:
        """Forever, every SWEEP_INTERVAL: delete the snapshots (and marks) of sessions nobody
        holds any more. A live session's snapshot is rewritten at every rekey, so one older
        than ``stale_after_ms`` and not held here was lost with its replica and its peer."""
        while True:
            await trio.sleep(SWEEP_INTERVAL)
            try:
                await self._sweep_once(held(), stale_after_ms)
            except (StoreUnavailableError, StoreDataError) as exc:
                LOG.info("nonce store %s: stale sessions not swept this time (%s)", self.store.kind, exc)

    async def _sweep_once(self, held: set[bytes], stale_after_ms: int) -> int:
        swept = 0
        for store_id in await self.store.list_states(STATE_PREFIX):
            session_id = bytes.fromhex(store_id[len(STATE_PREFIX):])
            blob = await self.store.get_state(store_id)
            if session_id in held or blob is None:
                continue
            try:
                snapshot = self.wrapper.unwrap(session_id, blob)
            except StoreDataError as exc:
                self.emit(events.StoreDataRefused(self.store.kind, store_id, str(exc)))
                continue  # never trusted, never deleted by us: an operator looks at it
            if snapshot.is_stale(wall_ms(), stale_after_ms):
                await self.forget(session_id, snapshot.migrations)
                swept += 1
        return swept

    # --- a RESUME as the first frame of a connection --------------------------------------------------

    async def take_over(self, stream: trio.SocketStream, remote: str, preread: bytes, *,
                        admission: Callable[[Suite], Admission], backend: Any, timers: SessionTimers,
                        limits: TunnelLimits) -> Connection | None:
        """A Connection continuing the session a RESUME names (RESERVING until its counters
        arrive), or None after refusing it with an ALERT and one log line."""
        session_hex = "?"
        try:
            frame, rest = await read_first_frame(stream, preread)
            session_hex = bytes(frame.body[:8]).hex() if len(frame.body) >= 8 else "?"
            session, authorize = await self._resumable(frame, admission, backend, timers)
        except (ResumeRefusedError, ProtocolError, UntrustedPeerError, trio.TooSlowError) as exc:
            reason = "no RESUME arrived in time" if isinstance(exc, trio.TooSlowError) else str(exc)
            fault = events.Fault.LOCAL if isinstance(exc, _StoreTrouble) else events.Fault.PEER
            await self._refuse(stream, remote, session_hex, reason, fault)
            return None
        conn = Connection(stream, Tunnel.around(session, now_ms=monotonic_ms(), limits=limits), remote)
        conn.admission, conn.preread = authorize, rest
        return conn

    async def _resumable(self, frame: Frame, admission: Callable[[Suite], Admission], backend: Any,
                         timers: SessionTimers) -> tuple[Session, Admission]:
        if frame.kind is not Kind.RECORD or len(frame.body) < 16:
            raise ResumeRefusedError("the first frame is not a RESUME record")
        session_id = bytes(frame.body[:8])
        try:
            snapshot = self.wrapper.unwrap(session_id, await self._stored(session_id))
        except StoreDataError as exc:
            self.emit(events.StoreDataRefused(self.store.kind, state_id(session_id), str(exc)))
            raise _StoreTrouble(str(exc)) from None
        session = Session.from_snapshot(snapshot, backend=backend, entropy=SYSTEM_ENTROPY, now_ms=monotonic_ms(),
                                        timers=timers)
        counter, _ = session.open_resume(frame.body)  # RecordError unless sealed under the session's keys
        assert session.result is not None
        authorize = admission(session.result.suite)
        if authorize(session.result.peer) != session.result.peer_name:
            raise UntrustedPeerError(f"the policy no longer names {session.result.peer.fingerprint} "
                                     f"{session.result.peer_name}")
        moves = self._moves_of(session_id)
        if not moves.available(monotonic_ms(), MOVE_BURST, MOVE_INTERVAL * 1000):
            raise ResumeRefusedError(f"session {session_id.hex()} moved too often; it must handshake anew")
        await self._use_resume_counter(session_id, counter)
        moves.take(monotonic_ms(), MOVE_BURST, MOVE_INTERVAL * 1000)
        return session, authorize

    def _moves_of(self, session_id: bytes) -> TokenBucket:
        """The allowance of moves to this replica left to a session (MOVE_BURST, MOVE_INTERVAL)."""
        moves = self._moves.pop(session_id, None) or TokenBucket.full(MOVE_BURST, monotonic_ms())
        self._moves[session_id] = moves
        while len(self._moves) > MAX_MOVING_SESSIONS:
            self._moves.popitem(last=False)
        return moves

    async def _stored(self, session_id: bytes) -> bytes:
        try:
            blob = await self.store.get_state(state_id(session_id))
        except StoreUnavailableError as exc:
            raise _StoreTrouble(f"nonce store {self.store.kind} unavailable: {exc}") from None
        if blob is None:
            raise ResumeRefusedError(f"no session {session_id.hex()} is stored (ended, or never ours)")
        return blob

    async def _use_resume_counter(self, session_id: bytes, counter: int) -> None:
        """Record, atomically across replicas, that the RESUME with ``counter`` was used: the
        mark moves to ``counter + 1`` only from below it, so a replayed RESUME is refused. The
        mark is never created here: a missing one refuses the RESUME."""
        key_id = resume_key_id(session_id)
        try:
            expected = await self.store.read_mark(key_id)
            if expected is None:  # created with the session: gone means ended, or deleted by someone
                raise ResumeRefusedError(f"session {session_id.hex()} has no RESUME mark in the store")
            for _ in range(RESUME_CAS_ATTEMPTS):
                if expected > counter:
                    raise ResumeRefusedError(f"RESUME {counter} of session {session_id.hex()} was used before (replay)")
                outcome = await self.store.reserve(key_id, expected, counter + 1)
                if isinstance(outcome, Granted):
                    return
                if not isinstance(outcome, MarkMoved):
                    raise ResumeRefusedError(f"session {session_id.hex()} ended while it was being resumed")
                expected = outcome.current
        except (StoreUnavailableError, StoreDataError) as exc:
            raise _StoreTrouble(f"nonce store {self.store.kind}: {exc}") from None
        raise _StoreTrouble(f"RESUME mark of session {session_id.hex()} kept moving")

    async def _refuse(self, stream: trio.SocketStream, remote: str, session_hex: str, reason: str,
                      fault: events.Fault) -> None:
        write_now(stream.socket.fileno(), [alert_frame(ResumeRefusedError(reason))])
        await trio.aclose_forcefully(stream)
        self.emit(events.ResumeRefused(addr=remote, session_id=session_hex, reason=reason, fault=fault))


def stale_after_ms(timers: SessionTimers) -> int:
    """How old a snapshot may grow while its session lives: it is rewritten at every rekey."""
    return max(4 * timers.rekey_after_ms, 2 * timers.dead_after_ms)


class _StoreTrouble(ResumeRefusedError):
    """A RESUME refused because the store could not answer or vouch for its data (our side)."""


def _held_block(lease: CounterLease) -> list[int] | None:
    """The block the lease seals from now, ``[start, end)``."""
    held = lease.held
    return [held[0].start, held[0].end] if held else None


async def _wake_writers_on_refill(conn: Connection, keeper: LeaseKeeper) -> None:
    """Stream writers that waited for counters (``Tunnel.writable``) go on once a block arrives."""
    while keeper.lease.stopped is None:
        await keeper.wait_changed()
        conn.kick()
        conn.wake_writers()
