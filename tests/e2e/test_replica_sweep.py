"""The stored state of sessions nobody holds any more is swept (daemon/replicas.py, docs/ha.md):
a live session rewrites its snapshot at every rekey, so a snapshot older than that allows,
and not held by this replica, belongs to a session lost with its replica and its peer.
Run against a real SQLite store file.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from pqtunnel.events import Event, StoreDataRefused
from pqtunnel.handover import SessionSnapshot, StateWrapper, resume_key_id, state_id
from pqtunnel.handshake import InitiatorHandshake, ResponderHandshake
from pqtunnel.identity import Identity
from pqtunnel.leases import counter_key_id
from pqtunnel.tunnel import Tunnel
from pqtunneld.config import HaSettings, NodeConfig
from pqtunneld.ha import HaWiring
from pqtunneld.netio import wall_ms
from pqtunneld.replicas import ReplicaSessions
from tests.conftest import NOW_MS, PEER_ADDRESS, accept_as

STALE_AFTER_MS = 600_000


def live_snapshot(alice: Identity, bob: Identity) -> SessionSnapshot:
    """A real session's snapshot, as replica bob would store it."""
    a = Tunnel(InitiatorHandshake(alice, accept_as("bob")), now_ms=0)
    b = Tunnel(ResponderHandshake(bob, accept_as("alice"), peer_address=PEER_ADDRESS), now_ms=0, shared_keys=True)
    a.start(0, NOW_MS)
    for _ in range(4):
        b.receive_data(b"".join(a.buffers_to_send()), 0, NOW_MS)
        a.receive_data(b"".join(b.buffers_to_send()), 0, NOW_MS)
    return b.session.snapshot(wall_ms())


@pytest.fixture
def replica(tmp_path: Path, bob: Identity) -> ReplicaSessions:
    config = NodeConfig(home=tmp_path, ha=HaSettings(store="local", path=tmp_path / "nonces.sqlite", enabled=True))
    seen: list[Event] = []
    sessions = ReplicaSessions(HaWiring(config, bob, seen.append), bob, seen.append)
    sessions.seen = seen  # type: ignore[attr-defined]
    return sessions


async def keep(replica: ReplicaSessions, snapshot: SessionSnapshot) -> None:
    await replica.store.put_state(state_id(snapshot.session_id), replica.wrapper.wrap(snapshot))
    for key_id in (counter_key_id(snapshot.session_id, "r2i"), resume_key_id(snapshot.session_id)):
        await replica.store.reserve(key_id, None, 64)


async def test_a_stale_snapshot_nobody_holds_is_deleted_with_its_marks(replica: ReplicaSessions, alice: Identity,
                                                                    bob: Identity) -> None:
    fresh = live_snapshot(alice, bob)
    stale = replace(live_snapshot(alice, bob), stored_ms=wall_ms() - STALE_AFTER_MS - 1)
    held_but_old = replace(live_snapshot(alice, bob), stored_ms=wall_ms() - STALE_AFTER_MS - 1)
    for snapshot in (fresh, stale, held_but_old):
        await keep(replica, snapshot)
    assert await replica._sweep_once({held_but_old.session_id}, STALE_AFTER_MS) == 1
    assert await replica.store.get_state(state_id(stale.session_id)) is None
    assert await replica.store.read_mark(counter_key_id(stale.session_id, "r2i")) is None
    assert await replica.store.read_mark(resume_key_id(stale.session_id)) is None
    for kept in (fresh, held_but_old):
        assert await replica.store.get_state(state_id(kept.session_id)) is not None
        assert await replica.store.read_mark(counter_key_id(kept.session_id, "r2i")) == 64


async def test_a_snapshot_the_replica_cannot_vouch_for_is_reported_and_left_alone(
        replica: ReplicaSessions, alice: Identity, bob: Identity) -> None:
    foreign = replace(live_snapshot(alice, bob), stored_ms=0)
    blob = StateWrapper.for_identity(alice).wrap(foreign)  # another node's wrapping
    await replica.store.put_state(state_id(foreign.session_id), blob)
    assert await replica._sweep_once(set(), STALE_AFTER_MS) == 0
    assert await replica.store.get_state(state_id(foreign.session_id)) == blob
    refused = [e for e in replica.seen if isinstance(e, StoreDataRefused)]  # type: ignore[attr-defined]
    assert refused and refused[0].key == state_id(foreign.session_id)



async def test_ticket_states_that_expired_unused_are_swept_and_live_ones_stay(tmp_path: Path, alice: Identity,
                                                                             bob: Identity) -> None:
    from pqtunnel.handshake import InitiatorHandshake as Initiator
    from pqtunnel.tickets import issue_ticket, ticket_state_id, wrap_ticket
    from pqtunneld.tickets import TicketBook

    config = NodeConfig(home=tmp_path, ha=HaSettings(store="local", path=tmp_path / "nonces.sqlite", enabled=True))
    book = TicketBook(HaWiring(config, bob, lambda e: None), bob, None, lambda e: None)
    a = Tunnel(Initiator(alice, accept_as("bob")), now_ms=0)
    b = Tunnel(ResponderHandshake(bob, accept_as("alice"), peer_address=PEER_ADDRESS), now_ms=0)
    a.start(0, NOW_MS)
    for _ in range(4):
        b.receive_data(b"".join(a.buffers_to_send()), 0, NOW_MS)
        a.receive_data(b"".join(b.buffers_to_send()), 0, NOW_MS)
    live, _ = issue_ticket(b.result, wall_ms())
    old, _ = issue_ticket(b.result, wall_ms() - 25 * 3600 * 1000)  # 24 h lifetime, issued 25 h ago
    for state in (live, old):
        await book.store.put_state(ticket_state_id(state.ticket_id), wrap_ticket(book.wrapper, state))
    assert await book.sweep_once() == 1
    assert book._to_forget.receive_nowait() == ticket_state_id(old.ticket_id)
