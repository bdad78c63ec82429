"""Resumption tickets in the daemon (docs/ha.md, docs/PROTOCOL.md 4.10).

Every session this node answers with a full handshake (or a ticket) grants the peer a
ticket: the ticket's state is kept where whoever may redeem it can read it, and the grant
travels in a TICKET record. Replicas (``[ha]``) share their states through their store (the
local SQLite file by default, or etcd), wrapped. A node without ``[ha]`` keeps them in its
own memory (``GrantedInMemory``): nothing but this process can redeem them, a restart forgets
them (each peer then does one full handshake), and no ticket secret is written to disk. A peer
that dials again sends RESUME_HELLO with the ticket instead of a full handshake: one round
trip, fresh X25519, the ticket secret (from a hybrid handshake) as PSK. A ticket is used at
most once across all replicas (``use_once`` in the shared store, recorded after its MAC
checks and before the answer); its state is then deleted.

On the dialling side the tickets a peer granted are kept, wrapped, in this node's own store,
so they survive a restart; a ticket is forgotten as soon as it is sent.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import trio

from pqtunnel import events
from pqtunnel.crypto.suites import suite_by_name
from pqtunnel.errors import ProtocolError, StoreDataError, StoreUnavailableError, TicketError
from pqtunnel.handover import StateWrapper
from pqtunnel.handshake import HandshakeConfig
from pqtunnel.identity import Identity
from pqtunnel.tickets import (
    TICKET_USE_KIND,
    ClientTicket,
    ResumeResponder,
    accept_ticket_grant,
    client_ticket_state_id,
    issue_ticket,
    parse_resume_hello,
    ticket_state_id,
    ticket_use_id,
    unwrap_client_ticket,
    unwrap_ticket,
    wrap_client_ticket,
    wrap_ticket,
)
from pqtunnel.wire import Frame

from .connection import Connection
from .ha import HaWiring
from .logs import LOG
from .netio import monotonic_ms, wall_ms
from .replicas import FixedSuite
from .trustpolicy import Admission

CLIENT_PREFIX = "client-ticket."
TICKET_PREFIX = "ticket."
SWEEP_INTERVAL = 600.0
"""Seconds between sweeps for ticket states that expired unused."""
MAX_TICKETS_PER_PEER = 2
"""Tickets kept per peer on the dialling side: the newest ones; older ones are deleted."""


class GrantedInMemory:
    """The states of the tickets a node without ``[ha]`` granted, and their single-use marks:
    the part of the nonce-store interface ``TicketBook`` uses, in this process only.

    A store write per granted ticket (a worker-thread SQLite commit with its fsync) was a
    fifth of a handshake's CPU on the answering node, and made a resumption wait for two
    store round trips; only replicas need states another process can read.
    """

    kind = "memory"
    PURGE_EVERY = 256
    MAX_STATES = 20_000
    """About 6 MiB of states, and as many use marks. Past it the oldest grant (or use) is
    forgotten: a trusted peer dialling or resuming in a loop must not grow the daemon without
    bound. A forgotten ticket only costs its holder one full handshake; a forgotten use mark
    reopens nothing, since a redeemed ticket's state is deleted at once (``TicketBook.redeem``)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._states: dict[str, bytes] = {}
        self._used: dict[tuple[str, str], float] = {}
        self._clock = clock
        self._uses = 0

    async def put_state(self, state_id: str, blob: bytes) -> None:
        self._states.pop(state_id, None)
        while len(self._states) >= self.MAX_STATES:
            del self._states[next(iter(self._states))]  # insertion order: the oldest grant
        self._states[state_id] = bytes(blob)

    async def get_state(self, state_id: str) -> bytes | None:
        return self._states.get(state_id)

    async def delete_state(self, state_id: str) -> None:
        self._states.pop(state_id, None)

    async def list_states(self, prefix: str) -> list[str]:
        return [state_id for state_id in self._states if state_id.startswith(prefix)]

    async def use_once(self, kind: str, record_id: str, ttl_s: float) -> bool:
        """True the first time ``(kind, record_id)`` is used within ``ttl_s``, False after."""
        now = self._clock()
        self._uses += 1
        if self._uses % self.PURGE_EVERY == 0:
            self._used = {key: expires for key, expires in self._used.items() if expires > now}
        expires = self._used.pop((kind, record_id), None)
        if expires is not None and expires > now:
            self._used[(kind, record_id)] = expires
            return False
        while len(self._used) >= self.MAX_STATES:
            del self._used[next(iter(self._used))]  # insertion order: the oldest use
        self._used[(kind, record_id)] = now + ttl_s
        return True

    def __len__(self) -> int:
        return len(self._states)


class TicketBook:
    """Issues tickets (answering side), redeems them, and keeps the ones peers granted us."""

    def __init__(self, ha: HaWiring, identity: Identity, backend: Any, emit: Callable[[events.Event], None]) -> None:
        self.ha = ha
        self.identity = identity
        self.backend = backend
        self.emit = emit
        self.wrapper = StateWrapper.for_identity(identity)
        self.granted_states: Any = ha.store if ha.settings.enabled else GrantedInMemory()
        """Where the states of the tickets we grant live (``[ha]``: shared by the replicas)."""
        self._held: dict[str, list[ClientTicket]] = {}
        self._forget: trio.MemorySendChannel[str]
        self._forget, self._to_forget = trio.open_memory_channel[str](1024)

    @property
    def store(self) -> Any:
        """Our own store: the tickets peers granted us, kept across restarts."""
        return self.ha.store

    def _store_of(self, store_id: str) -> Any:
        return self.granted_states if store_id.startswith(TICKET_PREFIX) else self.store

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Load the tickets kept across a restart, then delete used ones in the background."""
        try:
            await self._load()
        except (StoreUnavailableError, StoreDataError) as exc:
            LOG.warning("resumption tickets not loaded from the %s store: %s", self.store.kind, exc)
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sweep_expired)
            async for store_id in self._to_forget:
                try:
                    await self._store_of(store_id).delete_state(store_id)
                except (StoreUnavailableError, StoreDataError) as exc:
                    LOG.info("used ticket %s not deleted from the store: %s", store_id, exc)

    async def _sweep_expired(self) -> None:
        """Every SWEEP_INTERVAL: delete the states of tickets granted but never used in time."""
        while True:
            await trio.sleep(SWEEP_INTERVAL)
            try:
                await self.sweep_once()
            except (StoreUnavailableError, StoreDataError) as exc:
                LOG.info("expired tickets not swept this time: %s", exc)

    async def sweep_once(self) -> int:
        """Queue the deletion of every expired ticket state of ours; returns how many."""
        now, expired = wall_ms(), 0
        for store_id in await self.granted_states.list_states(TICKET_PREFIX):
            blob = await self.granted_states.get_state(store_id)
            try:
                state = unwrap_ticket(self.wrapper, bytes.fromhex(store_id[len(TICKET_PREFIX):]), blob or b"")
            except (StoreDataError, ValueError):
                continue  # not ours to judge: never trusted, never deleted by us
            if state.is_expired(now):
                self._forget_soon(store_id)
                expired += 1
        return expired

    async def _load(self) -> None:
        now = wall_ms()
        for store_id in await self.store.list_states(CLIENT_PREFIX):
            blob = await self.store.get_state(store_id)
            if blob is None:
                continue
            try:
                ticket = unwrap_client_ticket(self.wrapper, store_id, blob)
            except StoreDataError as exc:
                self.emit(events.StoreDataRefused(self.store.kind, store_id, str(exc)))
                continue
            if ticket.is_expired(now):
                self._forget.send_nowait(store_id)
            else:
                self._held.setdefault(ticket.peer_name, []).append(ticket)
        for tickets in self._held.values():
            tickets.sort(key=lambda t: t.issued_ms)

    # --- the dialling side -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The ``tickets`` field of ``pqtunnel status --json``: tickets held per peer."""
        return {"held": {peer: len(tickets) for peer, tickets in sorted(self._held.items()) if tickets}}

    def take(self, peer: str) -> ClientTicket | None:
        """The newest unexpired ticket for ``peer``, forgotten from now on (used at most once)."""
        tickets = self._held.get(peer, [])
        now = wall_ms()
        while tickets:
            ticket = tickets.pop()
            self._forget_soon(client_ticket_state_id(ticket.peer_fingerprint, ticket.ticket_id))
            if not ticket.is_expired(now):
                return ticket
        return None

    async def granted(self, conn: Connection, body: bytes) -> None:
        """A TICKET record arrived: keep the ticket (wrapped, in our store) for the next dial."""
        assert conn.result is not None
        try:
            ticket = accept_ticket_grant(conn.result, body, wall_ms())
            await self.store.put_state(client_ticket_state_id(ticket.peer_fingerprint, ticket.ticket_id),
                                       wrap_client_ticket(self.wrapper, ticket))
        except ProtocolError as exc:
            LOG.warning("%s granted a malformed ticket: %s", conn.peer_label, exc)
            return
        except (StoreUnavailableError, StoreDataError) as exc:
            LOG.info("ticket from %s not kept: %s", conn.peer_label, exc)
            return
        tickets = self._held.setdefault(ticket.peer_name, [])
        tickets.append(ticket)
        while len(tickets) > MAX_TICKETS_PER_PEER:
            old = tickets.pop(0)
            self._forget_soon(client_ticket_state_id(old.peer_fingerprint, old.ticket_id))

    def _forget_soon(self, store_id: str) -> None:
        try:
            self._forget.send_nowait(store_id)
        except trio.WouldBlock:
            LOG.info("used ticket %s left in the store: too many deletions queued", store_id)

    # --- the answering side ----------------------------------------------------------------------

    async def issue(self, conn: Connection) -> None:
        """Grant the peer of an inbound session a ticket (its state stored first)."""
        result = conn.result
        if result is None or not result.resumption_secret or conn.tunnel.closed:
            return
        state, grant = issue_ticket(result, wall_ms())
        try:
            await self.granted_states.put_state(ticket_state_id(state.ticket_id), wrap_ticket(self.wrapper, state))
        except (StoreUnavailableError, StoreDataError) as exc:
            LOG.info("no ticket for %s: %s", conn.peer_label, exc)
            return
        if not conn.tunnel.closed:
            conn.tunnel.send_ticket(grant, monotonic_ms())
            conn.kick()

    async def redeem(self, frame: Frame, authorize: Admission, config: HandshakeConfig) -> ResumeResponder:
        """The responder for a RESUME_HELLO whose ticket is ours, unused, valid and whose MAC
        checks; its single use is recorded in the store before it answers. HandshakeError
        subclasses otherwise (the caller sends the ALERT)."""
        hello = parse_resume_hello(frame.body)
        store_id = ticket_state_id(hello.ticket_id)
        try:
            blob = await self.granted_states.get_state(store_id)
            if blob is None:
                raise TicketError(f"ticket {hello.ticket_id.hex()} is unknown (used, expired, or never ours)")
            state = unwrap_ticket(self.wrapper, hello.ticket_id, blob)
        except StoreDataError as exc:
            self.emit(events.StoreDataRefused(self.granted_states.kind, store_id, str(exc)))
            raise TicketError(f"ticket {hello.ticket_id.hex()} cannot be read") from None
        except StoreUnavailableError as exc:
            raise TicketError(f"the {self.granted_states.kind} store did not answer: {exc}") from None
        responder = ResumeResponder(self.identity, state, authorize, config=config, backend=self.backend)
        authorize.handshake = FixedSuite(suite_by_name(state.suite))
        now = wall_ms()
        responder.check(frame, now)
        try:
            first = await self.granted_states.use_once(TICKET_USE_KIND, ticket_use_id(hello.ticket_id),
                                                       state.use_ttl_s(now))
        except StoreUnavailableError as exc:
            raise TicketError(f"the {self.granted_states.kind} store did not answer: {exc}") from None
        if not first:
            raise TicketError(f"ticket {hello.ticket_id.hex()} was used before (replay)")
        await self._forget_redeemed(store_id)
        return responder

    async def _forget_redeemed(self, store_id: str) -> None:
        """In memory the state goes now (its use mark may be forgotten past the bound); a shared
        store's deletion is queued, its use mark kept there for the ticket's whole lifetime."""
        if isinstance(self.granted_states, GrantedInMemory):
            await self.granted_states.delete_state(store_id)
        else:
            self._forget_soon(store_id)

