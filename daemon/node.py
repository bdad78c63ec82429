"""The daemon: listener, static-peer links, the session table and the control socket."""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable

import trio

from pqtunnel.errors import UntrustedPeerError, UserError
from pqtunnel.handshake import CookieJar, HandshakeConfig, InitiatorHandshake, ReplayCache, ResponderHandshake
from pqtunnel.identity import Identity, WireIdentity
from pqtunnel import events
from pqtunnel.peers import RACE_STAGGER_MS, Direction, HandshakeGate, SessionFacts, SessionTable
from pqtunnel.tunnel import Tunnel
from pqtunnel.trust import TrustStore

from .backends import liboqs_status, open_backend
from .config import Address, NodeConfig
from .decisions import build_policy
from .trustpolicy import admit_peer, load_ca_setup
from .connection import Connection, ConnectionClosed
from .control import serve_control
from .discovered import DiscoveryWiring
from .links import PeerAuthenticationError, PeerLink, PeerUnreachableError, UnknownPeerError
from .eventlog import EventBus, log_event
from .services import serve_stream
from .socks_server import open_socks_listener, serve_socks_client
from .netio import monotonic_ms, os_reason, remote_of
from .streams import TunnelStream

DIAL_TIMEOUT = 5.0


class Node:
    def __init__(self, config: NodeConfig, identity: Identity, trust: TrustStore) -> None:
        self.config = config
        self.identity = identity
        self.trust = trust
        self.backend = open_backend(config.crypto_backend)
        self.handshake_config = HandshakeConfig(allowed_suites=config.suites, aeads=config.aeads)
        self.ca, self.certificate = load_ca_setup(config, identity, self.backend)
        self.policy = build_policy(config, identity.name, trust, self.ca)
        self.replay_cache = ReplayCache(self.handshake_config.replay_window_ms)
        self.cookies = CookieJar()
        self.sessions: SessionTable[Connection] = SessionTable(identity.fingerprint)
        self.links = {name: PeerLink(name, *addresses) for name, addresses in config.peers.items()}
        self.handshake_gate = HandshakeGate()
        self.events = EventBus()
        self.events.subscribe(log_event)
        self.emit = self.events.emit
        self.started = time.monotonic()
        self.listen_address: Address | None = None
        self._nursery: trio.Nursery | None = None
        self.discovery = DiscoveryWiring(self)

    # --- top level -------------------------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self._watch_signals, nursery.cancel_scope)  # before anything can be asked to stop
            listeners = await self._open_listeners()
            nursery.start_soon(trio.serve_listeners, self._serve_inbound, listeners)
            if self.config.socks is not None:
                socks_listeners = await open_socks_listener(self.config.socks)
                nursery.start_soon(trio.serve_listeners, self._serve_socks, socks_listeners)
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

    async def _open_listeners(self) -> list[trio.SocketListener]:
        address = self.config.listen
        try:
            listeners = await trio.open_tcp_listeners(address.port, host=address.host)
        except OSError as exc:
            raise UserError(f"cannot listen on {address}: {exc.strerror or exc}") from None
        bound = listeners[0].socket.getsockname()
        self.listen_address = Address(address.host, bound[1])
        return listeners

    async def _watch_signals(self, scope: trio.CancelScope, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                self.emit(events.NodeStopping(signal.Signals(signum).name, len(self.sessions)))
                with trio.CancelScope(shield=True):
                    for conn in list(self.sessions.values()):
                        await conn.close("peer is shutting down")
                scope.cancel()
                return

    # --- trust ----------------------------------------------------------------------------------------

    def _authorizer(self, dialled: str | None):
        def authorize(peer: WireIdentity) -> str:
            return admit_peer(self.policy, peer, dialled, int(time.time()))
        return authorize

    def trust_source(self, name: str, fingerprint: str) -> str:
        return "pinned" if self.trust.fingerprint_for(name) == fingerprint else "ca"

    # --- inbound -------------------------------------------------------------------------------------

    async def _serve_inbound(self, stream: trio.SocketStream) -> None:
        remote = remote_of(stream)
        require_cookie = self.handshake_gate.begin()
        handshake = ResponderHandshake(
            self.identity, self._authorizer(None), peer_address=remote.rpartition(":")[0],
            config=self.handshake_config, backend=self.backend, replay_cache=self.replay_cache,
            cookies=self.cookies, require_cookie=require_cookie,
            certificate=self.certificate,
        )
        conn = Connection(stream, Tunnel(handshake, now_ms=monotonic_ms(), timers=self.config.timers), remote)
        try:
            await self._run_connection(conn)
        finally:
            if not conn.established.is_set():
                self.handshake_gate.end()

    async def _run_connection(self, conn: Connection, on_up: Callable[[Connection], None] | None = None) -> None:
        def established(c: Connection) -> None:
            if on_up is not None:
                on_up(c)
            if c.direction == "inbound":
                self.handshake_gate.end()
            self._register(c)

        conn.inbound = self._serve_stream
        conn.emit = self.emit
        conn.on_established = established
        conn.on_finished = self._unregister
        conn.on_rekeyed = self.readmit
        await conn.run()

    def readmit(self, conn: Connection) -> bool:
        """Ask the policy again whether a live session's peer is still trusted (at every rekey,
        and whenever trust material changes): a certificate revoked or expired since the
        handshake closes the session with that reason. Returns whether the peer passed."""
        result = conn.result
        if result is None:
            return True
        try:
            admit_peer(self.policy, result.peer, conn.dialled, int(time.time()))
        except UntrustedPeerError as exc:
            if self._nursery is not None:
                self._nursery.start_soon(conn.close, f"peer no longer trusted: {exc}")
            return False
        return True

    # --- session table --------------------------------------------------------------------------------

    def _register(self, conn: Connection) -> None:
        result = conn.result
        assert result is not None
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
            self.emit(conn.failed_event())
            return
        self.sessions.unregister(result.peer_name, conn)
        self.emit(conn.down_event())
        link = self.links.get(result.peer_name)
        if link is not None:
            link.notify()

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
            if await self._race(link):
                link.backoff.reset()
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
                nursery.start_soon(self._attempt, link, address, index * RACE_STAGGER_MS / 1000, race)
        if race.winner is None and not link.dropped:
            link.failed(race.reason or "no candidate answered", handshake=race.handshake_failed)
        return race.winner is not None

    async def _attempt(self, link: PeerLink, address: Address, delay: float, race: _Race) -> None:
        """One candidate of a race: connect, handshake, and if first, run the session."""
        with trio.CancelScope() as scope:
            race.pending.add(scope)
            link.attempts.add(scope)
            if link.dropped:
                scope.cancel()
            try:
                await trio.sleep(delay)
                conn = await self._dial(link, address, race)
                if conn is None:
                    return

                def won(c: Connection) -> None:
                    race.won(c, scope)
                    link.attempts.discard(scope)  # a live session is never cut by drop_link
                    link.connected(address)

                await self._run_connection(conn, won)
                if not conn.established.is_set():
                    race.lost(f"{address}: {conn.close_reason}" if len(link.candidates) > 1 else conn.close_reason,
                              handshake=True)
            finally:
                race.pending.discard(scope)
                link.attempts.discard(scope)

    async def _dial(self, link: PeerLink, address: Address, race: _Race) -> Connection | None:
        try:
            with trio.fail_after(DIAL_TIMEOUT):
                stream = await trio.open_tcp_stream(address.host, address.port)
        except (OSError, trio.TooSlowError) as exc:
            reason = "connect timed out" if isinstance(exc, trio.TooSlowError) else os_reason(exc)
            if link.last_error != reason:
                self.emit(events.PeerUnreachable(link.name, str(address), reason))
            race.lost(f"{address}: {reason}" if len(link.candidates) > 1 else reason, handshake=False)
            return None
        handshake = InitiatorHandshake(self.identity, self._authorizer(link.name), config=self.handshake_config,
                                       backend=self.backend, certificate=self.certificate)
        tunnel = Tunnel(handshake, now_ms=monotonic_ms(), timers=self.config.timers)
        return Connection(stream, tunnel, str(address), dialled=link.name)

    async def session_for(self, peer: str, timeout: float = 10.0) -> Connection:
        """The live session with ``peer``, waiting for a handshake if one is needed."""
        conn = self.sessions.get(peer)
        if conn is not None:
            return conn
        link = self.links.get(peer)
        if link is None:
            raise self.discovery.why_unknown(peer) if self.config.mdns else UnknownPeerError(
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
            "listen": str(self.listen_address),
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "sessions": len(self.sessions),
            "static_peers": len(self.links),
            "suites": [s.name for s in self.config.suites],
            "aeads": [a.label for a in self.config.aeads],
            "crypto_backend": self.backend.name,
            "ca": self.ca.ca.fingerprint if self.ca else None,
            "certificate": self._certificate_summary(),
            "liboqs": liboqs_status(),
        }

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
        return "pinned" if self.trust.fingerprint_for(name) else ("ca" if self.ca else "untrusted")

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
