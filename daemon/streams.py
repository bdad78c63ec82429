"""Trio streams over a tunnel: ``TunnelStream`` behaves like a half-closeable trio stream.

Flow control is end to end: ``receive_some`` returns credit to the peer only for bytes the
application has taken, so a stalled reader stops its writer after one window instead of
filling our memory. A stream talks to its connection only through ``StreamPort``, the
narrow interface below, so this module imports nothing from the connection.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Protocol

import trio

from pqtunnel import mux
from pqtunnel.errors import PqtunnelError
from pqtunnel.handshake import HandshakeResult

COALESCE_LIMIT = 256 * 1024


class StreamError(PqtunnelError):
    """The stream was reset, refused, or its session ended."""


class StreamRefusedError(StreamError):
    """The peer refused to open the stream; ``code`` is the mux error code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason or f"refused ({code_name(code)})")
        self.code = code


def code_name(code: int) -> str:
    try:
        return mux.ErrorCode(code).name.lower().replace("_", " ")
    except ValueError:
        return f"code {code}"


class StreamPort(Protocol):
    """What a stream needs from the connection that carries it."""

    @property
    def peer(self) -> str: ...

    @property
    def result(self) -> HandshakeResult | None: ...

    @property
    def groups(self) -> tuple[str, ...]: ...

    @property
    def peer_host(self) -> str | None: ...

    remote: str

    def credit(self, stream_id: int) -> int: ...

    async def send_data(self, stream_id: int, data: memoryview) -> int: ...

    def send_fin(self, stream_id: int) -> None: ...

    def consumed(self, stream_id: int, n: int) -> None: ...

    def accept(self, stream_id: int) -> None: ...

    def refuse(self, stream_id: int, code: int, reason: str) -> None: ...

    def reset(self, stream_id: int, code: int, reason: str) -> None: ...


class TunnelStream:
    """One multiplexed stream. Data arrives in order; EOF is b"" from receive_some."""

    def __init__(self, port: StreamPort, stream_id: int, target: dict[str, Any]) -> None:
        self.port = port
        self.stream_id = stream_id
        self.target = target
        self.inbound = False
        """Opened by the peer (served here, so this node's policy judges it), not by us."""
        self._chunks: deque[bytes] = deque()
        self._readable = trio.Event()
        self._writable = trio.Event()
        self._eof = False
        self._sent_eof = False
        self._error: StreamError | None = None
        self._abort_callbacks: list[Callable[[StreamError], None]] = []
        self.bytes_in = 0
        self.bytes_out = 0

    @property
    def peer(self) -> str:
        return self.port.peer

    @property
    def error(self) -> StreamError | None:
        """Why the stream ended abnormally (reset, refused, session lost), else None."""
        return self._error

    # --- called by the connection ---------------------------------------------------------------

    def deliver(self, data: bytes) -> None:
        self._chunks.append(data)
        self._readable.set()

    def end(self) -> None:
        self._eof = True
        self._readable.set()

    def fail(self, error: StreamError) -> None:
        if self._error is None:
            self._error = error
        self._readable.set()
        self._writable.set()
        callbacks, self._abort_callbacks = self._abort_callbacks, []
        for callback in callbacks:
            callback(self._error)

    def discard(self, error: StreamError) -> None:
        """Fail and drop whatever is buffered unread: the stream was reset to free that memory."""
        self._chunks.clear()
        self.fail(error)

    def credit_available(self) -> None:
        self._writable.set()

    def on_abort(self, callback: Callable[[StreamError], None]) -> None:
        """Call ``callback(error)`` when the stream is reset or its session ends.

        Whoever splices this stream to something else registers here, so a reset also stops
        the direction that is waiting on the *other* side (e.g. a silent process's stdout).
        """
        if self._error is not None:
            callback(self._error)
        else:
            self._abort_callbacks.append(callback)

    # --- answering an inbound open -------------------------------------------------------------------

    def accept(self) -> None:
        try:
            self.port.accept(self.stream_id)
        except mux.MuxError as exc:
            raise StreamError(f"stream {self.stream_id} went away before it was accepted") from exc

    def refuse(self, code: int, reason: str) -> None:
        """Refuse an inbound open; a no-op if the peer already reset it or the session is gone."""
        try:
            self.port.refuse(self.stream_id, code, reason)
        except (mux.MuxError, PqtunnelError):
            pass

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
        self.port.consumed(self.stream_id, len(data))
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
                accepted = await self.port.send_data(self.stream_id, view)
            except mux.MuxError as exc:
                raise StreamError(f"stream {self.stream_id}: {exc}") from None
            view = view[accepted:]
            self.bytes_out += accepted
            if view and self.port.credit(self.stream_id) == 0:
                self._writable = trio.Event()
                await self._writable.wait()

    async def send_eof(self) -> None:
        if self._sent_eof or self._error is not None:
            return
        self._sent_eof = True
        try:
            self.port.send_fin(self.stream_id)
        except (mux.MuxError, PqtunnelError):
            return

    async def aclose(self) -> None:
        """Reset unless both directions already finished cleanly."""
        self.reset(mux.ErrorCode.CANCELLED, "closed")

    def reset(self, code: int, reason: str) -> None:
        try:
            self.port.reset(self.stream_id, code, reason)
        except PqtunnelError:
            pass  # the session is gone: nothing to tell the peer
