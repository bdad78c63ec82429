"""Trio streams on top of the sans-IO multiplexer, one ``StreamHost`` per session.

A ``TunnelStream`` behaves like a half-closeable trio stream. Flow control is end to end:
``receive_some`` returns credit to the peer only for bytes the application has taken, so a
stalled reader stops its writer after one window instead of filling our memory.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import trio

from pqtunnel import mux
from pqtunnel.errors import PqtunnelError

from .connection import now_ms
from .logs import LOG

if TYPE_CHECKING:
    from .connection import Connection

OPEN_TIMEOUT = 15.0
COALESCE_LIMIT = 256 * 1024


class StreamError(PqtunnelError):
    """The stream was reset, refused, or its session ended."""


class StreamRefusedError(StreamError):
    """The peer refused to open the stream; ``code`` is the mux error code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason or f"refused ({_code_name(code)})")
        self.code = code


def _code_name(code: int) -> str:
    try:
        return mux.ErrorCode(code).name.lower().replace("_", " ")
    except ValueError:
        return f"code {code}"


class TunnelStream:
    """One multiplexed stream. Data arrives in order; EOF is b"" from receive_some."""

    def __init__(self, host: StreamHost, stream_id: int, target: dict[str, Any]) -> None:
        self.host = host
        self.stream_id = stream_id
        self.target = target
        self._chunks: deque[bytes] = deque()
        self._readable = trio.Event()
        self._writable = trio.Event()
        self._eof = False
        self._sent_eof = False
        self._error: StreamError | None = None
        self._abort_callbacks: list[Callable[[StreamError], None]] = []
        self.bytes_in = 0
        self.bytes_out = 0

    # --- called by the host ---------------------------------------------------------------------

    def _deliver(self, data: bytes) -> None:
        self._chunks.append(data)
        self._readable.set()

    def _end(self) -> None:
        self._eof = True
        self._readable.set()

    def _fail(self, error: StreamError) -> None:
        if self._error is None:
            self._error = error
        self._readable.set()
        self._writable.set()
        callbacks, self._abort_callbacks = self._abort_callbacks, []
        for callback in callbacks:
            callback(self._error)

    def on_abort(self, callback: Callable[[StreamError], None]) -> None:
        """Call ``callback(error)`` when the stream is reset or its session ends.

        Whoever splices this stream to something else registers here, so a reset also stops
        the direction that is waiting on the *other* side (e.g. a silent process's stdout).
        """
        if self._error is not None:
            callback(self._error)
        else:
            self._abort_callbacks.append(callback)

    def _credit(self) -> None:
        self._writable.set()

    # --- trio stream interface --------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while not self._chunks:
            if self._error is not None and not self._eof:
                raise self._error
            if self._eof:
                return b""
            self._readable = trio.Event()
            await self._readable.wait()
        data = self._take(max_bytes)
        self.bytes_in += len(data)
        self.host.mux.consumed(self.stream_id, len(data))
        await self.host.flush()
        return data

    def _take(self, max_bytes: int | None) -> bytes:
        """Up to ``max_bytes`` of queued data: several frames at once, so bulk copies loop less."""
        limit = max_bytes if max_bytes is not None else COALESCE_LIMIT
        first = self._chunks.popleft()
        if len(first) >= limit or not self._chunks:
            if len(first) > limit:
                self._chunks.appendleft(first[limit:])
                return first[:limit]
            return first
        parts, size = [first], len(first)
        while self._chunks and size + len(self._chunks[0]) <= limit:
            chunk = self._chunks.popleft()
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            if self._error is not None:
                raise self._error
            try:
                accepted = self.host.mux.send_data(self.stream_id, view)
            except mux.MuxError as exc:
                raise StreamError(f"stream {self.stream_id}: {exc}") from None
            view = view[accepted:]
            self.bytes_out += accepted
            if accepted:
                await self.host.flush()
            if view and self.host.mux.credit(self.stream_id) == 0:
                self._writable = trio.Event()
                await self._writable.wait()

    async def send_eof(self) -> None:
        if self._sent_eof or self._error is not None:
            return
        self._sent_eof = True
        try:
            self.host.mux.send_fin(self.stream_id)
        except mux.MuxError:
            return
        await self.host.flush()

    async def aclose(self) -> None:
        """Reset unless both directions already finished cleanly."""
        self.host.mux.reset_stream(self.stream_id, mux.ErrorCode.CANCELLED, "closed")
        self.host.streams.pop(self.stream_id, None)
        with trio.CancelScope(shield=True):
            try:
                await self.host.flush()
            except (PqtunnelError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    async def reset(self, code: int, reason: str) -> None:
        self.host.mux.reset_stream(self.stream_id, code, reason)
        self.host.streams.pop(self.stream_id, None)
        await self.host.flush()


InboundHandler = Callable[["StreamHost", TunnelStream], Awaitable[None]]


class StreamHost:
    """Binds a Multiplexer to a Connection: dispatches events, owns stream tasks."""

    def __init__(self, conn: Connection, inbound: InboundHandler, nursery: trio.Nursery) -> None:
        self.conn = conn
        self.mux = mux.Multiplexer(is_initiator=conn.session.is_initiator)
        self.inbound = inbound
        self.nursery = nursery
        self.streams: dict[int, TunnelStream] = {}
        self._opening: dict[int, trio.Event] = {}
        self._refusals: dict[int, StreamError] = {}
        self.closed = False

    @property
    def peer(self) -> str:
        result = self.conn.result
        return result.peer_name if result else "?"

    async def flush(self) -> None:
        data = self.mux.data_to_send()
        if data:
            await self.conn.send(data)

    async def on_session_data(self, data: bytes) -> None:
        """Called by the connection's reader: must never wait on the socket."""
        for event in self.mux.receive_data(data):
            self._dispatch(event)
        out = self.mux.data_to_send()
        if out and not self.conn.session.closed:
            self.conn.session.send(out, now_ms())
            self.conn.kick()

    def _dispatch(self, event: mux.Event) -> None:
        if isinstance(event, mux.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._deliver(event.data)
        elif isinstance(event, mux.CreditAvailable):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._credit()
        elif isinstance(event, mux.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._end()
        elif isinstance(event, mux.StreamOpenRequested):
            stream = TunnelStream(self, event.stream_id, event.target)
            self.streams[event.stream_id] = stream
            self.nursery.start_soon(self._serve_guarded, stream)
        elif isinstance(event, (mux.StreamAccepted, mux.StreamRefused)):
            self._opened(event)
        elif isinstance(event, mux.StreamReset):
            waiter = self._opening.pop(event.stream_id, None)
            if waiter is not None:  # reset instead of answered: report the peer's reason now
                self._refusals[event.stream_id] = StreamRefusedError(event.code, event.reason)
                waiter.set()
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None:
                stream._fail(StreamError(f"stream reset by {self.peer if event.by_peer else 'us'}: "
                                         f"{event.reason or _code_name(event.code)}"))
        elif isinstance(event, mux.StreamClosed):
            self.streams.pop(event.stream_id, None)
        elif isinstance(event, mux.ProtocolViolation):
            LOG.warning("stream protocol violation from %s: %s", self.peer, event.reason)
            self.shutdown(f"protocol violation: {event.reason}")
            self.nursery.start_soon(self.conn.close, f"stream protocol violation: {event.reason}")
        elif isinstance(event, mux.GoAwayReceived):
            LOG.info("%s accepts no new streams: %s", self.peer, event.reason or _code_name(event.code))

    async def _serve_guarded(self, stream: TunnelStream) -> None:
        """A bug or a peer's surprise in one stream's handler must never end the session."""
        try:
            await self.inbound(self, stream)
        except Exception as exc:
            LOG.warning("stream %d from %s failed: %s: %s", stream.stream_id, self.peer, type(exc).__name__, exc)
            await stream.aclose()

    def _opened(self, event: mux.StreamAccepted | mux.StreamRefused) -> None:
        if isinstance(event, mux.StreamRefused):
            self._refusals[event.stream_id] = StreamRefusedError(event.code, event.reason)
        waiter = self._opening.pop(event.stream_id, None)
        if waiter is not None:
            waiter.set()

    async def open(self, target: dict[str, Any], timeout: float = OPEN_TIMEOUT) -> TunnelStream:
        """Open a stream to ``target`` on the peer; raises StreamRefusedError or StreamError."""
        if self.closed:
            raise StreamError(f"session with {self.peer} is closed")
        try:
            stream_id = self.mux.open_stream(target)
        except mux.MuxError as exc:
            raise StreamError(str(exc)) from None
        stream = TunnelStream(self, stream_id, target)
        self.streams[stream_id] = stream
        waiter = self._opening[stream_id] = trio.Event()
        await self.flush()
        with trio.move_on_after(timeout):
            await waiter.wait()
        if not waiter.is_set():
            self._opening.pop(stream_id, None)
            await stream.reset(mux.ErrorCode.TIMED_OUT, "open timed out")
            raise StreamError(f"{self.peer} did not answer the stream open within {timeout:.0f} s")
        refusal = self._refusals.pop(stream_id, None)
        if refusal is not None:
            self.streams.pop(stream_id, None)
            raise refusal
        if stream._error is not None:
            raise stream._error
        return stream

    def shutdown(self, reason: str) -> None:
        """The session is gone: fail every stream and pending open."""
        self.closed = True
        error = StreamError(f"session with {self.peer} ended: {reason}")
        for stream in list(self.streams.values()):
            stream._fail(error)
        self.streams.clear()
        for stream_id, waiter in list(self._opening.items()):
            self._refusals[stream_id] = error  # not a refusal by the peer: the peer is gone
            waiter.set()
        self._opening.clear()
