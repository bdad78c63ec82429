"""The tunnel core: one sans-IO state machine for a whole peer connection.

A ``Tunnel`` composes the encrypted session (handshake, records, keepalive, rekey, close:
``session.py``) with the stream multiplexer (``mux.py``). The I/O shell only pumps bytes
and time through it::

    tunnel = Tunnel(handshake, now_ms=monotonic_ms())
    tunnel.start(now_ms, wall_ms)                        # initiator
    events = tunnel.receive_data(data, now_ms, wall_ms)  # bytes from the socket
    tunnel.tick(now_ms)                                  # about once a second
    stream_id = tunnel.open_stream({"service": "web"})   # and the other stream calls
    socket.send(tunnel.buffers_to_send())                # after every call above

One keepalive (the session's record PING), one close story (the session's authenticated
CLOSE; every stream then ends), one partial-frame buffer (the TCP framing's: each record
carries whole mux frames), and the queue limits that protect memory live here, where a
test can drive them, not in the shell. Times are monotonic milliseconds except
``wall_ms``, which only stamps handshake messages.

Errors: ``RemoteProtocolError`` subclasses are the peer's fault (the shell logs them
as such and closes this connection); ``LocalProtocolError`` subclasses are ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from . import mux
from .errors import ProtocolError, SessionStateError
from .handshake import HandshakeResult, InitiatorHandshake, ResponderHandshake
from .mux import (
    CreditAvailable,
    DataReceived,
    ErrorCode,
    GoAwayReceived,
    StreamAccepted,
    StreamClosed,
    StreamEnded,
    StreamOpenRequested,
    StreamRefused,
    StreamReset,
)
from .records import CounterSource
from .session import (
    CountersNeeded,
    Established,
    KeepaliveTimeout,
    PeerClosed,
    PongReceived,
    RecordDataReceived,
    Rekeyed,
    Resumed,
    HandshakeMachine,
    Session,
    SessionState,
    SessionTimers,
    TicketGranted,
)

__all__ = [
    "CountersNeeded", "CreditAvailable", "DataReceived", "ErrorCode", "Established", "Event", "GoAwayReceived",
    "KeepaliveTimeout", "PeerClosed", "PeerNotReadingError", "PongReceived", "Rekeyed", "Resumed", "TicketGranted",
    "StreamAccepted", "StreamClosed", "StreamEnded", "StreamOpenRequested", "StreamProtocolError",
    "StreamRefused", "StreamReset", "Tunnel", "TunnelLimits",
]

Event = Union[
    Established, PongReceived, Rekeyed, PeerClosed, CountersNeeded, Resumed, TicketGranted,
    StreamOpenRequested, StreamAccepted, StreamRefused, DataReceived, StreamEnded,
    StreamReset, CreditAvailable, StreamClosed, GoAwayReceived,
]
"""Everything a tunnel reports: session events, then stream events, in wire order."""


COUNTER_RESERVE = 256
"""Reserved counters kept back from stream data on a replica, for pongs, window updates and CLOSE."""


class PeerNotReadingError(ProtocolError):
    """The peer keeps provoking answers (pongs, resets, window updates) but never reads them."""


class StreamProtocolError(ProtocolError):
    """The peer's stream frames cannot be parsed any more; GOAWAY and CLOSE are queued."""


@dataclass(frozen=True)
class TunnelLimits:
    """Memory bounds for one connection.

    ``high_water``: stream writers wait (``writable`` is False) while more than this is
    queued for the socket, so many streams writing at once hold plaintext, not ciphertext.
    ``max_queued``: only answers the reader provokes can grow past ``high_water``; past
    this the peer is not reading and the connection is cut.
    """

    high_water: int = 2 * 1024 * 1024
    max_queued: int = 32 * 1024 * 1024
    initial_window: int = mux.DEFAULT_INITIAL_WINDOW
    max_streams: int = mux.DEFAULT_MAX_STREAMS


class Tunnel:
    """A session and its streams, from the first handshake byte to close."""

    def __init__(self, handshake: HandshakeMachine, *, now_ms: int,
                 timers: SessionTimers | None = None, limits: TunnelLimits | None = None,
                 shared_keys: bool = False) -> None:
        self._attach(Session(handshake, now_ms=now_ms, timers=timers, shared_keys=shared_keys), now_ms, limits)

    @classmethod
    def around(cls, session: Session, *, now_ms: int, limits: TunnelLimits | None = None) -> Tunnel:
        """A tunnel for a continued session (``Session.resuming`` / ``Session.from_snapshot``):
        the keys and counters go on, the streams start afresh (those of the lost connection ended)."""
        tunnel = cls.__new__(cls)
        tunnel._attach(session, now_ms, limits)
        return tunnel

    def _attach(self, session: Session, now_ms: int, limits: TunnelLimits | None) -> None:
        self.limits = limits or TunnelLimits()
        self.session = session
        self.mux = mux.Multiplexer(is_initiator=self.session.is_initiator,
                                   initial_window=self.limits.initial_window, max_streams=self.limits.max_streams)
        self._now_ms = now_ms

    # --- queries -----------------------------------------------------------------------------

    @property
    def is_initiator(self) -> bool:
        return self.session.is_initiator

    @property
    def state(self) -> SessionState:
        return self.session.state

    @property
    def result(self) -> HandshakeResult | None:
        return self.session.result

    @property
    def closed(self) -> bool:
        return self.session.closed

    @property
    def pending_bytes(self) -> int:
        """Bytes sealed and waiting for the socket."""
        return self.session.pending_bytes

    @property
    def writable(self) -> bool:
        """Stream writers may hand over more data: the socket queue is below high water and, on a
        replica, enough reserved counters are in hand (the rest are kept for control records)."""
        if self.session.pending_bytes > self.limits.high_water:
            return False
        records = self.session.records
        counters = records.counters if records is not None else None
        return counters is None or counters.available >= COUNTER_RESERVE

    def credit(self, stream_id: int) -> int:
        return self.mux.credit(stream_id)

    @property
    def stream_count(self) -> int:
        return self.mux.stream_count

    # --- bytes and time in --------------------------------------------------------------------

    def start(self, now_ms: int, wall_ms: int) -> None:
        """Initiator: queue the HELLO."""
        self._now_ms = now_ms
        self.session.start(now_ms, wall_ms)

    def receive_data(self, data: bytes, now_ms: int, wall_ms: int) -> list[Event]:
        """Feed bytes from the socket; returns what happened. Raises RemoteProtocolError."""
        self._now_ms = now_ms
        events: list[Event] = []
        for event in self.session.receive_data(data, now_ms, wall_ms):
            if isinstance(event, RecordDataReceived):
                events.extend(self._on_stream_bytes(event.data))
            else:
                events.append(event)
                if isinstance(event, PeerClosed):
                    self.mux.receive_eof()
        self._seal_stream_frames()
        if self.session.pending_bytes > self.limits.max_queued:
            raise PeerNotReadingError(f"peer is not reading: {self.session.pending_bytes} bytes queued for it")
        return events

    def _on_stream_bytes(self, plaintext: bytes | memoryview) -> list[Event]:
        events: list[Event] = []
        for event in self.mux.receive_data(plaintext):
            if isinstance(event, mux.ProtocolViolation):
                self._seal_stream_frames()  # the GOAWAY saying why goes out before the CLOSE
                self.session.close(f"stream protocol violation: {event.reason}")
                raise StreamProtocolError(f"stream protocol violation: {event.reason}")
            events.append(event)
        return events

    def receive_eof(self) -> None:
        """The socket ended: every stream is gone."""
        self.mux.receive_eof()

    def tick(self, now_ms: int) -> None:
        """Keepalive, dead-peer and rekey timers; raises KeepaliveTimeout."""
        self._now_ms = now_ms
        self.session.tick(now_ms)

    # --- session calls ------------------------------------------------------------------------

    def send_ticket(self, grant: bytes, now_ms: int) -> None:
        """Responder: a resumption ticket grant for the peer (pqtunnel/tickets.py)."""
        self._now_ms = now_ms
        self.session.send_ticket(grant, now_ms)

    def attach_counters(self, counters: CounterSource, now_ms: int, replica: str = "") -> list[Event]:
        """A replica reserved its first counter block: the session may send (see Session)."""
        self._now_ms = now_ms
        return list(self.session.attach_counters(counters, now_ms, replica))

    def ping(self, now_ms: int) -> int:
        """Queue a PING; the PongReceived event with this id answers it."""
        self._now_ms = now_ms
        return self.session.ping(now_ms)

    def close(self, reason: str) -> None:
        """Queue the authenticated CLOSE telling the peer why; every stream ends."""
        if self.session.established and not self.session.closed:
            self._seal_stream_frames()
        self.session.close(reason)
        self.mux.receive_eof()

    def buffers_to_send(self) -> list[bytes | memoryview]:
        """Everything sealed since the last call, as buffers for one scatter-gather send."""
        return self.session.buffers_to_send()

    # --- stream calls (caller mistakes raise MuxError, a LocalProtocolError) -------------------

    def open_stream(self, target: dict[str, Any]) -> int:
        stream_id = self.mux.open_stream(target)
        self._seal_stream_frames()
        return stream_id

    def accept_stream(self, stream_id: int) -> None:
        self.mux.accept_stream(stream_id)
        self._seal_stream_frames()

    def refuse_stream(self, stream_id: int, code: int, reason: str = "") -> None:
        self.mux.refuse_stream(stream_id, code, reason)
        self._seal_stream_frames()

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        """Seal as much of ``data`` as the stream's credit allows; returns the bytes taken."""
        self._require_open()
        accepted = self.mux.send_data(stream_id, data)
        self._seal_stream_frames()
        return accepted

    def send_fin(self, stream_id: int) -> None:
        self.mux.send_fin(stream_id)
        self._seal_stream_frames()

    def reset_stream(self, stream_id: int, code: int = ErrorCode.CANCELLED, reason: str = "") -> None:
        """Abort a stream; a no-op once the stream or the session is gone."""
        self.mux.reset_stream(stream_id, code, reason)
        self._seal_stream_frames()

    def consumed(self, stream_id: int, n: int) -> None:
        """The application took ``n`` bytes of the stream: return that credit to the peer."""
        self.mux.consumed(stream_id, n)
        self._seal_stream_frames()

    def go_away(self, code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        self.mux.go_away(code, reason)
        self._seal_stream_frames()

    # --- internals ------------------------------------------------------------------------------

    def _require_open(self) -> None:
        if self.session.closed:
            raise SessionStateError("the session is closed")

    def _seal_stream_frames(self) -> None:
        """Move queued mux frames into records: whole frames per record, never split.

        Before key confirmation frames wait in the mux (nothing may be sent yet); after
        close they are dropped with the session.
        """
        if self.session.state is not SessionState.ESTABLISHED:
            return
        for batch in self.mux.batches_to_send():
            self.session.send_prepared(batch, self._now_ms)
