"""The daemon: listener, static-peer links, the session table and the control socket."""

from __future__ import annotations

import math
import os
import signal
import time
from functools import partial
from typing import Any, Callable

import trio

from pqtunnel.errors import UntrustedPeerError, UserError
from pqtunnel.admission import HandshakeAdmission
from pqtunnel.errors import HandshakeBusyError, HandshakeError, ReplayError
from pqtunnel.handshake import (PROTOCOL_VERSION, Admit, CookieJar, HandshakeConfig, InitiatorHandshake, ReplayCache,
                                ResponderHandshake, alert_frame)
from pqtunnel.identity import Identity
from pqtunnel import events
from pqtunnel.audit import audit_required_rule
from pqtunnel.peers import RACE_STAGGER_MS, Direction, SessionFacts, SessionTable
from pqtunnel.bandwidth import ByteBucket
from pqtunnel.crypto.suites import Suite, suite_by_name
from pqtunnel.tickets import ResumeInitiator
from pqtunnel.wire import FrameDecoder, Kind
from pqtunnel.session import Session, SessionState
from pqtunnel.tunnel import Tunnel
from pqtunnel.trust import TrustStore

from .accept import serve_listeners
from .audit import AuditLog
from .backends import liboqs_status, open_backend
from .config import Address, NodeConfig, load_config
from .decisions import build_policy
from .trustpolicy import Admission, admit_peer, handshake_config_for, load_ca_setup
from .connection import Connection, ConnectionClosed
from .control import serve_control
from .discovered import DiscoveryWiring
from .logs import LOG
from .memory import release_after_session
from .metrics import NodeMetrics
from .sdnotify import keep_watchdog_fed, systemd_notifier
from .links import PeerAuthenticationError, PeerLink, PeerUnreachableError, UnknownPeerError
from .eventlog import EventBus, EventLogger
from .ha import HaWiring
from .firstframe import first_frame_bytes, first_frame_kind
from .tickets import TicketBook
from .replicas import FixedSuite, ReplicaSessions, stale_after_ms
from .services import serve_stream, service_summary
from .socks_server import exposure_warning, open_socks_listener, serve_socks_client
from .netio import monotonic_ms, os_reason, remote_of, write_now
from .pacing import PacedListener
from .migration import own_transition, pin_migrated, trust_label
from .pinwatch import KnownPeersWatch
from .resources import NodeResources, descriptor_limit
from .reloading import describe_policy, reload_node
from .streams import TunnelStream
from .version import package_version

DIAL_TIMEOUT = 5.0
RESUME_TIMEOUT = 2.0
"""Seconds a RESUME to one replica may take (connect included) before the next is tried."""


class Node:
    def __init__(self, config: NodeConfig, identity: Identity, trust: TrustStore) -> None:
        self.config = config
        self.identity = identity
        self.trust = trust
        self.backend = open_backend(config.crypto_backend)
        self.handshake_config = HandshakeConfig(allowed_suites=config.suites, aeads=config.aeads)
        self.ca, self.certificate = load_ca_setup(config, identity, self.backend)
        self.transition = own_transition(config.home, identity)  # presented like the certificate
        self.audit = AuditLog.for_node(config, identity.name, identity.fingerprint)
        self.policy_gate = audit_required_rule(self.audit.refusal)  # a reloaded Policy gets the same gate
        self.policy = build_policy(config, identity.name, trust, self.ca, gate=self.policy_gate)
        self.load_config: Callable[[], NodeConfig] = partial(load_config, config.home)
        """How ``reload`` reads the configuration again (``pqtunnel up`` passes its own flags)."""
        self.replay_cache = ReplayCache(self.handshake_config.replay_window_ms)
        self.cookies = CookieJar()
        self.sessions: SessionTable[Connection] = SessionTable(identity.fingerprint)
        self.links = {name: PeerLink(name, *addresses) for name, addresses in config.peers.items()}
        self.admission = HandshakeAdmission()
        self.resources = NodeResources(config.limits, descriptor_limit())
        self.liboqs = liboqs_status()  # once: probing forks ldconfig, and status must answer without spare descriptors
        self.events = EventBus()
        self.events.subscribe(EventLogger())
        self.events.subscribe(self.audit.record)
        self.metrics = NodeMetrics()
        self.events.subscribe(self.metrics.observe)
        self.events.subscribe(systemd_notifier)
        self.emit = self.events.emit
        self.ha = HaWiring(config, identity, self.emit)  # the nonce store replicas share (docs/ha.md)
        self.replicas = ReplicaSessions(self.ha, identity, self.emit)
        self.tickets = TicketBook(self.ha, identity, self.backend, self.emit)
        self.started = time.monotonic()
        self.listen_address: Address | None = None
        self._nursery: trio.Nursery | None = None
        self.discovery = DiscoveryWiring(self)
        self.pin_watch = KnownPeersWatch(config.home)

    # --- top level -------------------------------------------------------------------------------

    async def run(self) -> None:
        self.audit.open()  # before anything happens that the audit must record
        try:
            await self._serve()
        finally:
            self.audit.close()  # after the last session's and stream's events

    async def _serve(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.audit.run)
            await nursery.start(self._watch_signals, nursery.cancel_scope)  # before anything can be asked to stop
            await nursery.start(self.ha.run)
            await nursery.start(self.tickets.run)
            if self.replicas.enabled:
                nursery.start_soon(self.replicas.sweep, self._held_session_ids, stale_after_ms(self.config.timers))
            listeners = await self._open_listeners()
            self._serve_metrics()
            nursery.start_soon(keep_watchdog_fed)
            nursery.start_soon(partial(serve_listeners, self._serve_inbound, listeners, name="tunnel listener"))
            if self.config.socks is not None:
                warning = exposure_warning(self.config.socks, bool(self.config.socks_users),
                                           "*" in self.config.socks_allow_users)
                if warning is not None:
                    LOG.warning("%s", warning)
                socks_listeners = await open_socks_listener(self.config.socks)
                nursery.start_soon(partial(serve_listeners, self._serve_socks, socks_listeners, name="SOCKS listener"))
            await nursery.start(serve_control, self, self.config.control_socket)
            for link in list(self.links.values()):
                self.start_link(link)
            if self.config.mdns:
                await nursery.start(self.discovery.run)
            self.emit(events.NodeStarted(self.identity.name, self.identity.fingerprint, str(self.listen_address),
                                         str(self.config.socks or "off"), ",".join(s.name for s in self.config.suites)))

    async def _serve_socks(self, client: trio.SocketStream) -> None:
        await serve_socks_client(self, client)

    async def _serve_stream(self, stream: TunnelStream) -> None:
        await serve_stream(self, stream)

    async def open_stream(self, peer: str, target: dict[str, Any]) -> TunnelStream:
        """A stream to ``target`` on ``peer``, handshaking first if needed."""
        conn = await self.session_for(peer)
        return await conn.open(target)

    def _serve_metrics(self) -> None:
        address = self.config.metrics
        if address is None:
            return
        try:
            self.metrics.serve(address)
        except OSError as exc:
            raise UserError(f"cannot serve metrics on {address}: {exc.strerror or exc}") from None
        LOG.info("metrics on http://%s/metrics", address)

    async def _open_listeners(self) -> list[PacedListener]:
        """The tunnel port, taking new connections no faster than admission allows."""
        address = self.config.listen
        try:
            listeners = await trio.open_tcp_listeners(address.port, host=address.host)
        except OSError as exc:
            raise UserError(f"cannot listen on {address}: {exc.strerror or exc}") from None
        bound = listeners[0].socket.getsockname()
        self.listen_address = Address(address.host, bound[1])
        return [PacedListener(listener, lambda: self.admission.accept_delay_ms(monotonic_ms())) for listener in listeners]

    async def _watch_signals(self, scope: trio.CancelScope, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:  # reload, like sshd; a refused reload is logged and changes nothing
                    self._reload_on_signal()
                    continue
                await self.stop(signal.Signals(signum).name)
                return

    async def stop(self, reason: str) -> None:
        """Close every session with a CLOSE telling the peer why, then end ``run``: on SIGTERM
        or SIGINT, and when the control socket vanished (control.py)."""
        self.emit(events.NodeStopping(reason, len(self.sessions)))
        with trio.CancelScope(shield=True):
            for conn in list(self.sessions.values()):
                await conn.close("peer is shutting down")
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # --- trust ----------------------------------------------------------------------------------------

    def _peer_admission(self, dialled: str | None, host: str) -> tuple[Admission, HandshakeConfig, str]:
        """The authorize callback of one connection to or from ``host`` (an IP), and the suites it
        may use: a trigger covering ``host`` removes the weaker ones (the responder then RETRYs
        with a stronger suite; the initiator proposes one). The note names the trigger."""
        admission = Admission(lambda: self.policy, dialled=dialled, address=host)
        config, note = handshake_config_for(self.policy, self.handshake_config, host)
        return admission, config, note

    def trust_source(self, name: str, fingerprint: str) -> str:
        if self.trust.fingerprint_for(name) == fingerprint:
            return trust_label(self.config.home, name, fingerprint)  # pinned, or migrated:ssh
        return "ca"

    # --- inbound -------------------------------------------------------------------------------------

    async def _serve_inbound(self, stream: trio.SocketStream) -> None:
        remote = remote_of(stream)
        host = remote.rpartition(":")[0]
        if not self.admission.may_start(host, monotonic_ms()):
            await self._refuse_busy(stream, remote)
            return
        if not await self.resources.admit_inbound(stream, remote):
            return
        self.admission.begin()
        self.refresh_pins()
        conn: Connection | None = None
        try:
            conn = await self._inbound_connection(stream, remote, host)
            if conn is not None:
                await self._run_connection(conn)
        finally:
            if conn is None or not conn.established.is_set():
                self.admission.end()
                self.resources.handshake_ended(remote)

    async def _inbound_connection(self, stream: trio.SocketStream, remote: str, host: str) -> Connection | None:
        """The connection for a new inbound socket: a handshake, or on a replica whose first
        frame is a RESUME, a session taken over from another replica (None: refused)."""
        accepted_ms = monotonic_ms()  # the handshake timeout counts from here
        try:
            preread = await first_frame_bytes(stream, self.config.timers.handshake_timeout_ms / 1000)
        except (trio.BrokenResourceError, OSError):
            await trio.aclose_forcefully(stream)
            return None
        if first_frame_kind(preread) is Kind.RESUME_HELLO:
            return await self._ticket_connection(stream, remote, host, preread, accepted_ms)
        if self.replicas.enabled:
            if first_frame_kind(preread) is Kind.RECORD:
                return await self.replicas.take_over(
                    stream, remote, preread, admission=partial(self._resume_admission, host), backend=self.backend,
                    timers=self.config.timers, limits=self.resources.tunnel_limits)
            if await self.replicas.hello_replayed(preread, self.handshake_config.replay_window_ms):
                await self._refuse_replayed(stream, remote)
                return None
        authorize, config, note = self._peer_admission(None, host)
        handshake = ResponderHandshake(
            self.identity, authorize, peer_address=host,
            config=config, backend=self.backend, replay_cache=self.replay_cache,
            cookies=self.cookies, admit=self._admit(host), certificate=self.certificate, transition=self.transition,
        )
        authorize.handshake = handshake
        conn = Connection(stream, Tunnel(handshake, now_ms=accepted_ms, timers=self.config.timers,
                                         limits=self.resources.tunnel_limits, shared_keys=self.replicas.enabled),
                          remote)
        conn.admission, conn.handshake_note, conn.preread = authorize, note, preread
        return conn

    async def _ticket_connection(self, stream: trio.SocketStream, remote: str, host: str, preread: bytes,
                                 accepted_ms: int) -> Connection | None:
        """A session resumed with a ticket (RESUME_HELLO): the ticket is checked and its single
        use recorded before the answer; a refusal is an ALERT and one log line."""
        authorize, config, note = self._peer_admission(None, host)
        frame = FrameDecoder().feed(preread)[0]
        try:
            responder = await self.tickets.redeem(frame, authorize, config)
        except (HandshakeError, UntrustedPeerError) as exc:
            write_now(stream.socket.fileno(), [alert_frame(exc)])
            await trio.aclose_forcefully(stream)
            fault = events.Fault.LOCAL if "did not answer" in str(exc) else events.Fault.PEER
            self.emit(events.HandshakeFailed(peer="unknown peer", addr=remote, direction="inbound",
                                             reason=f"ticket refused: {exc}", fault=fault))
            return None
        tunnel = Tunnel(responder, now_ms=accepted_ms, timers=self.config.timers, limits=self.resources.tunnel_limits,
                        shared_keys=self.replicas.enabled)
        conn = Connection(stream, tunnel, remote)
        conn.admission, conn.handshake_note, conn.preread = authorize, note, preread
        return conn

    def _resume_admission(self, host: str, suite: Suite) -> Admission:
        """The policy's judgement of a peer resuming a session with ``suite``: the same rules
        as a handshake from ``host``, and the suite must still be one this node allows there."""
        authorize, config, _ = self._peer_admission(None, host)
        if suite not in config.allowed_suites:
            raise UntrustedPeerError(f"suite {suite.name} is no longer allowed for {host}")
        authorize.handshake = FixedSuite(suite)
        return authorize

    def _held_session_ids(self) -> set[bytes]:
        return {conn.result.session_id for conn in self.sessions.values() if conn.result is not None}

    def _admit(self, host: str) -> Admit:
        """The responder's admission hook for one connection, on the monotonic clock."""
        return lambda proven: self.admission.decide(host, proven=proven, now_ms=monotonic_ms())

    async def _refuse_replayed(self, stream: trio.SocketStream, remote: str) -> None:
        """A HELLO another replica of this node accepted already (the shared replay cache)."""
        replay = ReplayError("HELLO replayed: another replica of this node accepted it already")
        write_now(stream.socket.fileno(), [alert_frame(replay)])
        await trio.aclose_forcefully(stream)
        self.emit(events.HandshakeFailed(peer="unknown peer", addr=remote, direction="inbound",
                                         reason=str(replay), fault=events.Fault.PEER))

    async def _refuse_busy(self, stream: trio.SocketStream, remote: str) -> None:
        """A source (or the node) out of handshake budget: ALERT busy and close, before reading
        a byte. The ALERT fits any send buffer, so it is written without waiting."""
        busy = HandshakeBusyError("too many handshakes from this address; try again later")
        write_now(stream.socket.fileno(), [alert_frame(busy)])
        await trio.aclose_forcefully(stream)
        self.emit(events.HandshakeFailed(peer="unknown peer", addr=remote, direction="inbound",
                                         reason=f"refused before reading: {busy}", fault=events.Fault.PEER))

    async def _run_connection(self, conn: Connection, on_up: Callable[[Connection], None] | None = None) -> None:
        def established(c: Connection) -> None:
            if on_up is not None:
                on_up(c)
            if c.direction == "inbound":
                self.admission.end()
                self.resources.handshake_ended(c.remote)
            self._apply_rate_limit(c)
            self._register(c)
            if c.direction == "inbound" and c.tunnel.session.handshake is not None:
                c.start_task(self.tickets.issue, c)  # after a full or a ticket handshake

        conn.inbound = self._serve_stream
        conn.buffers = self.resources.buffers.session()
        conn.emit = self.emit
        conn.on_established = established
        conn.on_finished = self._unregister
        conn.on_rekeyed = self._rekeyed
        conn.on_counters_needed = self.replicas.counters_needed
        conn.on_ticket = lambda c, body: c.start_task(self.tickets.granted, c, body)
        await conn.run()

    def _rekeyed(self, conn: Connection) -> None:
        """A rekey: the policy judges the session again; a shared session stores its new keys."""
        if self.readmit(conn) and conn.tunnel.session.shared_keys:
            conn.start_task(self.replicas.persist, conn)

    def readmit(self, conn: Connection, why: str = "peer no longer trusted") -> bool:
        """Ask the policy again whether a live session's peer is still trusted (at every rekey,
        and whenever trust material or the policy changes), with the facts of the handshake
        (address, suite): a certificate revoked or expired since the handshake, or a trigger
        the session's suite no longer satisfies, closes the session with that reason.
        Returns whether the peer passed; its groups and legacy rate limit are updated."""
        result = conn.result
        if result is None:
            return True
        record = conn.admission.readmitted if conn.admission is not None else None
        try:
            name = admit_peer(self.policy, result.peer, conn.dialled, int(time.time()), address=conn.peer_host,
                              suite=result.suite.name, record=record)
            if name != result.peer_name:
                raise UntrustedPeerError(f"the policy now names {result.peer.fingerprint} {name}, not {result.peer_name}")
        except UntrustedPeerError as exc:
            if self._nursery is not None:
                self._nursery.start_soon(conn.close, f"{why}: {exc}")
            return False
        self._apply_rate_limit(conn)
        return True

    def _apply_rate_limit(self, conn: Connection) -> None:
        """A legacy session gets its byte budget ([policy.legacy] rate, burst); others run free."""
        limit = conn.admission.rate_limit if conn.admission is not None else None
        if limit is None:
            conn.throttle = None
        elif conn.throttle is None:
            conn.throttle = ByteBucket(limit.rate, limit.burst, monotonic_ms())
        else:
            conn.throttle.reconfigure(limit.rate, limit.burst, monotonic_ms())

    # --- reload ([policy], pins, CA material, services) ---------------------------------------------------

    async def reload(self) -> dict[str, Any]:
        """``pqtunnel reload``: see daemon/reloading.py (ReloadRefusedError keeps the old state)."""
        return reload_node(self)

    def _reload_on_signal(self) -> None:
        try:
            reload_node(self)
        except UserError:
            pass  # already logged as a refused ConfigReloaded event; the old state stays

    def live_connections(self) -> list[Connection]:
        return list(self.sessions.values())

    def pin(self, name: str, fingerprint: str) -> bool:
        """``pqtunnel trust`` on a running node: the pin counts for the next handshake at once."""
        added = self.trust.pin(name, fingerprint)
        if added:
            self.discovery.resync()  # a name advertised before it was pinned is dialled now
        return added

    def refresh_pins(self) -> None:
        """Before a handshake: pins appended to known_peers since we last looked count now."""
        if self.pin_watch.new_pins(self.trust):
            self.discovery.resync()

    # --- session table --------------------------------------------------------------------------------

    def _register(self, conn: Connection) -> None:
        result = conn.result
        assert result is not None
        decision = conn.admission.decision if conn.admission is not None else None
        pin_migrated(self.config.home, self.trust, decision, result.peer_name, result.peer.fingerprint, self.emit)
        self.emit(conn.up_event(self.trust_source(result.peer_name, result.peer.fingerprint)))
        facts = SessionFacts(Direction(conn.direction), result.peer.fingerprint, int(conn.established_at * 1000))
        loser = self.sessions.register(result.peer_name, conn, facts)
        if loser is not None and self._nursery is not None:
            self._nursery.start_soon(loser.close, "duplicate session replaced")
        if loser is conn:
            return
        link = self.links.get(result.peer_name)
        if link is not None:
            link.connected()
            link.notify()

    def _unregister(self, conn: Connection) -> None:
        result = conn.result
        if result is None:
            self.emit(self._ticket_refused(conn) if conn.dialled and conn.tunnel.session.with_ticket
                      else conn.failed_event())
            return
        self.sessions.unregister(result.peer_name, conn)
        self.emit(conn.down_event())
        if self._nursery is not None:
            self._nursery.start_soon(release_after_session)  # a peer's filled windows do not stay in RSS
            session = conn.tunnel.session
            if session.shared_keys and session.closed:  # ended by CLOSE: no replica continues it
                self._nursery.start_soon(self.replicas.forget, result.session_id, session.migrations)
        link = self.links.get(result.peer_name)
        if link is not None:
            link.notify()

    @staticmethod
    def _ticket_refused(conn: Connection) -> events.TicketRefused:
        """A dial with a ticket that gave no session: ``_attempt`` dials again at once without."""
        return events.TicketRefused(peer=conn.dialled or "?", addr=conn.remote, reason=conn.close_reason or "closed")

    # --- outbound ------------------------------------------------------------------------------------

    def start_link(self, link: PeerLink) -> None:
        """Own ``link``'s redial loop in the node's nursery until the link is dropped."""
        assert self._nursery is not None
        self.links[link.name] = link
        self._nursery.start_soon(self._run_link, link)

    async def _run_link(self, link: PeerLink) -> None:
        await self._keep_link(link)

    def drop_link(self, link: PeerLink) -> None:
        """Stop dialling (e.g. the peer left mDNS). A live session is *not* cut: only its
        keepalive decides when it is dead, never an (unauthenticated) mDNS goodbye."""
        link.dropped = True
        link.scope.cancel()
        for attempt in list(link.attempts):
            attempt.cancel()
        if self.links.get(link.name) is link:
            del self.links[link.name]

    async def _keep_link(self, link: PeerLink) -> None:
        """Dial, run the session, and redial with exponential backoff when it ends."""
        while not link.dropped:
            with link.new_scope():  # only waiting can be cancelled by drop_link (attempts have their own)
                while link.name in self.sessions:  # e.g. the peer dialled us: one session per peer
                    await link.changed.wait()
            if link.dropped:
                return
            resumable, link.resumable = link.resumable, None
            if resumable is not None and await self._resume(link, resumable):
                link.backoff.reset()
                continue
            if await self._race(link):
                link.backoff.reset()
                if link.resumable is not None:
                    continue  # the connection was lost, not the session: resume it at once
            with link.new_scope():
                with trio.move_on_after(link.backoff.next_delay() / 1000):
                    await link.wake.wait()
            link.wake = trio.Event()

    async def _race(self, link: PeerLink) -> bool:
        """Dial every candidate, staggered; the first session to come up wins, the rest are
        cancelled, and the winner runs here until it ends. Returns whether one came up.

        A candidate that accepts and never answers (an mDNS tarpit) therefore delays nobody:
        the address that last worked starts first, and each further one only RACE_STAGGER_MS later.
        """
        race = _Race()
        async with trio.open_nursery() as nursery:
            for index, address in enumerate(link.race_order()):
                nursery.start_soon(partial(self._attempt, link, address, index * RACE_STAGGER_MS / 1000, race,
                                           with_ticket=index == 0))
        if race.winner is None and not link.dropped:
            link.failed(race.reason or "no candidate answered", handshake=race.handshake_failed)
        return race.winner is not None

    async def _resume(self, link: PeerLink, old: Session) -> bool:
        """Continue ``old`` on another replica of the peer: a RESUME to each address in turn,
        the one whose connection was lost last, each bounded by RESUME_TIMEOUT. The session
        then runs here until it ends. False: no replica continued it (a handshake follows)."""
        lost = link.last_good
        order = [a for a in link.race_order() if a != lost] + ([lost] if lost in link.candidates else [])
        for address in order:
            race = _Race()
            await self._attempt(link, address, 0, race, resume_from=old, within=RESUME_TIMEOUT)
            if race.winner is not None or link.dropped:
                return race.winner is not None
        return False

    def _resumable(self, conn: Connection) -> Session | None:
        """The session of an ended outbound connection, if only its connection was lost
        (neither side closed it) and the peer said it is a replica (REPLICA), so another
        replica of the peer may continue it."""
        session = conn.tunnel.session
        resumable = session.state is SessionState.ESTABLISHED and session.is_initiator and bool(session.replica)
        return session if resumable else None

    async def _attempt(self, link: PeerLink, address: Address, delay: float, race: _Race, *,
                       resume_from: Session | None = None, within: float = math.inf, with_ticket: bool = False) -> None:
        """One candidate of a race: connect, handshake (with a ticket if one is held, and if it
        is refused, at once again without), or resume; if first, run the session."""
        with trio.CancelScope(deadline=trio.current_time() + delay + within) as scope:
            race.pending.add(scope)
            link.attempts.add(scope)
            if link.dropped:
                scope.cancel()
            try:
                await trio.sleep(delay)

                def won(c: Connection) -> None:
                    race.won(c, scope)
                    scope.deadline = math.inf
                    link.attempts.discard(scope)  # a live session is never cut by drop_link
                    link.connected(address)

                while True:
                    conn = await self._dial(link, address, race, resume_from, with_ticket=with_ticket)
                    if conn is None:
                        return
                    await self._run_connection(conn, won)
                    if race.winner is conn:
                        link.resumable = self._resumable(conn)
                    if not conn.established.is_set() and conn.tunnel.session.with_ticket:
                        with_ticket = False  # that ticket would not do: a full handshake now
                        continue
                    if not conn.established.is_set():
                        race.lost(f"{address}: {conn.close_reason}" if len(link.candidates) > 1
                                  else conn.close_reason, handshake=True)
                    return
            finally:
                race.pending.discard(scope)
                link.attempts.discard(scope)

    async def _dial(self, link: PeerLink, address: Address, race: _Race,
                    resume_from: Session | None = None, *, with_ticket: bool = False) -> Connection | None:
        try:
            with trio.fail_after(DIAL_TIMEOUT):
                stream = await trio.open_tcp_stream(address.host, address.port)
        except (OSError, trio.TooSlowError) as exc:
            reason = "connect timed out" if isinstance(exc, trio.TooSlowError) else os_reason(exc)
            if link.last_error != reason:
                self.emit(events.PeerUnreachable(link.name, str(address), reason))
            race.lost(f"{address}: {reason}" if len(link.candidates) > 1 else reason, handshake=False)
            return None
        self.refresh_pins()
        authorize, config, note = self._peer_admission(link.name, remote_of(stream).rpartition(":")[0])
        if resume_from is not None:
            return await self._resuming_connection(link, address, stream, authorize, resume_from, race)
        ticket = self.tickets.take(link.name) if with_ticket else None
        handshake: InitiatorHandshake | ResumeInitiator
        if ticket is not None:
            handshake = ResumeInitiator(self.identity, ticket, authorize, config=config, backend=self.backend)
            authorize.handshake = FixedSuite(suite_by_name(ticket.suite))
        else:
            handshake = InitiatorHandshake(self.identity, authorize, config=config,
                                           backend=self.backend, certificate=self.certificate,
                                           transition=self.transition)
            authorize.handshake = handshake
        tunnel = Tunnel(handshake, now_ms=monotonic_ms(), timers=self.config.timers)
        conn = Connection(stream, tunnel, str(address), dialled=link.name)
        conn.admission, conn.handshake_note = authorize, note
        return conn

    async def _resuming_connection(self, link: PeerLink, address: Address, stream: trio.SocketStream,
                             authorize: Admission, old: Session, race: _Race) -> Connection | None:
        """A connection that sends RESUME for ``old``; the policy judges the peer again first."""
        result = old.result
        assert result is not None
        authorize.handshake = FixedSuite(result.suite)
        try:
            authorize(result.peer)
        except UntrustedPeerError as exc:
            race.lost(f"{address}: {exc}", handshake=True)
            await trio.aclose_forcefully(stream)
            return None
        tunnel = Tunnel.around(Session.resuming(old, monotonic_ms()), now_ms=monotonic_ms())
        conn = Connection(stream, tunnel, str(address), dialled=link.name)
        conn.admission = authorize
        return conn

    async def session_for(self, peer: str, timeout: float = 10.0) -> Connection:
        """The live session with ``peer``, waiting for a handshake if one is needed."""
        conn = self.sessions.get(peer)
        if conn is not None:
            return conn
        self.refresh_pins()  # e.g. a pin written to known_peers for an advertised name
        link = self.links.get(peer)
        if link is None and self.config.mdns:
            link = await self.discovery.find(peer)  # an expected name: query mDNS, wait (bounded)
            conn = self.sessions.get(peer)
            if conn is not None:
                return conn
        if link is None:
            raise UnknownPeerError(
                f"unknown peer {peer!r}: no session and no address (use --peer {peer}=HOST:PORT or mDNS)")
        failures_before = link.failures
        link.wake.set()
        with trio.move_on_after(timeout):
            while peer not in self.sessions:
                await link.changed.wait()
                if peer not in self.sessions and link.failures > failures_before:
                    break  # an attempt failed: report its reason now, not after the timeout
        conn = self.sessions.get(peer)
        if conn is None:
            where = peer if len(link.candidates) > 1 else f"{peer} at {link.address}"  # else the reason names it
            if link.last_error and link.handshake_failed:
                raise PeerAuthenticationError(f"{where}: {link.last_error}")
            raise PeerUnreachableError(f"{where}: {link.last_error or f'no session within {timeout:.0f} s'}")
        return conn

    # --- reporting -----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "name": self.identity.name,
            "fingerprint": self.identity.fingerprint,
            "version": package_version(),
            "protocol": PROTOCOL_VERSION,
            "listen": str(self.listen_address),
            "socks": str(self.config.socks) if self.config.socks is not None else None,
            "mdns": self.discovery.status() if self.config.mdns else {"state": "off"},
            "services": service_summary(self.config.services),
            "allowed_ports": sorted(self.config.allowed_ports),
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "sessions": len(self.sessions),
            "static_peers": len(self.links),
            "suites": [s.name for s in self.config.suites],
            "aeads": [a.label for a in self.config.aeads],
            "crypto_backend": self.backend.name,
            "policy": describe_policy(self.config.policy),
            "ca": self.ca.ca.fingerprint if self.ca else None,
            "certificate": self._certificate_summary(),
            "liboqs": self.liboqs,
            "handshakes": self._admission_summary(),
            "ha": self.ha.status(),
            "tickets": self.tickets.status(),
        }

    def _admission_summary(self) -> dict[str, Any]:
        """How inbound handshakes were rationed since start (pqtunnel/admission.py)."""
        stats = self.admission.stats
        return {"admitted": stats.admitted, "retried_for_cookie": stats.cookies, "busy": stats.busy,
                "refused_at_accept": stats.refused_at_accept, "pending": self.admission.gate.pending,
                "budget": round(self.admission.budget(monotonic_ms()), 1)}

    def _certificate_summary(self) -> dict[str, Any] | None:
        if self.certificate is None:
            return None
        from pqtunnel.ca import decode_certificate

        return decode_certificate(self.certificate).describe()

    def sessions_info(self) -> list[dict[str, Any]]:
        rows = []
        for name, conn in self.sessions.items():
            info = conn.info()
            info["trust"] = self.trust_source(name, info["fingerprint"])
            rows.append(info)
        return rows

    def peers_info(self) -> list[dict[str, Any]]:
        """Configured, pinned and connected peers, plus every mDNS advertisement seen."""
        discovered = self.discovery.rows()
        covered = {(row["name"], row["fingerprint"]) for row in discovered}
        names = sorted(set(self.links) | {p.name for p in self.trust.peers()} | self.sessions.names())
        rows = []
        for name in names:
            link = self.links.get(name)
            conn = self.sessions.get(name)
            fingerprint = conn.result.peer.fingerprint if conn and conn.result else self.trust.fingerprint_for(name)
            if (link is None or link.source == "mdns") and (name, fingerprint) in covered:
                continue
            rows.append({
                "name": name,
                "fingerprint": fingerprint,
                "addresses": [str(a) for a in link.candidates] if link else ([conn.remote] if conn else []),
                "trust": self._trust_label(name, conn),
                "source": link.source if link else ("inbound" if conn else "pinned"),
                "session": "up" if conn else "down",
                "last_seen": None,
                "last_error": link.last_error if link else "",
            })
        return sorted(rows + discovered, key=lambda row: (row["name"], row["trust"]))

    def _trust_label(self, name: str, conn: Connection | None) -> str:
        if conn is not None and conn.result is not None:
            return self.trust_source(name, conn.result.peer.fingerprint)
        pinned = self.trust.fingerprint_for(name)
        return trust_label(self.config.home, name, pinned) if pinned else ("ca" if self.ca else "untrusted")

    async def ping(self, peer: str, timeout: float) -> dict[str, Any]:
        with trio.move_on_after(timeout) as scope:
            conn = await self.session_for(peer, timeout)
            try:
                rtt = await conn.ping()
            except ConnectionClosed as exc:
                raise PeerUnreachableError(str(exc)) from None
        if scope.cancelled_caught:
            raise PeerUnreachableError(f"no answer from {peer} within {timeout:.0f} s")
        info = conn.info()
        return {"peer": peer, "rtt_ms": round(rtt, 3), "fingerprint": info["fingerprint"], "kem": info["kem"],
                "signature": info["signature"], "aead": info["aead"]}


class _Race:
    """The shared state of one dial race: who won, and why the losers lost."""

    def __init__(self) -> None:
        self.winner: Connection | None = None
        self.pending: set[trio.CancelScope] = set()
        self.reason = ""
        self.handshake_failed = False

    def won(self, conn: Connection, own: trio.CancelScope) -> None:
        if self.winner is not None:
            return  # a second candidate came up in the same instant: the session table keeps one
        self.winner = conn
        for scope in self.pending:
            if scope is not own:
                scope.cancel()

    def lost(self, reason: str, *, handshake: bool) -> None:
        if self.winner is None and (handshake or not self.handshake_failed):
            self.reason, self.handshake_failed = reason, handshake  # an authentication failure says more
