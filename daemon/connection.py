"""Trio shell around one sans-IO ``Tunnel`` on one TCP stream.

Three tasks per connection: the reader feeds the tunnel, the writer is the only task that
waits on the socket's send side, and the ticker drives the tunnel's timers once a second.
The reader never waits on the send side, so two peers pushing bulk data at each other
cannot deadlock; stream writers get backpressure from ``Tunnel.writable``. Every protocol
rule (keepalive, close, queue limits, flow control) is the tunnel's; this module only
moves bytes, time and events.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable

import trio

from pqtunnel import events
from pqtunnel import tunnel as core
from pqtunnel.errors import LocalProtocolError, NoCounterError, PqtunnelError, ProtocolError
from pqtunnel.handshake import HandshakeResult
from pqtunnel.bandwidth import ByteBucket
from pqtunnel.limits import SessionBuffers, unlimited

from .logs import LOG
from .netio import monotonic_ms, os_reason, send_buffers, set_nodelay, wall_ms, write_now
from .streams import StreamError, StreamRefusedError, TunnelStream, code_name
from .trustpolicy import Admission

TICK_SECONDS = 1.0
CLOSE_FLUSH_SECONDS = 1.0
RECEIVE_SIZE = 1024 * 1024
OPEN_TIMEOUT = 15.0

InboundHandler = Callable[[TunnelStream], Awaitable[None]]


class ConnectionClosed(PqtunnelError):
    """The session ended before the operation could complete."""


class Connection:
    """Owns the socket and the tunnel; implements the ``StreamPort`` its streams use."""

    def __init__(self, stream: trio.SocketStream, tunnel: core.Tunnel, remote: str, *,
                 dialled: str | None = None) -> None:
        self.stream = stream
        self.tunnel = tunnel
        self.remote = remote
        self.dialled = dialled
        self.direction = "outbound" if dialled else "inbound"
        self.established = trio.Event()
        self.finished = trio.Event()
        self.close_reason = ""
        self.started_at = time.monotonic()  # the socket is connected: the handshake starts now
        self.established_at = 0.0
        self.handshake_wall = 0.0
        """Wall-clock time of the latest full handshake or rekey (``sessions``, like ``wg show``)."""
        self.received_wall = 0.0
        """Wall-clock time the latest bytes of the session arrived."""
        self.streams: dict[int, TunnelStream] = {}
        self.inbound: InboundHandler | None = None
        self.on_established: Callable[[Connection], None] = lambda conn: None
        self.on_finished: Callable[[Connection], None] = lambda conn: None
        self.on_rekeyed: Callable[[Connection], None] = lambda conn: None
        self.emit: Callable[[events.Event], None] = lambda event: None
        self.buffers: SessionBuffers = unlimited()
        self._charged: dict[int, int] = {}  # per stream: bytes delivered, charged to buffers, not yet read
        self.admission: Admission | None = None
        """What the policy decided about the peer in the handshake (groups, legacy rate limit)."""
        self.throttle: ByteBucket | None = None
        """A legacy session's byte budget, both directions together (None: full speed)."""
        self.handshake_note = ""
        """Added to the reason of a failed handshake (e.g. the trigger that narrowed the suites)."""
        self.fault = events.Fault.PEER
        self._nursery: trio.Nursery | None = None
        self._opening: dict[int, trio.Event] = {}
        self._refusals: dict[int, StreamError] = {}
        self._kick = trio.Event()
        self._progress = trio.Event()
        self._writing = False
        self._backlog: list[bytes | memoryview] = []
        self._pings: dict[int, trio.Event] = {}
        self._cancel: trio.CancelScope | None = None
        self.preread = b""
        """Bytes read from the socket before this connection took it over (fed first)."""
        self.on_counters_needed: Callable[[Connection], None] = lambda conn: None
        """A replica's session waits for its first reserved counter block (daemon/replicas.py)."""
        self.on_ticket: Callable[[Connection, bytes], None] = lambda conn, body: None
        """The peer granted a resumption ticket (daemon/tickets.py keeps it)."""
        self.counter_block: Callable[[], list[int] | None] = lambda: None
        """The counter block a replica's session holds now, for ``sessions`` (None: no HA)."""
        set_nodelay(stream)

    @property
    def result(self) -> HandshakeResult | None:
        return self.tunnel.result

    @property
    def peer(self) -> str:
        result = self.result
        return result.peer_name if result else (self.dialled or "?")

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
                    self._nursery = nursery
                    nursery.start_soon(self._guarded, self._writer, nursery.cancel_scope)
                    nursery.start_soon(self._guarded, self._ticker, nursery.cancel_scope)
                    if self.tunnel.state is core.SessionState.RESERVING:  # a session taken over
                        self.on_counters_needed(self)
                    await self._guarded(self._reader, nursery.cancel_scope)
        finally:
            await self._finish()

    async def _guarded(self, task: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
        """Turn every way a connection can fail into a one-line close reason; never crash the node."""
        try:
            await task()
        except ProtocolError as exc:  # the peer's fault
            self.close_reason = self.close_reason or str(exc)
            await self.drain(CLOSE_FLUSH_SECONDS)  # e.g. the ALERT telling the initiator why
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.close_reason = self.close_reason or f"connection lost ({os_reason(exc)})"
            self.fault = events.Fault.NETWORK
        except NoCounterError as exc:  # a replica that cannot reserve never guesses a counter
            self.close_reason = self.close_reason or f"no reserved counter to send with ({exc})"
            self.fault = events.Fault.LOCAL
        except LocalProtocolError as exc:  # ours: never blamed on the peer
            self.close_reason = f"internal error: {exc}"
            self.fault = events.Fault.LOCAL
            LOG.warning("internal error on connection with %s: %s", self.peer_label, exc, exc_info=True)
        except Exception as exc:  # a bug must cost one connection, not the daemon
            self.close_reason = f"internal error: {type(exc).__name__}: {exc}"
            self.fault = events.Fault.LOCAL
            LOG.warning("internal error on connection with %s", self.peer_label, exc_info=True)
        finally:
            scope.cancel()

    async def _reader(self) -> None:
        if self.tunnel.is_initiator:
            self.tunnel.start(monotonic_ms(), wall_ms())
            self.kick()
        if self.preread:
            self.apply(self.tunnel.receive_data(self.preread, monotonic_ms(), wall_ms()))
            self.preread = b""
        while True:
            await self._wait_for_budget()
            data = await self.stream.receive_some(self._chunk(RECEIVE_SIZE))
            self._spend(len(data))
            if not data:
                self.tunnel.receive_eof()
                if not self.close_reason:
                    self.close_reason = "peer closed the connection" if self.established.is_set() else \
                        "peer closed the connection during the handshake"
                return
            now_wall = wall_ms()
            happened = self.tunnel.receive_data(data, monotonic_ms(), now_wall)
            if happened:
                self.kick()  # the tunnel's own answers (key confirmation, RESP, PONG) before our bookkeeping
                for event in happened:
                    self._handle(event)
            self.received_wall = now_wall / 1000
            self.kick()
            if self.tunnel.closed:
                await self.drain(CLOSE_FLUSH_SECONDS)
                return

    async def _writer(self) -> None:
        """Writes whatever the direct path in ``kick`` could not: everything in queue order."""
        while True:
            buffers, self._backlog = self._backlog + self.tunnel.buffers_to_send(), []
            if not buffers:
                self._signal_progress()
                await self._kick.wait()
                self._kick = trio.Event()
                continue
            self._writing = True
            try:
                await send_buffers(self.stream.socket, buffers)
            finally:
                self._writing = False
            self._signal_progress()

    async def _ticker(self) -> None:
        while True:
            await trio.sleep(TICK_SECONDS)
            self.tunnel.tick(monotonic_ms())
            self.kick()

    # --- events ---------------------------------------------------------------------------------------

    def _handle(self, event: core.Event) -> None:
        if isinstance(event, core.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                self._deliver(stream, event.data)
        elif isinstance(event, core.CreditAvailable):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.credit_available()
        elif isinstance(event, core.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.end()
        elif isinstance(event, core.StreamOpenRequested):
            self._on_open_requested(event)
        elif isinstance(event, (core.StreamAccepted, core.StreamRefused)):
            self._opened(event)
        elif isinstance(event, core.StreamReset):
            self._on_reset(event)
        elif isinstance(event, core.StreamClosed):
            self._drop(event.stream_id)
        else:
            self._handle_session_event(event)

    def apply(self, happened: list[core.Event]) -> None:
        """Handle events a call on the tunnel returned outside the reader, then send."""
        for event in happened:
            self._handle(event)
        self.kick()

    def start_task(self, task: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run ``task`` as part of this connection: it ends when the connection ends."""
        if self._nursery is not None:
            self._nursery.start_soon(task, *args)

    async def start_service(self, task: Callable[..., Awaitable[Any]]) -> None:
        """Start a long-running ``task`` (``task_status``-style) owned by this connection."""
        assert self._nursery is not None
        await self._nursery.start(task)

    def abort(self, reason: str, fault: events.Fault = events.Fault.LOCAL) -> None:
        """End the connection without a CLOSE record (e.g. no counter may be used for one)."""
        self.close_reason = self.close_reason or reason
        self.fault = fault
        if self._cancel is not None:
            self._cancel.cancel()

    def _handle_session_event(self, event: core.Event) -> None:
        if isinstance(event, core.CountersNeeded):
            self.on_counters_needed(self)
        elif isinstance(event, core.Established):
            self.established_at = time.monotonic()
            self.handshake_wall = time.time()
            self.established.set()
            self.on_established(self)
        elif isinstance(event, core.PongReceived):
            waiter = self._pings.pop(event.ping_id, None)
            if waiter is not None:
                waiter.set()
        elif isinstance(event, core.Rekeyed) and self.result is not None:
            self.handshake_wall = time.time()
            self.emit(events.Rekeyed(self.peer, self.result.peer.fingerprint, self.result.session_id.hex(), event.epoch))
            self.on_rekeyed(self)
        elif isinstance(event, core.TicketGranted):
            self.on_ticket(self, bytes(event.body))
        elif isinstance(event, core.Resumed) and self.result is not None:
            self.emit(self.moved_event(event.replica, event.migrations))
        elif isinstance(event, core.PeerClosed):
            self.close_reason = f"peer closed the session: {event.reason}"
        elif isinstance(event, core.GoAwayReceived):
            LOG.info("%s accepts no new streams: %s", self.peer, event.reason or code_name(event.code))

    def _on_open_requested(self, event: core.StreamOpenRequested) -> None:
        stream = TunnelStream(self, event.stream_id, event.target)
        stream.inbound = True
        self.streams[event.stream_id] = stream
        if self.inbound is None or self._nursery is None:
            self.refuse(event.stream_id, core.ErrorCode.REFUSED, "this node serves no streams")
            return
        if self.buffers.crowded:  # readers are behind: no new stream may add a window to fill
            self.refuse(event.stream_id, core.ErrorCode.REFUSED, "receive buffers full: try again later")
            return
        self._nursery.start_soon(self._serve_guarded, self.inbound, stream)

    def _on_reset(self, event: core.StreamReset) -> None:
        waiter = self._opening.pop(event.stream_id, None)
        if waiter is not None:  # reset instead of answered: report the peer's reason now
            self._refusals[event.stream_id] = StreamRefusedError(event.code, event.reason)
            waiter.set()
        stream = self._drop(event.stream_id)
        if stream is not None:
            who = self.peer if event.by_peer else "us"
            stream.discard(StreamError(f"stream reset by {who}: {event.reason or code_name(event.code)}"))  # RST aborts both ways

    def _deliver(self, stream: TunnelStream, data: bytes) -> None:
        """Hand received bytes to their stream if the buffer budget has room; a stream whose
        bytes do not fit is reset (its sender filled windows faster than anything reads)."""
        refusal = self.buffers.charge(len(data))
        if refusal is not None:
            self.reset(stream.stream_id, core.ErrorCode.CANCELLED, refusal)
            stream.discard(StreamError(f"stream reset by us: {refusal}"))
            return
        self._charged[stream.stream_id] = self._charged.get(stream.stream_id, 0) + len(data)
        stream.deliver(data)

    def _refund(self, stream_id: int, n: int) -> None:
        """``n`` bytes of a stream were read: they no longer count against the budget."""
        charged = self._charged.get(stream_id)
        if charged is None:
            return
        n = min(n, charged)
        self.buffers.refund(n)
        if charged > n:
            self._charged[stream_id] = charged - n
        else:
            del self._charged[stream_id]

    def _drop(self, stream_id: int) -> TunnelStream | None:
        """Forget a stream that ended: what it still holds unread stops counting (it can
        receive nothing more, and its reader is released by the end or reset)."""
        self._refund(stream_id, self._charged.get(stream_id, 0))
        return self.streams.pop(stream_id, None)

    async def _serve_guarded(self, handler: InboundHandler, stream: TunnelStream) -> None:
        """A bug or a peer's surprise in one stream's handler must never end the session."""
        try:
            await handler(stream)
        except Exception as exc:
            LOG.warning("stream %d from %s failed: %s: %s", stream.stream_id, self.peer, type(exc).__name__, exc)
            await stream.aclose()

    def _opened(self, event: core.StreamAccepted | core.StreamRefused) -> None:
        if isinstance(event, core.StreamRefused):
            self._refusals[event.stream_id] = StreamRefusedError(event.code, event.reason)
        waiter = self._opening.pop(event.stream_id, None)
        if waiter is not None:
            waiter.set()

    # --- opening streams ------------------------------------------------------------------------------

    async def open(self, target: dict[str, Any], timeout: float = OPEN_TIMEOUT) -> TunnelStream:
        """Open a stream to ``target`` on the peer; raises StreamRefusedError or StreamError."""
        if self.finished.is_set() or self.tunnel.closed:
            raise StreamError(f"session with {self.peer} is closed")
        try:
            stream_id = self.tunnel.open_stream(target)
        except LocalProtocolError as exc:
            raise StreamError(str(exc)) from None
        self.kick()
        stream = TunnelStream(self, stream_id, target)
        self.streams[stream_id] = stream
        waiter = self._opening[stream_id] = trio.Event()
        with trio.move_on_after(timeout):
            await waiter.wait()
        if not waiter.is_set():
            self._opening.pop(stream_id, None)
            stream.reset(core.ErrorCode.TIMED_OUT, "open timed out")
            raise StreamError(f"{self.peer} did not answer the stream open within {timeout:.0f} s")
        refusal = self._refusals.pop(stream_id, None)
        if refusal is not None:
            self._drop(stream_id)
            raise refusal
        if stream.error is not None:
            raise stream.error
        return stream

    # --- StreamPort -----------------------------------------------------------------------------------

    def credit(self, stream_id: int) -> int:
        return self.tunnel.credit(stream_id)

    async def send_data(self, stream_id: int, data: memoryview) -> int:
        """Seal stream data once the socket queue is below high water (bounds memory) and a
        legacy session's byte budget allows it."""
        await self._wait_for_budget()
        while not self.tunnel.writable and not self.finished.is_set():
            await self._progress.wait()
        if self.finished.is_set() or self.tunnel.closed:
            raise ConnectionClosed(f"session with {self.peer_label} is closed")
        accepted = self.tunnel.send_data(stream_id, data[: self._chunk(len(data))])
        self._spend(accepted)
        self.kick()
        return accepted

    @property
    def groups(self) -> tuple[str, ...]:
        """The groups of the peer's CA certificate, as the handshake's admission found them."""
        return self.admission.groups if self.admission is not None else ()

    @property
    def peer_host(self) -> str | None:
        """The peer's IP address as the socket saw it (what ``from`` networks and triggers judge)."""
        return self.admission.address if self.admission is not None else None

    # --- the legacy byte budget ([policy.legacy] rate, burst) ------------------------------------------

    async def _wait_for_budget(self) -> None:
        """Sleep while a throttled session is in debt; the pure bucket says how long."""
        while self.throttle is not None:
            delay = self.throttle.delay_ms(monotonic_ms())
            if delay <= 0:
                return
            await trio.sleep(delay / 1000)

    def _spend(self, size: int) -> None:
        if self.throttle is not None and size:
            self.throttle.consume(size, monotonic_ms())

    def _chunk(self, size: int) -> int:
        """A throttled session moves at most one burst at a time, so it never overdraws by more."""
        return size if self.throttle is None else max(1, min(size, self.throttle.burst))

    def send_fin(self, stream_id: int) -> None:
        self.tunnel.send_fin(stream_id)
        self.kick()

    def consumed(self, stream_id: int, n: int) -> None:
        self._refund(stream_id, n)
        self.tunnel.consumed(stream_id, n)
        self.kick()

    def accept(self, stream_id: int) -> None:
        self.tunnel.accept_stream(stream_id)
        self.kick()

    def refuse(self, stream_id: int, code: int, reason: str) -> None:
        self._drop(stream_id)
        self.tunnel.refuse_stream(stream_id, code, reason)
        self.kick()

    def reset(self, stream_id: int, code: int, reason: str) -> None:
        self._drop(stream_id)
        self.tunnel.reset_stream(stream_id, code, reason)
        self.kick()

    # --- sending --------------------------------------------------------------------------------------

    def kick(self) -> None:
        """Send what is sealed now if the socket takes it, else wake the writer; never blocks.

        Writing straight from here saves a trip through the scheduler on every message,
        which is most of a new stream's latency. Order is kept: the direct path runs only
        while the writer holds nothing (it is idle and the backlog is empty).
        """
        if self._writing or self._backlog or self.finished.is_set():
            self._kick.set()
            return
        buffers = self.tunnel.buffers_to_send()
        if not buffers:
            return
        self._backlog = write_now(self.stream.socket.fileno(), buffers)
        if self._backlog:
            self._kick.set()
        else:
            self._signal_progress()

    def wake_writers(self) -> None:
        """Stream writers waiting for ``Tunnel.writable`` look again (e.g. counters arrived)."""
        self._signal_progress()

    def _signal_progress(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def drain(self, timeout: float) -> None:
        """Wait (shielded, bounded) until everything queued has been written."""
        self.kick()
        with trio.move_on_after(timeout) as scope:
            scope.shield = True
            while (self.tunnel.pending_bytes or self._writing or self._backlog) and not self.finished.is_set():
                await self._progress.wait()

    async def ping(self) -> float:
        """Round trip through the encrypted session, in milliseconds."""
        if self.finished.is_set() or self.tunnel.closed:  # closed: still flushing its CLOSE
            raise ConnectionClosed(f"session with {self.peer_label} is closed")
        started = time.perf_counter()
        ping_id = self.tunnel.ping(monotonic_ms())
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
        self.tunnel.close(reason)
        await self.drain(CLOSE_FLUSH_SECONDS)
        if self._cancel is not None:
            self._cancel.cancel()

    async def _finish(self) -> None:
        self._fail_streams(self.close_reason or "closed")
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

    def _fail_streams(self, reason: str) -> None:
        """The session is gone: fail every stream and pending open."""
        error = StreamError(f"session with {self.peer} ended: {reason}")
        for stream in list(self.streams.values()):
            stream.fail(error)
        for stream_id in list(self.streams):
            self._drop(stream_id)
        for stream_id, waiter in list(self._opening.items()):
            self._refusals[stream_id] = error  # not a refusal by the peer: the peer is gone
            waiter.set()
        self._opening.clear()

    # --- facts for the event stream -------------------------------------------------------------------

    def up_event(self, trust: str) -> events.SessionUp:
        result = self.result
        assert result is not None
        return events.SessionUp(
            peer=result.peer_name, fingerprint=result.peer.fingerprint, addr=self.remote,
            direction=self.direction, session_id=result.session_id.hex(), suite=result.suite.name,
            kem=result.suite.kem_label, signature=result.suite.signature_label, aead=result.aead.label, trust=trust,
            handshake_seconds=round(self.established_at - self.started_at, 6))

    def moved_event(self, replica: str, migrations: int) -> events.SessionMoved:
        result = self.result
        assert result is not None
        return events.SessionMoved(peer=result.peer_name, fingerprint=result.peer.fingerprint, addr=self.remote,
                                   direction=self.direction, session_id=result.session_id.hex(), replica=replica,
                                   migrations=migrations)

    def down_event(self) -> events.SessionDown:
        result = self.result
        assert result is not None
        session = self.tunnel.session
        return events.SessionDown(
            peer=result.peer_name, fingerprint=result.peer.fingerprint, addr=self.remote,
            session_id=result.session_id.hex(), reason=self.close_reason or "closed",
            bytes_in=session.bytes_received, bytes_out=session.bytes_sent,
            duration=round(time.monotonic() - self.established_at, 3), direction=self.direction,
            suite=result.suite.name, kem=result.suite.kem_label, signature=result.suite.signature_label,
            aead=result.aead.label)

    def _failure_reason(self) -> str:
        """Why the handshake failed; a suite mismatch also names the trigger that narrowed the suites."""
        reason = self.close_reason or "cancelled"
        return reason + self.handshake_note if "suite" in reason else reason

    def failed_event(self) -> events.HandshakeFailed:
        admission = self.admission
        decision = admission.decision if admission is not None else None
        refused = decision is not None and not decision.allowed
        return events.HandshakeFailed(peer=self.dialled or "unknown peer", addr=self.remote, direction=self.direction,
                                      reason=self._failure_reason(), fault=self.fault,
                                      fingerprint=admission.peer.fingerprint if admission and admission.peer else "",
                                      suite=(admission.suite or "") if admission is not None else "",
                                      rule=decision.rule if refused and decision is not None else "",
                                      handshake_seconds=round(time.monotonic() - self.started_at, 6))

    def info(self) -> dict[str, Any]:
        result = self.result
        assert result is not None
        session = self.tunnel.session
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
            "bytes_sent": session.bytes_sent,
            "bytes_received": session.bytes_received,
            "age_s": round(time.monotonic() - self.established_at, 3),
            "rekeys": session.epoch,
            "streams": len(self.streams),
            "latest_handshake": iso_time(self.handshake_wall),
            "last_received": iso_time(self.received_wall),
            "replica": session.replica or None,
            "resumed": session.migrations > 0 or session.with_ticket,
            "handshake": "ticket" if session.with_ticket else "full",
            "migrations": session.migrations,
            "block": self.counter_block(),
        }


def iso_time(seconds: float) -> str | None:
    """Wall-clock seconds as ISO 8601 UTC (``2026-12-01T10:15:02.123Z``), None if never."""
    if not seconds:
        return None
    stamp = datetime.fromtimestamp(seconds, timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"
