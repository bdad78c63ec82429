"""Sans-IO stream multiplexer: many ordered byte streams inside one pqtunnel session.

The session layer already gives us an encrypted, ordered, reliable byte stream; this module
cuts it into independent streams (SSH channels / yamux style) with per-stream credit-based
flow control, so one stalled reader can never make either side buffer without bound and
never blocks the other streams. Like h11 or wsproto it owns no socket, clock or thread::

    events = mux.receive_data(plaintext)     # the plaintext of one record: whole frames
    ... handle StreamOpenRequested / DataReceived / CreditAvailable / ... ...
    for batch in mux.batches_to_send(limit): # after every receive_data() and API call
        seal one record around batch

The tunnel core (``pqtunnel/tunnel.py``) does exactly this. Every record carries whole mux
frames, so the only partial-frame buffer is the TCP framing's (``wire.FrameDecoder``);
a record that ends inside a mux frame is a protocol violation. Keepalive and close belong
to the session (record PING/CLOSE), not to the mux.

Wire format and rules: docs/PROTOCOL.md section 7. In short:
``type u8 | flags u8 | stream_id u32 | length u32 | payload``, big-endian.

Error policy: caller mistakes raise a ``MuxError`` subclass; peer mistakes become events.
A per-stream fault by the peer resets only that stream; only a byte stream that cannot be
framed any more (or a malformed connection-level frame, which has no stream to reset) ends
the session with a ``ProtocolViolation`` event and a queued GOAWAY.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any, Callable, Final

import msgpack

from .errors import LocalProtocolError
from .wire import MAX_RECORD_PLAINTEXT

HEADER: Final = struct.Struct(">BBII")
"""type, flags, stream_id, length: precompiled because it is parsed once per frame."""
HEADER_SIZE: Final = HEADER.size
MAX_DATA_PAYLOAD: Final = 64 * 1024
MAX_CONTROL_PAYLOAD: Final = 4096
DEFAULT_INITIAL_WINDOW: Final = 1024 * 1024
DEFAULT_MAX_STREAMS: Final = 1024
MAX_STREAM_ID: Final = 0xFFFF_FFFF
MAX_WINDOW: Final = 0xFFFF_FFFF
"""Credit is carried in u32 fields, so no stream may ever hold more."""
MAX_REASON_BYTES: Final = 1024
"""Outgoing reasons are cut to this many UTF-8 bytes so every control payload fits 4096."""
MAX_FRAME: Final = HEADER_SIZE + MAX_DATA_PAYLOAD
#: Each batch from ``batches_to_send`` starts with this many bytes the mux never writes: the
#: record layer puts the content type there and encrypts the batch as it is, without a copy.
BATCH_RESERVED: Final = 1

_WINDOW_INCREMENT: Final = struct.Struct(">I")
_unpack_header: Final = HEADER.unpack_from
_pack_header: Final = HEADER.pack
_MSGPACK_ERRORS: Final = (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException)
"""msgpack reports bad input with several exception types; peer bytes must never escape as one."""


class FrameType(enum.IntEnum):
    OPEN = 0x01
    OPEN_OK = 0x02
    OPEN_ERR = 0x03
    DATA = 0x04
    WINDOW = 0x05
    FIN = 0x06
    RST = 0x07
    # 0x08 and 0x09 are reserved (formerly PING/PONG; keepalive is the session's record PING)
    GOAWAY = 0x0A


_CONNECTION_FRAMES: Final = frozenset({FrameType.GOAWAY})
_KNOWN_TYPES: Final = frozenset(int(t) for t in FrameType)
_DATA: Final = int(FrameType.DATA)


class ErrorCode(enum.IntEnum):
    """Codes carried by OPEN_ERR, RST and GOAWAY. Unknown codes from a peer are kept as ints."""

    NO_ERROR = 0
    PROTOCOL_ERROR = 1
    FLOW_CONTROL = 2
    REFUSED = 3
    UNKNOWN_SERVICE = 4
    NOT_ALLOWED = 5
    UNREACHABLE = 6
    TOO_MANY_STREAMS = 7
    CANCELLED = 8
    INTERNAL = 9
    GOING_AWAY = 10
    TIMED_OUT = 11


class StreamState(enum.Enum):
    IDLE = "idle"
    """Never used: a future id."""
    OPENING = "opening"
    """We sent OPEN and wait for OPEN_OK or OPEN_ERR."""
    REQUESTED = "requested"
    """The peer sent OPEN; we have not accepted or refused it yet."""
    OPEN = "open"
    HALF_CLOSED_LOCAL = "half-closed (local)"
    """We sent FIN; the peer may still send."""
    HALF_CLOSED_REMOTE = "half-closed (remote)"
    """The peer sent FIN; we may still send."""
    CLOSED = "closed"
    """Finished, refused or reset; its state has been freed."""


_CAN_SEND: Final = frozenset({StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE})
_CAN_RECEIVE: Final = frozenset({StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL})


# --- caller mistakes ----------------------------------------------------------------------------


class MuxError(LocalProtocolError):
    """The application used the multiplexer wrongly; nothing was queued."""


class MuxConfigError(MuxError):
    """A constructor argument is out of range."""


class InvalidStreamIdError(MuxError):
    """A stream id outside 1..2**32-1 (0 is the connection, not a stream)."""


class UnknownStreamError(MuxError):
    """The stream is not live: never opened, or already closed, refused or reset."""


class StreamNotOpenError(MuxError):
    """DATA or FIN before the stream was accepted: the peer has granted no credit yet."""


class StreamFinishedError(MuxError):
    """DATA or FIN after our own FIN: our sending direction is already closed."""


class StreamNotRequestedError(MuxError):
    """accept/refuse on a stream that is not a pending peer OPEN."""


class InvalidTargetError(MuxError):
    """An OPEN target that is not a msgpack-encodable str-keyed map within 4096 bytes."""


class InvalidErrorCodeError(MuxError):
    """An error code outside u32 or a reason that is not a str."""


class ConsumedTooMuchError(MuxError):
    """consumed() for more bytes than were received and not yet consumed (or a negative count)."""


class GoingAwayError(MuxError):
    """open_stream() after a GOAWAY was sent or received: the stream would be refused."""


class StreamIdsExhaustedError(MuxError):
    """All 2**31 stream ids of our parity are used; a new session is needed."""


class SessionClosedError(MuxError):
    """The mux saw a fatal protocol error or the end of the session; no frames can be sent."""


# --- events -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """Base of everything receive_data() and receive_eof() report."""


@dataclass(frozen=True, slots=True)
class StreamOpenRequested(Event):
    """The peer wants a stream to ``target``; answer with accept_stream or refuse_stream."""

    stream_id: int
    target: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StreamAccepted(Event):
    """Our OPEN was accepted; send_data may now be used (credit = initial window)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamRefused(Event):
    """Our OPEN was refused; the stream is closed (a StreamClosed follows)."""

    stream_id: int
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class DataReceived(Event):
    """Stream bytes; call consumed() once the application has disposed of them."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded(Event):
    """The peer sent FIN: no more DATA will arrive on this stream."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset(Event):
    """The stream was aborted both ways; ``by_peer`` is False when we reset it for a peer fault."""

    stream_id: int
    code: int
    reason: str
    by_peer: bool = True


@dataclass(frozen=True, slots=True)
class CreditAvailable(Event):
    """The peer granted more credit: a writer blocked on send_data may resume."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamClosed(Event):
    """The stream's state was freed (both FINs, refusal or reset); always its last event."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class GoAwayReceived(Event):
    """The peer accepts no new streams; existing streams run to completion."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class ProtocolViolation(Event):
    """The byte stream is unusable; a GOAWAY is queued, every stream is gone, input is ignored.

    Named so it cannot be confused with the ``pqtunnel.errors.ProtocolError`` exception.
    """

    reason: str


# --- payload codecs -----------------------------------------------------------------------------


def _byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    """A flat unsigned-byte view, so lengths and offsets count bytes whatever the caller passed."""
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def encode_frame(frame_type: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One complete frame; used for queued control frames, tests and test vectors."""
    return _pack_header(frame_type, 0, stream_id, len(payload)) + payload


def _encode_target(target: object) -> bytes:
    if not isinstance(target, dict) or not all(isinstance(key, str) for key in target):
        raise InvalidTargetError("an OPEN target must be a dict with str keys")
    try:
        payload = msgpack.packb(target, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidTargetError(f"OPEN target cannot be encoded as msgpack: {exc}") from exc
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise InvalidTargetError(f"OPEN target encodes to {len(payload)} bytes, above {MAX_CONTROL_PAYLOAD}")
    return payload


def _decode_target(payload: memoryview) -> dict[str, Any] | None:
    try:
        target = msgpack.unpackb(payload, raw=False)
    except _MSGPACK_ERRORS:
        return None
    if not isinstance(target, dict) or not all(isinstance(key, str) for key in target):
        return None
    return target


def _encode_error(code: int, reason: str) -> bytes:
    if isinstance(code, bool) or not isinstance(code, int) or not 0 <= code <= 0xFFFF_FFFF:
        raise InvalidErrorCodeError(f"error code must be an int in 0..2**32-1, not {code!r}")
    if not isinstance(reason, str):
        raise InvalidErrorCodeError(f"reason must be a str, not {type(reason).__name__}")
    cut = reason.encode("utf-8", "surrogatepass")[:MAX_REASON_BYTES].decode("utf-8", "ignore")
    return msgpack.packb({"code": int(code), "reason": cut})


def _decode_error(payload: memoryview) -> tuple[int, str] | None:
    """(code, reason) of an OPEN_ERR/RST/GOAWAY payload; extra keys are allowed for growth."""
    try:
        body = msgpack.unpackb(payload, raw=False)
    except _MSGPACK_ERRORS:
        return None
    if not isinstance(body, dict):
        return None
    code, reason = body.get("code"), body.get("reason")
    if isinstance(code, bool) or not isinstance(code, int) or not isinstance(reason, str):
        return None
    return _known_code(code), reason


def _known_code(code: int) -> int:
    try:
        return ErrorCode(code)
    except ValueError:
        return code


def _header_problem(frame_type: int, flags: int, stream_id: int, length: int) -> str | None:
    """Why a header makes the byte stream unusable, or None. Checked before buffering the payload."""
    if frame_type not in _KNOWN_TYPES:
        return f"unknown frame type 0x{frame_type:02x} (stream {stream_id}, length {length})"
    name = FrameType(frame_type).name
    if flags:
        return f"{name} frame on stream {stream_id} has flags 0x{flags:02x}; flags are reserved and must be 0"
    limit = MAX_DATA_PAYLOAD if frame_type == _DATA else MAX_CONTROL_PAYLOAD
    if length > limit:
        return f"{name} frame on stream {stream_id} has length {length}, above the {limit}-byte limit"
    if frame_type in _CONNECTION_FRAMES:
        if stream_id:
            return f"{name} frame on stream {stream_id}; connection frames must use stream 0"
    elif not stream_id:
        return f"{name} frame on stream 0; stream frames need a nonzero stream id"
    return None


def _truncation_reason(rest: memoryview) -> str:
    """Why a record's leftover bytes (a partial frame) make the stream unusable."""
    have = len(rest)
    if have < HEADER_SIZE:
        return f"record ended inside a frame header ({have} of {HEADER_SIZE} bytes)"
    frame_type, _, stream_id, length = _unpack_header(rest, 0)
    name = FrameType(frame_type).name
    return f"record ended inside a {name} frame on stream {stream_id} ({have - HEADER_SIZE} of {length} payload bytes)"


# --- the multiplexer ----------------------------------------------------------------------------


class _Stream:
    """Per-stream bookkeeping: O(1) memory, freed as soon as the stream closes."""

    __slots__ = ("state", "locally_opened", "send_credit", "recv_credit", "unconsumed", "unacked")

    def __init__(self, state: StreamState, locally_opened: bool, window: int) -> None:
        self.state = state
        self.locally_opened = locally_opened
        self.send_credit = window  # bytes we may still send
        self.recv_credit = window  # bytes the peer may still send
        self.unconsumed = 0  # received, not yet consumed by the application
        self.unacked = 0  # consumed, not yet returned to the peer in a WINDOW
        # Invariant: recv_credit + unconsumed + unacked == initial window.


class Multiplexer:
    """One side of a multiplexed session. Not thread-safe; drive it from one task."""

    def __init__(
        self,
        *,
        is_initiator: bool,
        initial_window: int = DEFAULT_INITIAL_WINDOW,
        max_streams: int = DEFAULT_MAX_STREAMS,
        batch_limit: int = MAX_RECORD_PLAINTEXT,
    ) -> None:
        """``initial_window`` is a session parameter: both peers must use the same value,
        because each side assumes the other granted exactly that much on every new stream.
        ``batch_limit`` bounds the frame bytes of one batch (one record); it must hold the
        largest frame."""
        if not 1 <= initial_window <= MAX_WINDOW:
            raise MuxConfigError(f"initial_window must be in 1..{MAX_WINDOW}, not {initial_window}")
        if max_streams < 0:
            raise MuxConfigError(f"max_streams must be >= 0, not {max_streams}")
        if batch_limit < MAX_FRAME:
            raise MuxConfigError(f"batch limit {batch_limit} is below the largest frame ({MAX_FRAME} bytes)")
        self._batch_limit = batch_limit
        self._initial_window = initial_window
        self._window_update_threshold = max(1, initial_window // 2)
        self._max_streams = max_streams
        self._local_parity = 1 if is_initiator else 0
        self._next_local_id = 1 if is_initiator else 2
        self._highest_peer_id = 0
        self._streams: dict[int, _Stream] = {}
        self._peer_stream_count = 0
        self._outbuf = bytearray(BATCH_RESERVED)
        """The batch being filled: BATCH_RESERVED free bytes, then whole frames."""
        self._full_batches: list[bytearray] = []
        self._sent_goaway = False
        self._received_goaway = False
        self._closed = False
        self._handlers: dict[int, Callable[[int, memoryview, list[Event]], None]] = {
            FrameType.OPEN: self._on_open,
            FrameType.OPEN_OK: self._on_open_ok,
            FrameType.OPEN_ERR: self._on_open_err,
            FrameType.DATA: self._on_data,
            FrameType.WINDOW: self._on_window,
            FrameType.FIN: self._on_fin,
            FrameType.RST: self._on_rst,
            FrameType.GOAWAY: self._on_goaway,
        }

    # --- queries --------------------------------------------------------------------------------

    @property
    def stream_count(self) -> int:
        """Live streams (any state but IDLE/CLOSED); past streams cost nothing."""
        return len(self._streams)

    @property
    def closed(self) -> bool:
        """True after a ProtocolViolation or receive_eof(): the session is over."""
        return self._closed

    def stream_state(self, stream_id: int) -> StreamState:
        self._check_id(stream_id)
        stream = self._streams.get(stream_id)
        if stream is not None:
            return stream.state
        return StreamState.CLOSED if self._is_past(stream_id) else StreamState.IDLE

    def credit(self, stream_id: int) -> int:
        """How many bytes send_data would accept right now (0 if the stream cannot send)."""
        self._check_id(stream_id)
        stream = self._streams.get(stream_id)
        if stream is None or stream.state not in _CAN_SEND:
            return 0
        return stream.send_credit

    # --- application calls ----------------------------------------------------------------------

    def open_stream(self, target: dict[str, Any]) -> int:
        """Queue an OPEN for a new stream and return its id; wait for StreamAccepted before sending."""
        self._require_alive()
        if self._sent_goaway or self._received_goaway:
            side = "we sent" if self._sent_goaway else "the peer sent"
            raise GoingAwayError(f"no new streams: {side} GOAWAY")
        if self._next_local_id > MAX_STREAM_ID:
            raise StreamIdsExhaustedError("every stream id of our parity has been used")
        payload = _encode_target(target)
        stream_id = self._next_local_id
        self._next_local_id += 2
        self._streams[stream_id] = _Stream(StreamState.OPENING, True, self._initial_window)
        self._queue(FrameType.OPEN, stream_id, payload)
        return stream_id

    def accept_stream(self, stream_id: int) -> None:
        """Queue OPEN_OK; the stream is open both ways from now on."""
        self._requested(stream_id).state = StreamState.OPEN
        self._queue(FrameType.OPEN_OK, stream_id, b"")

    def refuse_stream(self, stream_id: int, code: int, reason: str = "") -> None:
        """Queue OPEN_ERR and free the stream at once (no StreamClosed event follows)."""
        self._requested(stream_id)
        self._queue(FrameType.OPEN_ERR, stream_id, _encode_error(code, reason))
        self._free(stream_id)

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        """Queue as much of ``data`` as the peer's credit allows, in frames of <= 64 KiB.

        Returns the number of bytes accepted; the rest must be offered again after a
        CreditAvailable event. This is what bounds the sender's memory.
        """
        self._require_alive()
        stream = self._sendable(stream_id)
        view = _byte_view(data)
        accepted = min(len(view), stream.send_credit)
        for start in range(0, accepted, MAX_DATA_PAYLOAD):
            chunk = view[start : min(start + MAX_DATA_PAYLOAD, accepted)]
            out = self._batch_for(HEADER_SIZE + len(chunk))
            out += _pack_header(_DATA, 0, stream_id, len(chunk))
            out += chunk
        stream.send_credit -= accepted
        return accepted

    def send_fin(self, stream_id: int) -> None:
        """Half-close our direction. If the peer already sent FIN, the stream is freed now."""
        self._require_alive()
        stream = self._sendable(stream_id)
        self._queue(FrameType.FIN, stream_id, b"")
        if stream.state is StreamState.HALF_CLOSED_REMOTE:
            self._free(stream_id)
        else:
            stream.state = StreamState.HALF_CLOSED_LOCAL

    def reset_stream(self, stream_id: int, code: int = ErrorCode.CANCELLED, reason: str = "") -> None:
        """Abort the stream both ways and free it. A no-op on a stream that is no longer live,
        so cleanup code may call it without racing the peer's own RST or FIN."""
        self._check_id(stream_id)
        payload = _encode_error(code, reason)
        if self._closed or stream_id not in self._streams:
            return
        self._queue(FrameType.RST, stream_id, payload)
        self._free(stream_id)

    def consumed(self, stream_id: int, n: int) -> None:
        """The application is done with ``n`` received bytes: return that credit to the peer.

        WINDOW frames are batched until half the window is owed, so a fast reader costs one
        small frame per half window. Never calling this is how a stalled reader stops the peer.
        A no-op on streams that are no longer live.
        """
        self._check_id(stream_id)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConsumedTooMuchError(f"consumed() needs a non-negative int, not {n!r}")
        stream = self._streams.get(stream_id)
        if stream is None or self._closed:
            return
        if n > stream.unconsumed:
            raise ConsumedTooMuchError(
                f"stream {stream_id}: consumed {n} bytes but only {stream.unconsumed} are unconsumed"
            )
        stream.unconsumed -= n
        stream.unacked += n
        if stream.unacked >= self._window_update_threshold and stream.state in _CAN_RECEIVE:
            self._queue(FrameType.WINDOW, stream_id, _WINDOW_INCREMENT.pack(stream.unacked))
            stream.recv_credit += stream.unacked
            stream.unacked = 0

    def go_away(self, code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Announce that no new streams will be accepted; existing ones finish. Idempotent."""
        payload = _encode_error(code, reason)
        if self._closed or self._sent_goaway:
            return
        self._sent_goaway = True
        self._queue(FrameType.GOAWAY, 0, payload)

    def data_to_send(self) -> bytes | bytearray:
        """Drain everything queued since the last call, in order (whole frames)."""
        batches = self.batches_to_send()
        if len(batches) == 1:
            del batches[0][:BATCH_RESERVED]
            return batches[0]
        return b"".join(memoryview(batch)[BATCH_RESERVED:] for batch in batches)

    def batches_to_send(self) -> list[bytearray]:
        """Drain the queue as batches: BATCH_RESERVED free bytes, then at most ``batch_limit``
        bytes of whole frames.

        One batch becomes one record: no frame is ever split across records, so the peer
        parses every record on its own. The batches are built as frames are queued, so
        handing them over copies nothing; the caller owns them (the record layer writes the
        content type into the reserved byte and encrypts the batch in place).
        """
        batches = self._full_batches
        if len(self._outbuf) > BATCH_RESERVED:
            batches.append(self._outbuf)
            self._outbuf = bytearray(BATCH_RESERVED)
        self._full_batches = []
        return batches

    # --- input ----------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Parse the plaintext of one record: whole frames only.

        Never raises for anything the peer sent. Frames are parsed straight from ``data``
        (no buffering, no copy but the DataReceived payload); a record that ends inside a
        frame is a ProtocolViolation, because a sender never splits a frame across records.
        """
        events: list[Event] = []
        if self._closed or not data:
            return events
        view = _byte_view(data)
        used = self._parse(view, events)
        if not self._closed and used < len(view):
            self._fail(_truncation_reason(view[used:]), events)
        return events

    def receive_eof(self) -> list[Event]:
        """The session ended: every stream is gone (the tunnel reports why)."""
        if not self._closed:
            self._shut_down()
        return []

    def _parse(self, buffer: bytes | bytearray | memoryview, events: list[Event]) -> int:
        """Handle every complete frame in ``buffer``; return how many bytes were used."""
        view = _byte_view(buffer)
        try:
            end = len(view)
            pos = 0
            handlers = self._handlers
            while end - pos >= HEADER_SIZE:
                frame_type, flags, stream_id, length = _unpack_header(view, pos)
                if not (frame_type == _DATA and not flags and stream_id and length <= MAX_DATA_PAYLOAD):
                    problem = _header_problem(frame_type, flags, stream_id, length)
                    if problem is not None:
                        self._fail(problem, events)
                        return end
                stop = pos + HEADER_SIZE + length
                if stop > end:
                    break
                handlers[frame_type](stream_id, view[pos + HEADER_SIZE : stop], events)
                pos = stop
                if self._closed:
                    return end
            return pos
        finally:
            view.release()

    # --- frame handlers (peer input; never raise) -----------------------------------------------

    def _on_open(self, stream_id: int, payload: memoryview, events: list[Event]) -> None:
        if self._is_local_id(stream_id):
            parity = "odd" if self._local_parity == 0 else "even"
            self._stream_fault(stream_id, f"OPEN for stream {stream_id}: the peer must use {parity} ids", events)
            return
        if stream_id <= self._highest_peer_id:
            self._stream_fault(
                stream_id,
                f"OPEN reuses stream id {stream_id}; ids must increase (highest so far {self._highest_peer_id})",
                events,
            )
            return
        self._highest_peer_id = stream_id
        if self._sent_goaway:
            self._refuse(stream_id, ErrorCode.GOING_AWAY, "GOAWAY sent; no new streams")
            return
        if self._peer_stream_count >= self._max_streams:
            self._refuse(stream_id, ErrorCode.TOO_MANY_STREAMS, f"limit of {self._max_streams} concurrent streams")
            return
        target = _decode_target(payload)
        if target is None:
            self._refuse(stream_id, ErrorCode.PROTOCOL_ERROR, "OPEN target must be a msgpack map with str keys")
            return
        self._streams[stream_id] = _Stream(StreamState.REQUESTED, False, self._initial_window)
        self._peer_stream_count += 1
        events.append(StreamOpenRequested(stream_id, target))

    def _on_open_ok(self, stream_id: int, payload: memoryview, events: list[Event]) -> None:
        stream = self._live_or_handle_dead(FrameType.OPEN_OK, stream_id)
        if stream is None:
            return
        if stream.state is not StreamState.OPENING or len(payload):
            self._unexpected(FrameType.OPEN_OK, stream_id, stream, payload, events)
            return
        stream.state = StreamState.OPEN
        events.append(StreamAccepted(stream_id))

    def _on_open_err(self, stream_id: int, payload: memoryview, events: list[Event]) -> None:
        stream = self._live_or_handle_dead(FrameType.OPEN_ERR, stream_id)
        if stream is None:
            return
        if stream.state is not StreamState.OPENING:
            self._unexpected(FrameType.OPEN_ERR, stream_id, stream, payload, events)
            return
        code, reason = _decode_error(payload) or (ErrorCode.PROTOCOL_ERROR, "malformed OPEN_ERR payload")
        self._free(stream_id)
        events.append(StreamRefused(stream_id, code, reason))
        events.append(StreamClosed(stream_id))

    def _on_data(self, stream_id: int, payload: memoryview, events: list[Event]) -> None:
        stream = self._live_or_handle_dead(FrameType.DATA, stream_id)
        if stream is None:
            return
        if stream.state not in _CAN_RECEIVE:
            self._unexpected(FrameType.DATA, stream_id, stream, payload, events)
            return
        size = len(payload)
        if size > stream.recv_credit:
            reason = f"stream {stream_id}: {size} bytes of DATA with only {stream.recv_credit} bytes of credit"
            self._stream_fault(stream_id, reason, events, ErrorCode.FLOW_CONTROL)
            return
        if size:
            stream.recv_credit -= size
            stream.unconsumed += size
            events.append(DataReceived(stream_id, bytes(payload)))

    def _on_window(self, stream_id: int, payload: memoryview, events: list[Event]) -> None:
        stream = self._live_or_handle_dead(FrameType.WINDOW, stream_id)
        if stream is None:
            return
        if stream.state in (StreamState.OPENING, StreamState.REQUESTED) or len(payload) != 4:
            self._unexpected(FrameType.WINDOW, stream_id, stream, payload, events)
            return
        (increment,) = _WINDOW_INCREMENT.unpack(payload)
        if increment == 0:
            self._stream_fault(stream_id, f"WINDOW with a zero increment on stream {stream_id}", events)
            return
        if stream.state is StreamState.HALF_CLOSED_LOCAL:
            return  # credit for a direction we already closed: harmless, nothing to resume
        if stream.send_credit + increment > MAX_WINDOW:
            reason = f"WINDOW increment {increment} on stream {stream_id} raises its credit above 2**32-1"
            self._stream_fault(stream_id, reason, events, ErrorCode.FLOW_CONTROL)
            return
        stream.send_credit += increment
        events.append(CreditAvailable(stream_id))

    def _on_fin(self, stream_id: int, payload: memoryview, events: list[Event]) -> None:
        stream = self._live_or_handle_dead(FrameType.FIN, stream_id)
        if stream is None:
            return
        if stream.state not in _CAN_RECEIVE or len(payload):
            self._unexpected(FrameType.FIN, stream_id, stream, payload, events)
            return
        events.append(StreamEnded(stream_id))
        if stream.state is StreamState.HALF_CLOSED_LOCAL:
            self._free(stream_id)
            events.append(StreamClosed(stream_id))
        else:
            stream.state = StreamState.HALF_CLOSED_REMOTE

    def _on_rst(self, stream_id: int, payload: memoryview, events: list[Event]) -> None:
        if stream_id not in self._streams:
            return  # never answer an RST, whatever stream it names
        code, reason = _decode_error(payload) or (ErrorCode.PROTOCOL_ERROR, "malformed RST payload")
        self._free(stream_id)
        events.append(StreamReset(stream_id, code, reason, True))
        events.append(StreamClosed(stream_id))

    def _on_goaway(self, stream_id: int, payload: memoryview, events: list[Event]) -> None:
        decoded = _decode_error(payload)
        if decoded is None:
            self._fail("malformed GOAWAY payload: expected a msgpack map with int code and str reason", events)
            return
        self._received_goaway = True
        events.append(GoAwayReceived(*decoded))

    # --- helpers --------------------------------------------------------------------------------

    def _live_or_handle_dead(self, frame_type: FrameType, stream_id: int) -> _Stream | None:
        """The live stream, or None after dealing with a frame for a dead one.

        Late frames for past streams are normal (they crossed our FIN or RST) and are dropped;
        frames for ids that were never opened get an RST so the peer learns of its bug.
        """
        stream = self._streams.get(stream_id)
        if stream is None and not self._is_past(stream_id):
            reason = f"{frame_type.name} for stream {stream_id}, which was never opened"
            self._queue(FrameType.RST, stream_id, _encode_error(ErrorCode.PROTOCOL_ERROR, reason))
        return stream

    def _unexpected(
        self, frame_type: FrameType, stream_id: int, stream: _Stream, payload: memoryview, events: list[Event]
    ) -> None:
        reason = f"{frame_type.name} (length {len(payload)}) on stream {stream_id} while it is {stream.state.value}"
        self._stream_fault(stream_id, reason, events)

    def _stream_fault(
        self, stream_id: int, reason: str, events: list[Event], code: ErrorCode = ErrorCode.PROTOCOL_ERROR
    ) -> None:
        """Reset one stream for a peer mistake; the session and other streams carry on."""
        self._queue(FrameType.RST, stream_id, _encode_error(code, reason))
        if stream_id in self._streams:
            self._free(stream_id)
            events.append(StreamReset(stream_id, code, reason, False))
            events.append(StreamClosed(stream_id))

    def _refuse(self, stream_id: int, code: ErrorCode, reason: str) -> None:
        self._queue(FrameType.OPEN_ERR, stream_id, _encode_error(code, reason))

    def _fail(self, reason: str, events: list[Event]) -> None:
        events.append(ProtocolViolation(reason))
        self._queue(FrameType.GOAWAY, 0, _encode_error(ErrorCode.PROTOCOL_ERROR, reason))
        self._sent_goaway = True
        self._shut_down()

    def _shut_down(self) -> None:
        self._closed = True
        self._streams.clear()
        self._peer_stream_count = 0

    def _queue(self, frame_type: int, stream_id: int, payload: bytes) -> None:
        out = self._batch_for(HEADER_SIZE + len(payload))
        out += _pack_header(frame_type, 0, stream_id, len(payload))
        out += payload

    def _batch_for(self, frame_size: int) -> bytearray:
        """The batch to append a frame of ``frame_size`` bytes to: a new one when it would
        overflow ``batch_limit`` (frames are never split)."""
        out = self._outbuf
        if len(out) - BATCH_RESERVED + frame_size > self._batch_limit and len(out) > BATCH_RESERVED:
            self._full_batches.append(out)
            out = self._outbuf = bytearray(BATCH_RESERVED)
        return out

    def _free(self, stream_id: int) -> None:
        if not self._streams.pop(stream_id).locally_opened:
            self._peer_stream_count -= 1

    def _is_local_id(self, stream_id: int) -> bool:
        return stream_id & 1 == self._local_parity

    def _is_past(self, stream_id: int) -> bool:
        """True for ids already used; ids only grow, so this needs no per-stream memory."""
        if self._is_local_id(stream_id):
            return stream_id < self._next_local_id
        return stream_id <= self._highest_peer_id

    @staticmethod
    def _check_id(stream_id: int) -> None:
        if isinstance(stream_id, bool) or not isinstance(stream_id, int) or not 1 <= stream_id <= MAX_STREAM_ID:
            raise InvalidStreamIdError(f"stream ids are ints in 1..{MAX_STREAM_ID}, not {stream_id!r}")

    def _require_alive(self) -> None:
        if self._closed:
            raise SessionClosedError("the mux session has ended; no frames can be sent")

    def _live(self, stream_id: int) -> _Stream:
        self._check_id(stream_id)
        stream = self._streams.get(stream_id)
        if stream is None:
            state = "closed" if self._is_past(stream_id) else "never opened"
            raise UnknownStreamError(f"stream {stream_id} is {state}")
        return stream

    def _sendable(self, stream_id: int) -> _Stream:
        stream = self._live(stream_id)
        if stream.state in _CAN_SEND:
            return stream
        if stream.state is StreamState.HALF_CLOSED_LOCAL:
            raise StreamFinishedError(f"stream {stream_id}: we already sent FIN")
        raise StreamNotOpenError(f"stream {stream_id} is {stream.state.value}; wait until it is accepted")

    def _requested(self, stream_id: int) -> _Stream:
        self._require_alive()
        stream = self._live(stream_id)
        if stream.state is not StreamState.REQUESTED:
            raise StreamNotRequestedError(f"stream {stream_id} is {stream.state.value}, not a pending OPEN")
        return stream
