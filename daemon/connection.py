"""Trio shell around one sans-IO Session on one TCP stream."""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING, Awaitable, Callable

import trio

from pqtunnel.errors import PqtunnelError, ProtocolError
from pqtunnel.session import DataReceived, Established, PeerClosed, PongReceived, Rekeyed, Session

from .logs import LOG

if TYPE_CHECKING:
    from pqtunnel.handshake import HandshakeResult

RECEIVE_SIZE = 256 * 1024
TICK_SECONDS = 1.0


def now_ms() -> int:
    return int(time.time() * 1000)


class ConnectionClosed(PqtunnelError):
    """The session ended before the operation could complete."""


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
        self._send_lock = trio.Lock()
        self._pings: dict[int, trio.Event] = {}
        self._pong_times: dict[int, int] = {}
        self._cancel: trio.CancelScope | None = None
        self.on_established: Callable[[Connection], None] = lambda conn: None
        self.on_data: Callable[[Connection, bytes], Awaitable[None] | None] = lambda conn, data: None
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

    async def run(self) -> None:
        """Run until the peer closes, an error occurs, or we are cancelled."""
        try:
            with trio.CancelScope() as scope:
                self._cancel = scope
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._guarded, self._ticker, nursery.cancel_scope)
                    await self._guarded(self._main, nursery.cancel_scope)
        finally:
            await self._finish()

    async def _guarded(self, task: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
        """Turn every way a connection can fail into a one-line close reason; never crash the node."""
        try:
            await task()
        except ProtocolError as exc:
            self.close_reason = self.close_reason or str(exc)
            await self._flush_quietly()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.close_reason = self.close_reason or f"connection lost ({_os_reason(exc)})"
        except Exception as exc:  # a bug must cost one connection, not the daemon
            self.close_reason = f"internal error: {type(exc).__name__}: {exc}"
            LOG.debug("internal error on connection with %s", self.peer_label, exc_info=True)
        finally:
            scope.cancel()

    async def _main(self) -> None:
        if self.session.is_initiator:
            self.session.start(now_ms())
            await self.flush()
        await self._reader()

    async def _reader(self) -> None:
        while True:
            data = await self.stream.receive_some(RECEIVE_SIZE)
            if not data:
                if not self.close_reason:
                    self.close_reason = "peer closed the connection" if self.established.is_set() else \
                        "peer closed the connection during the handshake"
                return
            for event in self.session.receive_data(data, now_ms()):
                await self._handle(event)
            await self.flush()
            if self.session.closed:
                return

    async def _handle(self, event: object) -> None:
        if isinstance(event, Established):
            self.established_at = time.monotonic()
            self.established.set()
            self.on_established(self)
        elif isinstance(event, DataReceived):
            outcome = self.on_data(self, event.data)
            if outcome is not None:
                await outcome
        elif isinstance(event, PongReceived):
            self._pong_times[event.ping_id] = now_ms()
            waiter = self._pings.pop(event.ping_id, None)
            if waiter is not None:
                waiter.set()
        elif isinstance(event, Rekeyed):
            LOG.info("rekeyed session with %s (epoch %d)", self.peer_label, event.epoch)
        elif isinstance(event, PeerClosed):
            self.close_reason = f"peer closed the session: {event.reason}"

    async def _ticker(self) -> None:
        while True:
            await trio.sleep(TICK_SECONDS)
            self.session.tick(now_ms())
            await self.flush()

    async def flush(self) -> None:
        """Send everything the session has queued, in order, one writer at a time."""
        async with self._send_lock:
            data = self.session.data_to_send()
            if data:
                await self.stream.send_all(data)

    async def _flush_quietly(self) -> None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            try:
                await self.flush()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    async def send(self, data: bytes) -> None:
        if self.finished.is_set() or self.session.closed:
            raise ConnectionClosed(f"session with {self.peer_label} is closed")
        self.session.send(data, now_ms())
        await self.flush()

    async def ping(self) -> float:
        """Round trip through the encrypted session, in milliseconds."""
        if self.finished.is_set():
            raise ConnectionClosed(f"session with {self.peer_label} is closed")
        sent = now_ms()
        started = time.perf_counter()
        ping_id = self.session.ping(sent)
        waiter = self._pings[ping_id] = trio.Event()
        await self.flush()
        async with trio.open_nursery() as nursery:
            async def stop_on_finish() -> None:
                await self.finished.wait()
                nursery.cancel_scope.cancel()
            nursery.start_soon(stop_on_finish)
            await waiter.wait()
            nursery.cancel_scope.cancel()
        if not waiter.is_set():
            raise ConnectionClosed(f"session with {self.peer_label} closed during ping: {self.close_reason}")
        return (time.perf_counter() - started) * 1000

    async def close(self, reason: str) -> None:
        """Close with an authenticated CLOSE record telling the peer why."""
        if self.finished.is_set():
            return
        self.close_reason = reason
        self.session.close(reason)
        await self._flush_quietly()
        if self._cancel is not None:
            self._cancel.cancel()

    async def _finish(self) -> None:
        with trio.CancelScope(shield=True):
            try:
                await self.stream.aclose()
            except (trio.BrokenResourceError, OSError):
                pass
        self.finished.set()
        for waiter in self._pings.values():
            waiter.set()
        self.on_finished(self)

    def info(self) -> dict[str, object]:
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
        }


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
