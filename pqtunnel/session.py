"""One encrypted session (sans-IO): handshake, record layer, keepalive, in-band rekey, close.

The tunnel core (``pqtunnel/tunnel.py``) composes this with the stream multiplexer; tests
drive it alone. Callers feed received bytes with the current *monotonic* time in
milliseconds (every timer runs on it, so a wall-clock step cannot fake a dead peer or skip
a rekey) and, while the handshake runs, the *wall-clock* time (HELLO timestamps and
cookies are wall time on the wire). Peer mistakes raise ``RemoteProtocolError``
subclasses; calls the current state does not allow raise ``SessionStateError`` (our bug).
On a responder-side handshake failure an ALERT is queued first so the initiator learns why.

States (``SessionState``)::

    HANDSHAKING --keys--> CONFIRMING (initiator) --first record--> ESTABLISHED --close--> CLOSED
    HANDSHAKING --keys--> ESTABLISHED (responder)                         any --close--> CLOSED
    HANDSHAKING --keys--> RESERVING (responder, keys shared by replicas) --counters--> ESTABLISHED
    snapshot --RESUME opened--> RESERVING (replica taking a session over) --counters--> ESTABLISHED
    old session --> RESUMING (initiator, on a new connection) --RESUMED--> ESTABLISHED

A replica's session seals only with counters from durably reserved blocks (``attach_counters``);
until it has them it sends nothing at all (docs/ha.md).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from enum import Enum
from typing import Union

from noise.functions.hash import hkdf

from .crypto import backend as prim
from .crypto.backend import CryptographyBackend
from .entropy import Entropy
from .handover import CHALLENGE_SIZE, MAX_REPLICA_NAME, SessionSnapshot, check_resume_confirm, parse_resume, parse_resumed, resume_body, resumed_body
from .handshake import HandshakeResult, InitiatorHandshake, ResponderHandshake, alert_frame, parse_alert
from .tickets import ResumeInitiator, ResumeResponder
from .errors import HandshakeError, ProtocolError, RecordError, RekeyError, SessionStateError
from .records import ContentType, CounterSource, RecordLayer
from .wire import MAX_HANDSHAKE_FRAME, MAX_RECORD_FRAME, MAX_RECORD_PLAINTEXT, Frame, FrameDecoder, Kind

REKEY_IKM_LABEL = b"pqtunnel/1 rekey\x00"
PING = struct.Struct(">Q")
MAX_CLOSE_REASON = 512
"""CLOSE reasons are cut to this many bytes when sent and when received (the log shows them)."""


class SessionState(Enum):
    HANDSHAKING = "handshaking"
    CONFIRMING = "confirming"
    """Initiator only: keys derived, waiting for the responder's first record to confirm them."""
    RESERVING = "reserving"
    """Responder whose keys replicas share: keys known, no counter block reserved yet; sends nothing."""
    RESUMING = "resuming"
    """Initiator on a new connection to another replica: RESUME sent, waiting for RESUMED."""
    ESTABLISHED = "established"
    CLOSED = "closed"


class RekeyState(Enum):
    IDLE = "idle"
    INITIATED = "initiated"
    """We sent REKEY_INIT and wait for REKEY_RESP."""
    RESPONDED = "responded"
    """We sent REKEY_RESP under the new send key and wait for REKEY_DONE to switch receiving."""


_TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    SessionState.HANDSHAKING: frozenset({SessionState.CONFIRMING, SessionState.ESTABLISHED, SessionState.RESERVING,
                                         SessionState.CLOSED}),
    SessionState.CONFIRMING: frozenset({SessionState.ESTABLISHED, SessionState.CLOSED}),
    SessionState.RESERVING: frozenset({SessionState.ESTABLISHED, SessionState.CLOSED}),
    SessionState.RESUMING: frozenset({SessionState.ESTABLISHED, SessionState.CLOSED}),
    SessionState.ESTABLISHED: frozenset({SessionState.CLOSED}),
    SessionState.CLOSED: frozenset(),
}


@dataclass(frozen=True)
class Established:
    result: HandshakeResult


@dataclass(frozen=True)
class RecordDataReceived:
    """Plaintext of one DATA record (the tunnel hands it to the multiplexer)."""

    data: bytes | memoryview  # a view of the decrypted record: consume it before the next feed


@dataclass(frozen=True)
class PongReceived:
    ping_id: int
    sent_ms: int


@dataclass(frozen=True)
class Rekeyed:
    epoch: int


@dataclass(frozen=True)
class PeerClosed:
    reason: str


@dataclass(frozen=True)
class TicketGranted:
    """Initiator: the responder granted a resumption ticket (``tickets.accept_ticket_grant``)."""

    body: bytes


@dataclass(frozen=True)
class CountersNeeded:
    """A replica's keys are ready: reserve the first counter block, then ``attach_counters``."""

    result: HandshakeResult


@dataclass(frozen=True)
class Resumed:
    """The initiator's session continues on another replica (after Established)."""

    replica: str
    migrations: int


Event = Union[Established, RecordDataReceived, PongReceived, Rekeyed, PeerClosed, CountersNeeded, Resumed,
              TicketGranted]

HandshakeMachine = Union[InitiatorHandshake, ResponderHandshake, ResumeInitiator, ResumeResponder]
"""A full handshake, or a resumption with a ticket (one round trip): the same result either way."""


class KeepaliveTimeout(ProtocolError):
    """Nothing arrived from the peer for longer than the dead-peer timeout."""


@dataclass(frozen=True)
class SessionTimers:
    """Keepalive and rekey budgets. Defaults follow WireGuard's spirit (rekey every 2 min)."""

    keepalive_ms: int = 10_000
    dead_after_ms: int = 35_000
    handshake_timeout_ms: int = 10_000
    rekey_after_ms: int = 120_000
    rekey_after_bytes: int = 1 << 30


def _blake2s_hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2s).digest()


class _PendingRekey:
    def __init__(self, ephemeral: bytes, kem_key: prim.KemPrivateKey | None) -> None:
        self.ephemeral = ephemeral
        self.kem_key = kem_key


class Session:
    """A session from the first handshake byte to close."""

    def __init__(self, handshake: HandshakeMachine, *, now_ms: int,
                 timers: SessionTimers | None = None, shared_keys: bool = False) -> None:
        self._setup(handshake.is_initiator, handshake.backend, handshake.entropy, now_ms, timers)
        self.handshake: HandshakeMachine | None = handshake
        self.with_ticket = isinstance(handshake, (ResumeInitiator, ResumeResponder))
        """Established by a resumption ticket rather than a full handshake (``sessions``)."""
        self.shared_keys = shared_keys
        """Responder on a replica: its keys may move to another replica, so it seals only with
        reserved counters (``CountersNeeded``, then ``attach_counters``)."""

    @classmethod
    def from_snapshot(cls, snapshot: SessionSnapshot, *, backend: CryptographyBackend, entropy: Entropy,
                      now_ms: int, timers: SessionTimers | None = None) -> Session:
        """A replica taking over a stored session: ``open_resume`` the peer's RESUME next."""
        session = cls.__new__(cls)
        session._setup(False, backend, entropy, now_ms, timers)
        session.shared_keys = True
        session._establish(snapshot.result(), now_ms)
        session.epoch = snapshot.epoch
        session.migrations = snapshot.migrations + 1
        session.state = SessionState.RESERVING
        return session

    @classmethod
    def resuming(cls, old: Session, now_ms: int) -> Session:
        """The initiator continuing ``old`` (same keys and counters) on a new connection."""
        if not old.is_initiator or old.records is None or old.result is None or not old.confirmed:
            raise SessionStateError("only an initiator's confirmed session can be resumed")
        session = cls.__new__(cls)
        session._setup(True, old.backend, old.entropy, now_ms, old.timers)
        session.result, session.records, session._chain = old.result, old.records, old._chain
        session._decoder.max_record = MAX_RECORD_FRAME
        session.epoch, session.migrations = old.epoch, old.migrations
        session.bytes_sent, session.bytes_received = old.bytes_sent, old.bytes_received
        session._bytes_at_rekey = session.bytes_sent + session.bytes_received
        session.state = SessionState.RESUMING
        return session

    def _setup(self, is_initiator: bool, backend: CryptographyBackend, entropy: Entropy, now_ms: int,
               timers: SessionTimers | None) -> None:
        self.handshake = None
        self.with_ticket = False
        self.shared_keys = False
        self.is_initiator = is_initiator
        self.state = SessionState.HANDSHAKING
        self.rekey_state = RekeyState.IDLE
        self._was_confirmed = False
        self.timers = timers or SessionTimers()
        self.backend = backend
        self.entropy = entropy
        self.migrations = 0
        """How often this session moved to another replica (``sessions``)."""
        self.replica = ""
        """The peer replica's name it announced in RESUMED (initiator), or ours (replica)."""
        self._challenge = b""
        self._confirm_challenge = b""
        """A replica after RESUMED: the challenge the peer's next record (RESUME_CONFIRM) must echo."""
        self.result: HandshakeResult | None = None
        self.records: RecordLayer | None = None
        self._decoder = FrameDecoder(max_record=MAX_HANDSHAKE_FRAME)  # no big records before keys exist
        self._outgoing: list[bytes | memoryview] = []
        self._queued_bytes = 0
        self.started_ms = now_ms
        self.last_received_ms = now_ms
        self.last_sent_ms = now_ms
        self.bytes_sent = 0
        self.bytes_received = 0
        self.epoch = 0
        self._chain = b""
        self._rekey_ms = now_ms
        self._bytes_at_rekey = 0
        self._pending: _PendingRekey | None = None
        self._next_recv_key: bytes | None = None
        self._next_ping_id = 1
        self._last_ping_ms = now_ms

    # --- lifecycle ------------------------------------------------------------------------------

    def _enter(self, state: SessionState) -> None:
        if state not in _TRANSITIONS[self.state]:
            raise SessionStateError(f"session cannot go from {self.state.value} to {state.value}")
        self.state = state

    @property
    def established(self) -> bool:
        """Keys exist (CONFIRMING or later, unless closed before)."""
        return self.records is not None

    @property
    def confirmed(self) -> bool:
        """Both sides proved they hold the keys: the session carries application data."""
        return self.state is SessionState.ESTABLISHED or (self.state is SessionState.CLOSED and self._was_confirmed)

    @property
    def closed(self) -> bool:
        return self.state is SessionState.CLOSED

    def start(self, now_ms: int, wall_ms: int | None = None) -> None:
        """Initiator only: queue the HELLO (timestamped with ``wall_ms``, default ``now_ms``),
        or, resuming, the RESUME record with a fresh challenge."""
        if self.state is SessionState.RESUMING:
            self._challenge = self.entropy.random_bytes(CHALLENGE_SIZE)
            self._queue(self._require_records().seal(ContentType.RESUME, resume_body(self._challenge)), now_ms)
            return
        if self.handshake is None or not self.handshake.is_initiator:
            raise SessionStateError("only the initiator starts a handshake")
        self._queue(self.handshake.start(now_ms if wall_ms is None else wall_ms), now_ms)

    def data_to_send(self) -> bytes:
        return b"".join(self.buffers_to_send())

    def buffers_to_send(self) -> list[bytes | memoryview]:
        """Everything queued, as separate buffers for a scatter-gather send (no joining copy)."""
        buffers, self._outgoing, self._queued_bytes = self._outgoing, [], 0
        return buffers

    @property
    def pending_bytes(self) -> int:
        """Bytes queued for the socket: the shell applies backpressure on this."""
        return self._queued_bytes

    def _queue(self, frame: bytes, now_ms: int | None = None) -> None:
        if frame:
            self._outgoing.append(frame)
            self._queued_bytes += len(frame)
        if now_ms is not None:
            self.last_sent_ms = now_ms

    def receive_data(self, data: bytes, now_ms: int, wall_ms: int | None = None) -> list[Event]:
        """Feed bytes from the peer. Raises ProtocolError subclasses for anything refused.

        ``now_ms`` is monotonic time (timers); ``wall_ms`` is wall-clock time for the
        handshake's timestamps and cookies (defaults to ``now_ms`` for single-clock callers).
        """
        if self.closed:
            return []
        self.last_received_ms = now_ms
        events: list[Event] = []
        for frame in self._decoder.feed(data):
            if frame.kind is Kind.RECORD:
                events.extend(self._on_record(frame.body, now_ms))
            else:
                events.extend(self._on_handshake_frame(frame, now_ms, now_ms if wall_ms is None else wall_ms))
            if self.closed:
                break
        return events

    def _on_handshake_frame(self, frame: Frame, now_ms: int, wall_ms: int) -> list[Event]:
        if self.is_initiator and frame.kind is Kind.ALERT and not self.confirmed:
            raise parse_alert(frame.body)  # e.g. the responder does not trust us (after FINISH)
        if self.state is not SessionState.HANDSHAKING or self.handshake is None:
            raise ProtocolError(f"unexpected {frame.kind.name} frame inside an established session")
        try:
            step = self.handshake.receive(frame, wall_ms)
        except HandshakeError as exc:
            if not self.is_initiator:
                self._queue(alert_frame(exc))
            raise
        self._queue(step.to_send, now_ms)
        if step.result is None:
            return []
        self._establish(step.result, now_ms)
        if self.is_initiator:
            self._enter(SessionState.CONFIRMING)
            return []  # Established once the responder's first record confirms the keys
        if self.shared_keys:
            self._enter(SessionState.RESERVING)
            return [CountersNeeded(step.result)]  # nothing is sealed before a block is reserved
        self._enter(SessionState.ESTABLISHED)
        self.ping(now_ms)  # key confirmation: the initiator's first authenticated record
        return [Established(step.result)]

    def _establish(self, result: HandshakeResult, now_ms: int) -> None:
        self.result = result
        self.records = RecordLayer(result.aead, result.send_key, result.recv_key, result.session_id)
        self._decoder.max_record = MAX_RECORD_FRAME
        self._chain = result.rekey_chain
        self._rekey_ms = now_ms

    # --- replicas: counters from reserved blocks, and the RESUME exchange -----------------------------

    def open_resume(self, body: bytes | memoryview) -> tuple[int, bytes]:
        """A replica taking over: authenticate the peer's RESUME record (the first frame of its
        new connection); returns (its counter, the challenge). The caller must then make sure,
        through the store, that no replica accepted this counter before (replays)."""
        if self.state is not SessionState.RESERVING or self.records is None or self.handshake is not None:
            raise SessionStateError("only a session taken over from a snapshot opens a RESUME")
        content_type, data = self.records.open(body)
        if content_type is not ContentType.RESUME:
            raise RecordError(f"expected RESUME, got {content_type.name}")
        self._challenge = parse_resume(data)
        return self.records.last_recv_counter, self._challenge

    def attach_counters(self, counters: CounterSource, now_ms: int, replica: str = "") -> list[Event]:
        """Reserved counters are in hand: seal from them from now on and confirm the session
        (a PING after a full handshake, RESUMED with the echoed challenge after a RESUME)."""
        if self.state is not SessionState.RESERVING or self.records is None or self.result is None:
            raise SessionStateError(f"counters cannot be attached while {self.state.value}")
        self.records.counters = counters
        self.replica = replica
        self._enter(SessionState.ESTABLISHED)
        if self._challenge:
            self._confirm_challenge = self.entropy.random_bytes(CHALLENGE_SIZE)
            body = resumed_body(self._challenge, self._confirm_challenge, replica)
            self._queue(self.records.seal(ContentType.RESUMED, body), now_ms)
        else:
            self.ping(now_ms)
            self._queue(self.records.seal(ContentType.REPLICA, replica.encode()[:MAX_REPLICA_NAME]), now_ms)
        return [Established(self.result)]

    def send_ticket(self, grant: bytes, now_ms: int) -> None:
        """Responder: send a ticket grant (``tickets.issue_ticket``) inside the session."""
        if self.is_initiator:
            raise SessionStateError("only the responder grants tickets")
        self._queue(self._require_records().seal(ContentType.TICKET, grant), now_ms)

    def snapshot(self, wall_ms: int) -> SessionSnapshot:
        """What another replica needs to continue this (responder) session, keys of now."""
        if self.records is None or self.result is None or self.is_initiator:
            raise SessionStateError("only an established responder session has a snapshot")
        send_key, recv_key = self.records.keys
        return SessionSnapshot.of(self.result, send_key=send_key, recv_key=recv_key, rekey_chain=self._chain,
                                  epoch=self.epoch, migrations=self.migrations, wall_ms=wall_ms)

    # --- sending ------------------------------------------------------------------------------------

    def _require_records(self) -> RecordLayer:
        """The record layer, or SessionStateError: sending before keys or after close is our bug."""
        if self.records is None:
            raise SessionStateError("session is not established yet")
        if self.closed:
            raise SessionStateError("session is closed")
        return self.records

    def send(self, data: bytes, now_ms: int) -> None:
        """Queue application data, split into records of at most MAX_RECORD_PLAINTEXT."""
        records = self._require_records()
        view = memoryview(data)
        for offset in range(0, len(view), MAX_RECORD_PLAINTEXT):
            for part in records.seal_parts(ContentType.DATA, view[offset : offset + MAX_RECORD_PLAINTEXT]):
                self._queue(part)
        self.bytes_sent += len(data)
        self.last_sent_ms = now_ms

    def send_prepared(self, buffer: bytearray, now_ms: int) -> None:
        """Queue one DATA record whose plaintext is built in place: ``buffer[0]`` is reserved
        for the content type, at most MAX_RECORD_PLAINTEXT bytes of data follow (a mux batch).
        Encrypted without a copy; the buffer is written and must not be reused."""
        for part in self._require_records().seal_prepared(ContentType.DATA, buffer):
            self._queue(part)
        self.bytes_sent += len(buffer) - 1
        self.last_sent_ms = now_ms

    def ping(self, now_ms: int) -> int:
        """Queue a PING; the matching PongReceived carries the returned id."""
        ping_id = self._next_ping_id
        self._next_ping_id += 1
        self._last_ping_ms = now_ms
        self._queue(self._require_records().seal(ContentType.PING, PING.pack(ping_id) + PING.pack(now_ms)), now_ms)
        return ping_id

    def close(self, reason: str) -> None:
        """Queue an authenticated CLOSE carrying the reason; further input is ignored."""
        if self.closed:
            return
        if self.records is not None and self.state is not SessionState.RESERVING:  # no counter yet: no record
            self._queue(self.records.seal(ContentType.CLOSE, reason.encode()[:MAX_CLOSE_REASON]))
        self._close()

    def _close(self) -> None:
        self._was_confirmed = self.confirmed
        self._enter(SessionState.CLOSED)

    # --- receiving ----------------------------------------------------------------------------------

    def _on_record(self, body: bytes, now_ms: int) -> list[Event]:
        if self.records is None:
            raise RecordError("RECORD frame before the handshake finished")
        if self.state is SessionState.RESERVING:
            raise RecordError("record before this replica confirmed the session")
        content_type, data = self.records.open(body)
        if self.state is SessionState.RESUMING:
            return self._on_resumed(content_type, data, now_ms)
        if self._confirm_challenge:
            if content_type is not ContentType.RESUME_CONFIRM:
                raise RecordError(f"expected RESUME_CONFIRM after RESUMED, got {content_type.name} (a replayed RESUME?)")
            check_resume_confirm(data, self._confirm_challenge)
            self._confirm_challenge = b""
            return []
        if self.state is SessionState.CONFIRMING:
            self._enter(SessionState.ESTABLISHED)
            assert self.result is not None
            return [Established(self.result), *self._on_content(content_type, data, now_ms)]
        return self._on_content(content_type, data, now_ms)

    def _on_resumed(self, content_type: ContentType, data: memoryview, now_ms: int) -> list[Event]:
        if content_type is not ContentType.RESUMED:
            raise RecordError(f"expected RESUMED, got {content_type.name}")
        replica_challenge, self.replica = parse_resumed(data, self._challenge)
        self.migrations += 1
        self._enter(SessionState.ESTABLISHED)
        self._queue(self._require_records().seal(ContentType.RESUME_CONFIRM, replica_challenge), now_ms)
        assert self.result is not None
        return [Established(self.result), Resumed(self.replica, self.migrations)]

    def _on_content(self, content_type: ContentType, data: memoryview, now_ms: int) -> list[Event]:
        if content_type is ContentType.DATA:
            self.bytes_received += len(data)
            return [RecordDataReceived(data)]
        return self._on_control(content_type, bytes(data), now_ms)

    def _on_control(self, content_type: ContentType, data: bytes, now_ms: int) -> list[Event]:
        if content_type is ContentType.PING:
            if len(data) != 2 * PING.size:
                raise RecordError("PING has the wrong size")  # and cannot be used to amplify
            self._queue(self._require_records().seal(ContentType.PONG, data), now_ms)
            return []
        if content_type is ContentType.PONG:
            if len(data) != 2 * PING.size:
                raise RecordError("PONG has the wrong size")
            return [PongReceived(PING.unpack_from(data)[0], PING.unpack_from(data, PING.size)[0])]
        if content_type is ContentType.CLOSE:
            self._close()
            reason = data[:MAX_CLOSE_REASON].decode(errors="replace")  # the peer's text, bounded as sent
            return [PeerClosed(reason or "no reason given")]
        if content_type is ContentType.REPLICA and self.is_initiator:
            self.replica = data[:MAX_REPLICA_NAME].decode(errors="replace")
            return []
        if content_type is ContentType.TICKET and self.is_initiator:
            return [TicketGranted(data)]
        if content_type in (ContentType.RESUME, ContentType.RESUMED, ContentType.REPLICA, ContentType.TICKET,
                            ContentType.RESUME_CONFIRM):
            raise RecordError(f"{content_type.name} inside an established session")
        return self._on_rekey(content_type, data, now_ms)

    # --- timers ----------------------------------------------------------------------------------------

    def tick(self, now_ms: int) -> None:
        """Drive keepalive and rekey from the shell's clock; raises KeepaliveTimeout.

        A no-op once closed: the shell may still tick while it flushes the CLOSE (or the
        GOAWAY) to a peer that does not read, and a closed session sends nothing more.
        """
        if self.closed:
            return
        if not self.confirmed:
            if now_ms - self.started_ms > self.timers.handshake_timeout_ms:
                raise KeepaliveTimeout(f"handshake did not finish within {self.timers.handshake_timeout_ms / 1000:.0f} s")
            return
        silent_for = now_ms - self.last_received_ms
        if silent_for > self.timers.dead_after_ms:
            raise KeepaliveTimeout(f"peer silent for {silent_for / 1000:.0f} s")
        if self.rekey_due(now_ms):
            self.start_rekey(now_ms)
        idle = now_ms - self.last_sent_ms >= self.timers.keepalive_ms
        unanswered = silent_for >= self.timers.keepalive_ms and now_ms - self._last_ping_ms >= self.timers.keepalive_ms
        if idle or unanswered:
            self.ping(now_ms)

    def rekey_due(self, now_ms: int) -> bool:
        if self.rekey_state is not RekeyState.IDLE or self.state is not SessionState.ESTABLISHED:
            return False
        moved = self.bytes_sent + self.bytes_received - self._bytes_at_rekey
        return now_ms - self._rekey_ms >= self.timers.rekey_after_ms or moved >= self.timers.rekey_after_bytes

    # --- in-band rekey: a fresh hybrid exchange bound to the previous key chain -----------------------

    def start_rekey(self, now_ms: int) -> None:
        """Send REKEY_INIT with fresh X25519 and ML-KEM ephemerals; streams keep flowing."""
        records = self._require_records()
        if self.rekey_state is not RekeyState.IDLE:
            return
        assert self.result is not None
        ephemeral = self.entropy.x25519_private()
        kem = self.result.suite.kem
        kem_key = self.backend.kem_keypair(kem, self.entropy.kem_seed()) if kem else None
        self._pending = _PendingRekey(ephemeral, kem_key)
        self.rekey_state = RekeyState.INITIATED
        body = prim.x25519_public(ephemeral) + (kem_key.public_bytes() if kem_key else b"")
        self._queue(records.seal(ContentType.REKEY_INIT, body), now_ms)

    def _on_rekey(self, content_type: ContentType, data: bytes, now_ms: int) -> list[Event]:
        if content_type is ContentType.REKEY_INIT:
            self._on_rekey_init(data, now_ms)
            return []
        if content_type is ContentType.REKEY_RESP:
            return self._on_rekey_resp(data, now_ms)
        if data:
            raise RekeyError(f"REKEY_DONE must be empty, not {len(data)} bytes")
        return self._on_rekey_done(now_ms)

    def _expect_size(self, data: bytes, kem_part: str) -> None:
        assert self.result is not None
        kem = self.result.suite.kem
        extra = 0 if kem is None else getattr(prim.KEM_SIZES[kem], kem_part)
        if len(data) != 32 + extra:
            raise RekeyError(f"rekey message has {len(data)} bytes, expected {32 + extra}")

    def _on_rekey_init(self, data: bytes, now_ms: int) -> None:
        assert self.result is not None and self.records is not None
        if self.rekey_state is RekeyState.INITIATED:
            if self.is_initiator:
                return  # both sides started a rekey: the session initiator's wins
            self._pending = None
            self.rekey_state = RekeyState.IDLE
        if self.rekey_state is RekeyState.RESPONDED:
            raise RekeyError("REKEY_INIT while a previous rekey is unfinished")
        self._expect_size(data, "public_key")
        ephemeral = self.entropy.x25519_private()
        our_public = prim.x25519_public(ephemeral)
        dh = self._rekey_dh(ephemeral, data[:32])
        kem_secret, kem_ciphertext = b"", b""
        if self.result.suite.kem is not None:
            try:
                kem_secret, kem_ciphertext = self.backend.kem_encapsulate(self.result.suite.kem, data[32:])
            except ValueError:
                raise RekeyError("peer's rekey ML-KEM key is invalid") from None
        send_key, recv_key = self._derive(data[:32], our_public, dh, kem_secret)
        self._queue(self.records.seal(ContentType.REKEY_RESP, our_public + kem_ciphertext), now_ms)
        self.records.set_send_key(send_key)
        self._next_recv_key = recv_key
        self.rekey_state = RekeyState.RESPONDED

    def _on_rekey_resp(self, data: bytes, now_ms: int) -> list[Event]:
        assert self.records is not None
        pending = self._pending
        if self.rekey_state is not RekeyState.INITIATED or pending is None:
            raise RekeyError("REKEY_RESP without a rekey in progress")
        self._expect_size(data, "ciphertext")
        dh = self._rekey_dh(pending.ephemeral, data[:32])
        kem_secret = b""
        if pending.kem_key is not None:
            try:
                kem_secret = pending.kem_key.decapsulate(data[32:])
            except ValueError:
                raise RekeyError("peer's rekey ML-KEM ciphertext is malformed") from None
        send_key, recv_key = self._derive(prim.x25519_public(pending.ephemeral), data[:32], dh, kem_secret)
        self.records.set_recv_key(recv_key)
        self._queue(self.records.seal(ContentType.REKEY_DONE), now_ms)
        self.records.set_send_key(send_key)
        self._pending = None
        self.rekey_state = RekeyState.IDLE
        return [self._rekeyed(now_ms)]

    def _on_rekey_done(self, now_ms: int) -> list[Event]:
        assert self.records is not None
        if self.rekey_state is not RekeyState.RESPONDED or self._next_recv_key is None:
            raise RekeyError("REKEY_DONE without a rekey in progress")
        self.records.set_recv_key(self._next_recv_key)
        self._next_recv_key = None
        self.rekey_state = RekeyState.IDLE
        return [self._rekeyed(now_ms)]

    def _rekeyed(self, now_ms: int) -> Rekeyed:
        self.epoch += 1
        self._rekey_ms = now_ms
        self._bytes_at_rekey = self.bytes_sent + self.bytes_received
        return Rekeyed(self.epoch)

    @staticmethod
    def _rekey_dh(private: bytes, public: bytes) -> bytes:
        try:
            return prim.x25519_dh(private, public)
        except ValueError:
            raise RekeyError("peer sent a low-order X25519 rekey key") from None

    def _derive(self, init_public: bytes, resp_public: bytes, dh: bytes, kem_secret: bytes) -> tuple[bytes, bytes]:
        """New chain and direction keys; returns (our send key, our receive key)."""
        assert self.result is not None
        material = REKEY_IKM_LABEL + init_public + resp_public + dh + kem_secret
        chain, i2r, r2i = hkdf(self._chain, material, 3, _blake2s_hmac)
        self._chain = chain
        return (i2r, r2i) if self.is_initiator else (r2i, i2r)
