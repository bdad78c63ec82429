"""Trio shell around one sans-IO Session on one TCP stream.

Three tasks per connection: the reader feeds the session, the writer is the only task that
writes to the socket, and the ticker drives keepalive and rekey. The reader never waits on
the socket's send side, so two peers pushing bulk data at each other cannot deadlock;
application writers get backpressure from ``flush()`` once too much is queued.
"""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import trio

from pqtunnel.errors import PqtunnelError, ProtocolError
from pqtunnel.session import DataReceived, Established, PeerClosed, PongReceived, Rekeyed, Session

from .logs import LOG

if TYPE_CHECKING:
    from pqtunnel.handshake import HandshakeResult

    from .streams import StreamHost

RECEIVE_SIZE = 1024 * 1024
TICK_SECONDS = 1.0
HIGH_WATER = 2 * 1024 * 1024
MAX_QUEUED = 16 * HIGH_WATER  # only answers the reader queues can grow past HIGH_WATER
CLOSE_FLUSH_SECONDS = 1.0


def now_ms() -> int:
    return int(time.time() * 1000)


class ConnectionClosed(PqtunnelError):
    """The session ended before the operation could complete."""


class PeerNotReadingError(ProtocolError):
    """The peer keeps provoking answers (pongs, resets) but never reads them."""


class Connection:
    """Owns the socket, feeds the Session, and reports what happened in one log line each."""

    def __init__(self, stream: trio.SocketStream, session: Session, remote: str, *, dialled: str | None = None) -> None:
        self.stream = stream
        self.session = session
        self.remote = remote
        self.dialled = dialled
        self.direction = "outbound" if dialled else "inbound"
        self.established = trio.Event()
        self.finished = trio.Event()
        self.close_reason = ""
        self.established_at = 0.0
        self.host: StreamHost | None = None
        self.nursery: trio.Nursery | None = None
        self._kick = trio.Event()
        self._progress = trio.Event()
        self._writing = False
        self._backlog: list[bytes | memoryview] = []
        self._pings: dict[int, trio.Event] = {}
        self._cancel: trio.CancelScope | None = None
        self.on_established: Callable[[Connection], None] = lambda conn: None
        self.on_finished: Callable[[Connection], None] = lambda conn: None
        _set_nodelay(stream)

    @property
    def result(self) -> HandshakeResult | None:
        return self.session.result

    @property
    def peer_label(self) -> str:
        result = self.result
        if result is not None:
            return f"{result.peer_name} ({result.peer.fingerprint})"
        return f"{self.dialled or 'unknown peer'} at {self.remote}"

    # --- tasks --------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until the peer closes, an error occurs, or we are cancelled."""
        try:
            with trio.CancelScope() as scope:
                self._cancel = scope
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    nursery.start_soon(self._guarded, self._writer, nursery.cancel_scope)
                    nursery.start_soon(self._guarded, self._ticker, nursery.cancel_scope)
                    await self._guarded(self._reader, nursery.cancel_scope)
        finally:
            await self._finish()

    async def _guarded(self, task: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
        """Turn every way a connection can fail into a one-line close reason; never crash the node."""
        try:
            await task()
        except ProtocolError as exc:
            self.close_reason = self.close_reason or str(exc)
            await self.drain(CLOSE_FLUSH_SECONDS)  # e.g. the ALERT telling the initiator why
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.close_reason = self.close_reason or f"connection lost ({_os_reason(exc)})"
        except Exception as exc:  # a bug must cost one connection, not the daemon
            self.close_reason = f"internal error: {type(exc).__name__}: {exc}"
            LOG.debug("internal error on connection with %s", self.peer_label, exc_info=True)
        finally:
            scope.cancel()

    async def _reader(self) -> None:
        if self.session.is_initiator:
            self.session.start(now_ms())
            self.kick()
        while True:
            data = await self.stream.receive_some(RECEIVE_SIZE)
            if not data:
                if not self.close_reason:
                    self.close_reason = "peer closed the connection" if self.established.is_set() else \
                        "peer closed the connection during the handshake"
                return
            for event in self.session.receive_data(data, now_ms()):
                await self._handle(event)
            self.kick()
            if self.session.pending_bytes > MAX_QUEUED:
                raise PeerNotReadingError(f"peer is not reading: {self.session.pending_bytes} bytes queued for it")
            if self.session.closed:
                await self.drain(CLOSE_FLUSH_SECONDS)
                return

    async def _writer(self) -> None:
        """Writes whatever the direct path in ``kick`` could not: everything in queue order."""
        while True:
            buffers, self._backlog = self._backlog + self.session.buffers_to_send(), []
            if not buffers:
                self._signal_progress()
                await self._kick.wait()
                self._kick = trio.Event()
                continue
            self._writing = True
            try:
                await _send_buffers(self.stream.socket, buffers)
            finally:
                self._writing = False
            self._signal_progress()

    async def _ticker(self) -> None:
        while True:
            await trio.sleep(TICK_SECONDS)
            self.session.tick(now_ms())
            self.kick()

    async def _handle(self, event: object) -> None:
        if isinstance(event, Established):
            self.established_at = time.monotonic()
            self.established.set()
            self.on_established(self)
        elif isinstance(event, DataReceived):
            if self.host is not None:
                await self.host.on_session_data(event.data)
        elif isinstance(event, PongReceived):
            waiter = self._pings.pop(event.ping_id, None)
            if waiter is not None:
                waiter.set()
        elif isinstance(event, Rekeyed):
            LOG.info("rekeyed session with %s (epoch %d)", self.peer_label, event.epoch)
        elif isinstance(event, PeerClosed):
            self.close_reason = f"peer closed the session: {event.reason}"

    # --- sending --------------------------------------------------------------------------------------

    def kick(self) -> None:
        """Send what is queued now if the socket takes it, else wake the writer; never blocks.

        Writing straight from here saves a trip through the scheduler on every message,
        which is most of a new stream's latency. Order is kept: the direct path runs only
        while the writer holds nothing (it is idle and the backlog is empty).
        """
        if self._writing or self._backlog or self.finished.is_set():
            self._kick.set()
            return
        buffers = self.session.buffers_to_send()
        if not buffers:
            return
        self._backlog = _write_now(self.stream.socket.fileno(), buffers)
        if self._backlog:
            self._kick.set()
        else:
            self._signal_progress()

    def _signal_progress(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def drain(self, timeout: float) -> None:
        """Wait (shielded, bounded) until everything queued has been written."""
        self.kick()
        with trio.move_on_after(timeout) as scope:
            scope.shield = True
            while (self.session.pending_bytes or self._writing or self._backlog) and not self.finished.is_set():
                await self._progress.wait()

    async def send(self, data: bytes | bytearray) -> None:
        """Encrypt and queue ``data`` once the queue is below HIGH_WATER.

        Waiting *before* encrypting bounds the session's memory as a whole: many streams
        writing at once hold their plaintext, not plaintext plus ciphertext.
        """
        while self.session.pending_bytes > HIGH_WATER and not self.finished.is_set():
            await self._progress.wait()
        if self.finished.is_set() or self.session.closed:
            raise ConnectionClosed(f"session with {self.peer_label} is closed")
        self.session.send(data, now_ms())
        self.kick()

    async def ping(self) -> float:
        """Round trip through the encrypted session, in milliseconds."""
        if self.finished.is_set():
            raise ConnectionClosed(f"session with {self.peer_label} is closed")
        started = time.perf_counter()
        ping_id = self.session.ping(now_ms())
        waiter = self._pings[ping_id] = trio.Event()
        self.kick()
        try:
            await waiter.wait()  # set by the PONG (which removes it), or by _finish
        finally:
            unanswered = self._pings.pop(ping_id, None) is not None  # also when the caller gave up
        if unanswered:
            raise ConnectionClosed(f"session with {self.peer_label} closed during ping: {self.close_reason}")
        return (time.perf_counter() - started) * 1000

    async def close(self, reason: str) -> None:
        """Close with an authenticated CLOSE record telling the peer why."""
        if self.finished.is_set():
            return
        self.close_reason = reason
        self.session.close(reason)
        await self.drain(CLOSE_FLUSH_SECONDS)
        if self._cancel is not None:
            self._cancel.cancel()

    async def _finish(self) -> None:
        if self.host is not None:
            self.host.shutdown(self.close_reason or "closed")
        with trio.CancelScope(shield=True):
            try:
                await self.stream.aclose()
            except (trio.BrokenResourceError, OSError):
                pass
        self.finished.set()
        self._signal_progress()
        for waiter in self._pings.values():
            waiter.set()
        self.on_finished(self)

    def info(self) -> dict[str, Any]:
        result = self.result
        assert result is not None
        return {
            "peer": result.peer_name,
            "fingerprint": result.peer.fingerprint,
            "remote": self.remote,
            "direction": self.direction,
            "suite": result.suite.name,
            "kem": result.suite.kem_label,
            "signature": result.suite.signature_label,
            "aead": result.aead.label,
            "session_id": result.session_id.hex(),
            "bytes_sent": self.session.bytes_sent,
            "bytes_received": self.session.bytes_received,
            "age_s": round(time.monotonic() - self.established_at, 3),
            "rekeys": self.session.epoch,
            "streams": len(self.host.streams) if self.host else 0,
        }


IOV_BATCH = 512  # below the kernel's IOV_MAX (1024)


def _consume(views: list[memoryview], index: int, sent: int) -> int:
    """Drop ``sent`` bytes from the front of ``views[index:]``; returns the new index."""
    while sent and index < len(views):
        size = len(views[index])
        if sent >= size:
            sent -= size
            index += 1
        else:
            views[index] = views[index][sent:]
            sent = 0
    return index


async def _send_buffers(sock: trio.socket.SocketType, buffers: list[bytes | memoryview]) -> None:
    """Scatter-gather send: record headers and ciphertexts go out without being joined."""
    views = [memoryview(b) for b in buffers]
    index = 0
    while index < len(views):
        index = _consume(views, index, await sock.sendmsg(views[index : index + IOV_BATCH]))


def _write_now(fd: int, buffers: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """Non-blocking scatter write; returns what the socket did not take. On an error it
    returns everything, so the writer task meets the error and closes with its reason."""
    views = [memoryview(b) for b in buffers]
    index = 0
    while index < len(views):
        try:
            sent = os.writev(fd, views[index : index + IOV_BATCH])
        except OSError:  # EAGAIN included: the writer task waits for writability
            break
        index = _consume(views, index, sent)
    return list(views[index:])


def _set_nodelay(stream: trio.SocketStream) -> None:
    """No Nagle: a small frame must never wait for a delayed ACK (ssh -D's p99 problem)."""
    try:
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


def _os_reason(exc: BaseException) -> str:
    """The most specific OS reason in an exception chain (trio wraps connect errors)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        if isinstance(seen, BaseExceptionGroup) and seen.exceptions:
            seen = seen.exceptions[-1]
        else:
            seen = seen.__cause__ or seen.__context__
    return str(exc) or type(exc).__name__
