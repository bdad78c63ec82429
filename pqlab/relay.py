"""A TCP relay in front of one replica, capturing every byte, and a parser of what it captured.

HA tests and the failover benchmark put one ``Relay`` on a loopback port in front of each
replica of a node and give the peer the relays' addresses. Every accepted connection is
forwarded to the replica; the bytes of each direction are kept whole (``c2r``: from the
dialling peer to the replica, ``r2c``: back), so a test can later check the nonce
invariant on what really crossed the wire: no (session id, direction, counter) twice.

The parser reads the tunnel's outer framing (pqtunnel/wire.py)::

    length u32 | kind u8 | body              RECORD body: session_id [8] | counter u64 | AEAD

A connection cut in the middle of a frame leaves a partial frame at the end of a capture;
``scan_frames`` reports it with ``complete=False``. A partial RECORD whose header (session
id and counter) arrived still counts: its sender sealed it, so its nonce was used.

A test can also ``inject`` bytes (a captured record replayed) into a live connection: they
go in between two frames of the real stream, never inside one, and are kept apart from the
capture, so the invariant check sees only what the peers themselves sent.
"""

from __future__ import annotations

import itertools
import socket
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from pqtunnel.wire import MAX_HANDSHAKE_FRAME, MAX_RECORD_FRAME, Kind

C2R = "c2r"
"""From the dialling peer (the client of the relay, e.g. alice) to the replica."""
R2C = "r2c"
"""From the replica back to the peer."""
DIRECTIONS = (C2R, R2C)

FRAME_HEADER = struct.Struct(">IB")
RECORD_PREFIX = struct.Struct(">8sQ")
RECORD_HEADER_SIZE = FRAME_HEADER.size + RECORD_PREFIX.size
CHUNK = 256 * 1024
INJECT_TIMEOUT = 10.0

_connection_ids = itertools.count(1)  # unique across every relay of a process: one lab, one numbering


class CaptureParseError(ValueError):
    """Captured bytes that are not pqtunnel framing (unknown kind, impossible length)."""


class InjectError(RuntimeError):
    """Bytes could not be put into a connection (it is closed, or no frame boundary came)."""


@dataclass(frozen=True)
class FrameSeen:
    """One frame found in a capture; ``data`` is the frame as captured (cut short if incomplete)."""

    offset: int
    kind: int
    length: int
    complete: bool
    data: bytes


@dataclass(frozen=True)
class RecordSeen:
    """The header of one RECORD frame that crossed a relay."""

    connection: int
    replica: str
    direction: str
    session_id: str
    """16 hex digits, as ``pqtunnel sessions --json`` shows it."""
    counter: int
    index: int
    """0 for the first RECORD frame of this connection and direction (a RESUME opens a connection)."""
    complete: bool
    frame: bytes

    @property
    def nonce_use(self) -> tuple[str, str, int]:
        """What must never repeat: (session id, direction, counter)."""
        return self.session_id, self.direction, self.counter


def _limit(kind: int) -> int:
    if kind == Kind.RECORD:
        return MAX_RECORD_FRAME
    if kind in {k.value for k in Kind}:
        return MAX_HANDSHAKE_FRAME
    raise CaptureParseError(f"unknown frame kind 0x{kind:02x}")


def scan_frames(data: bytes | bytearray) -> Iterator[FrameSeen]:
    """Every frame in a captured stream, the last one possibly incomplete (cut mid-frame).

    A tail too short to hold a frame header (length and kind) yields nothing: nothing of
    such a frame can be known. Bytes that cannot be pqtunnel framing raise CaptureParseError.
    """
    pos, end = 0, len(data)
    while end - pos >= FRAME_HEADER.size:
        length, kind = FRAME_HEADER.unpack_from(data, pos)
        if length < 1 or length > _limit(kind):
            raise CaptureParseError(f"frame at offset {pos}: kind 0x{kind:02x} with length {length}")
        stop = pos + 4 + length
        yield FrameSeen(pos, kind, length, stop <= end, bytes(data[pos:min(stop, end)]))
        pos = stop


def records_in(data: bytes | bytearray, *, connection: int = 0, replica: str = "",
               direction: str = C2R) -> Iterator[RecordSeen]:
    """The RECORD frames of one captured direction whose header (session id, counter) arrived."""
    index = 0
    for frame in scan_frames(data):
        if frame.kind != Kind.RECORD or len(frame.data) < RECORD_HEADER_SIZE:
            continue
        session_id, counter = RECORD_PREFIX.unpack_from(frame.data, FRAME_HEADER.size)
        yield RecordSeen(connection, replica, direction, session_id.hex(), counter, index, frame.complete, frame.data)
        index += 1


def repeated_nonces(records: Iterable[RecordSeen]) -> dict[tuple[str, str, int], list[RecordSeen]]:
    """Every (session id, direction, counter) seen more than once, with each sighting."""
    seen: dict[tuple[str, str, int], list[RecordSeen]] = {}
    for record in records:
        seen.setdefault(record.nonce_use, []).append(record)
    return {use: sightings for use, sightings in seen.items() if len(sightings) > 1}


class _FrameCursor:
    """Where the next frame starts in a stream being forwarded: where bytes may be injected."""

    def __init__(self) -> None:
        self.received = 0
        self.next_frame = 0
        self._header = b""  # the first bytes of the header at next_frame, when a chunk ended inside it

    def advance(self, chunk: bytes) -> list[int]:
        """Account for ``chunk``; returns the frame boundaries in it, as offsets into it."""
        start = self.received
        self.received += len(chunk)
        boundaries: list[int] = []
        while self.next_frame <= self.received:
            if not self._header and self.next_frame >= start:
                boundaries.append(self.next_frame - start)
            begin = max(self.next_frame + len(self._header), start) - start
            self._header += chunk[begin:begin + FRAME_HEADER.size - len(self._header)]
            if len(self._header) < FRAME_HEADER.size:
                break
            length, _ = FRAME_HEADER.unpack(self._header)
            self._header = b""
            self.next_frame += 4 + length
        return boundaries

    @property
    def at_boundary(self) -> bool:
        return self.next_frame == self.received and not self._header


@dataclass
class _Pipe:
    """One direction of a relayed connection: what it carried, and bytes waiting to be injected."""

    direction: str
    captured: bytearray = field(default_factory=bytearray)
    cursor: _FrameCursor = field(default_factory=_FrameCursor)
    pending: list[bytes] = field(default_factory=list)
    injected: list[bytes] = field(default_factory=list)
    first_data: float | None = None
    last_data: float | None = None
    ended: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    flushed: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.flushed = threading.Condition(self.lock)


class Connection:
    """One connection through a relay: a socket pair and two pumps that copy and record."""

    def __init__(self, replica: str, client: socket.socket, upstream: socket.socket | None) -> None:
        self.id = next(_connection_ids)
        self.replica = replica
        self.opened = time.monotonic()
        self.refused = upstream is None
        """The replica did not accept (it is dead): the peer's connection was closed at once."""
        self.pipes = {C2R: _Pipe(C2R), R2C: _Pipe(R2C)}
        self._client, self._upstream = client, upstream
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        if self._upstream is None:
            _abort(self._client)
            self._client.close()
            for pipe in self.pipes.values():
                pipe.ended = time.monotonic()
            return
        for pipe, source, sink in ((self.pipes[C2R], self._client, self._upstream),
                                   (self.pipes[R2C], self._upstream, self._client)):
            thread = threading.Thread(target=self._pump, args=(pipe, source, sink), daemon=True,
                                      name=f"relay-{self.replica}-{self.id}-{pipe.direction}")
            thread.start()
            self._threads.append(thread)

    @property
    def open(self) -> bool:
        return not self.refused and all(pipe.ended is None for pipe in self.pipes.values())

    @property
    def last_data(self) -> float | None:
        times = [p.last_data for p in self.pipes.values() if p.last_data is not None]
        return max(times) if times else None

    def captured(self, direction: str) -> bytes:
        pipe = self.pipes[direction]
        with pipe.lock:
            return bytes(pipe.captured)

    def records(self) -> list[RecordSeen]:
        """The RECORD headers both directions carried so far (injected bytes are not among them)."""
        return [record for direction in DIRECTIONS
                for record in records_in(self.captured(direction), connection=self.id, replica=self.replica,
                                         direction=direction)]

    def injected(self, direction: str) -> list[bytes]:
        with self.pipes[direction].lock:
            return list(self.pipes[direction].injected)

    def inject(self, data: bytes, direction: str = C2R, timeout: float = INJECT_TIMEOUT) -> None:
        """Put ``data`` into the stream between two frames; returns once it is written."""
        pipe = self.pipes[direction]
        sink = self._upstream if direction == C2R else self._client
        if sink is None:
            raise InjectError(f"connection {self.id} to {self.replica} was refused")
        with pipe.lock:
            if pipe.ended is not None:
                raise InjectError(f"connection {self.id} to {self.replica} is closed ({direction})")
            if pipe.cursor.at_boundary:
                self._write_injected(pipe, sink, data)
                return
            pipe.pending.append(data)
            if not pipe.flushed.wait_for(lambda: data not in pipe.pending or pipe.ended is not None, timeout):
                pipe.pending.remove(data)
                raise InjectError(f"no frame boundary on connection {self.id} within {timeout:.0f} s")
            if data in pipe.pending:
                raise InjectError(f"connection {self.id} to {self.replica} closed before the injection")

    @staticmethod
    def _write_injected(pipe: _Pipe, sink: socket.socket, data: bytes) -> None:
        sink.sendall(data)
        pipe.injected.append(data)

    def _pump(self, pipe: _Pipe, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                chunk = source.recv(CHUNK)
                if not chunk:
                    _shutdown_write(sink)
                    return
                self._forward(pipe, sink, chunk)
        except OSError:
            _abort(sink)
            _abort(source)
        finally:
            with pipe.lock:
                pipe.ended = time.monotonic()
                pipe.flushed.notify_all()
            if all(p.ended is not None for p in self.pipes.values()):
                self._client.close()
                sink.close()
                source.close()

    def _forward(self, pipe: _Pipe, sink: socket.socket, chunk: bytes) -> None:
        with pipe.lock:
            now = time.monotonic()
            pipe.first_data = pipe.first_data or now
            pipe.last_data = now
            pipe.captured += chunk
            boundaries = pipe.cursor.advance(chunk)
            if not pipe.pending or not boundaries:
                sink.sendall(chunk)
                return
            cut = boundaries[0]
            sink.sendall(chunk[:cut])
            for data in pipe.pending:
                self._write_injected(pipe, sink, data)
            pipe.pending.clear()
            pipe.flushed.notify_all()
            sink.sendall(chunk[cut:])

    def cut(self) -> None:
        """Abort both sides now (RST), as a network failure would."""
        _abort(self._client)
        if self._upstream is not None:
            _abort(self._upstream)


def _shutdown_write(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _abort(sock: socket.socket) -> None:
    """Close with RST rather than FIN, and wake a thread blocked on the socket."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class Relay:
    """A loopback port in front of one replica; every connection forwarded and recorded."""

    def __init__(self, replica: str, target: tuple[str, int], host: str = "127.0.0.1", port: int = 0) -> None:
        self.replica = replica
        self.target = target
        self._listener = socket.create_server((host, port), backlog=128)
        self.host, self.port = self._listener.getsockname()[:2]
        self._connections: list[Connection] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True, name=f"relay-{replica}")
        self._closed = False

    @property
    def address(self) -> str:
        """``HOST:PORT`` to give the peer (``--peer bob=ADDR,ADDR,...``)."""
        return f"{self.host}:{self.port}"

    def start(self) -> Relay:
        self._thread.start()
        return self

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                upstream: socket.socket | None = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
                upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                upstream = None
            connection = Connection(self.replica, client, upstream)
            with self._lock:
                self._connections.append(connection)
            connection.start()

    def connections(self) -> list[Connection]:
        with self._lock:
            return list(self._connections)

    def live(self) -> list[Connection]:
        """Connections open in both directions now."""
        return [c for c in self.connections() if c.open]

    def records(self) -> list[RecordSeen]:
        return [record for connection in self.connections() for record in connection.records()]

    def cut(self) -> None:
        """Abort every live connection (the replica stays up)."""
        for connection in self.live():
            connection.cut()

    def close(self) -> None:
        self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        for connection in self.live():
            connection.cut()


def serving(relays: Iterable[Relay]) -> tuple[Relay, Connection] | None:
    """The relay and live connection that carried data most recently: the replica serving now."""
    candidates = [(c.last_data, relay, c) for relay in relays for c in relay.live() if c.last_data is not None]
    if not candidates:
        return None
    _, relay, connection = max(candidates, key=lambda item: item[0])
    return relay, connection
