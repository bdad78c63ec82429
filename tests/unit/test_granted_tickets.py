"""Where a node without [ha] keeps the tickets it granted: in its own memory (daemon/tickets.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from pqtunnel.errors import TicketError
from pqtunnel.handshake import HandshakeConfig
from pqtunnel.identity import Identity
from pqtunnel.tickets import ResumeInitiator, accept_ticket_grant, issue_ticket, ticket_state_id, wrap_ticket
from pqtunneld.config import HaSettings, NodeConfig
from pqtunneld.ha import HaWiring
from pqtunneld.netio import wall_ms
from pqtunneld.tickets import GrantedInMemory, TicketBook
from tests.conftest import MemoBackend, accept_as, one_frame
from tests.unit.test_tickets import full_handshake


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_ticket_use_counts_once_within_its_lifetime_and_expires_after() -> None:
    clock = Clock()
    granted = GrantedInMemory(clock)

    async def uses() -> list[bool]:
        first = await granted.use_once("ticket", "aa", 60.0)
        replayed = await granted.use_once("ticket", "aa", 60.0)
        other = await granted.use_once("ticket", "bb", 60.0)
        clock.now += 61.0
        after = await granted.use_once("ticket", "aa", 60.0)
        return [first, replayed, other, after]

    assert trio.run(uses) == [True, False, True, True]


def test_expired_use_marks_are_purged_so_memory_stays_bounded() -> None:
    clock = Clock()
    granted = GrantedInMemory(clock)

    async def many() -> None:
        for i in range(GrantedInMemory.PURGE_EVERY - 1):
            await granted.use_once("ticket", f"{i:04x}", 1.0)
        clock.now += 2.0
        await granted.use_once("ticket", "last", 1.0)  # the purge runs on this one

    trio.run(many)
    assert len(granted._used) == 1


def test_states_are_kept_listed_by_prefix_and_deleted() -> None:
    granted = GrantedInMemory()

    async def run() -> tuple[bytes | None, list[str], bytes | None]:
        await granted.put_state("ticket.aa", b"wrapped")
        await granted.put_state("other.bb", b"x")
        kept = await granted.get_state("ticket.aa")
        listed = await granted.list_states("ticket.")
        await granted.delete_state("ticket.aa")
        return kept, listed, await granted.get_state("ticket.aa")

    assert trio.run(run) == (b"wrapped", ["ticket.aa"], None)


def test_past_its_bound_the_oldest_grant_is_forgotten_first() -> None:
    granted = GrantedInMemory()
    granted.MAX_STATES = 3

    async def run() -> list[str]:
        for name in ("a", "b", "c", "d"):
            await granted.put_state(f"ticket.{name}", b"x")
        return await granted.list_states("ticket.")

    assert trio.run(run) == ["ticket.b", "ticket.c", "ticket.d"]


def test_only_replicas_share_the_states_of_granted_tickets_through_their_store(tmp_path: Path) -> None:
    bob = Identity.generate("bob")
    alone = NodeConfig(home=tmp_path / "alone")
    replica = NodeConfig(home=tmp_path / "replica", ha=HaSettings(store="local", path=tmp_path / "n.sqlite", enabled=True))
    for config, shared in ((alone, False), (replica, True)):
        wiring = HaWiring(config, bob, lambda e: None)
        book = TicketBook(wiring, bob, None, lambda e: None)
        assert (book.granted_states is wiring.store) is shared
        assert isinstance(book.granted_states, GrantedInMemory) is not shared


def test_use_marks_are_bounded_too_so_a_peer_resuming_in_a_loop_cannot_grow_the_daemon() -> None:
    """Each resumption leaves a use mark that lives as long as its ticket (a day): without a
    bound of their own, a trusted peer resuming in a loop grew them past MAX_STATES."""
    granted = GrantedInMemory()
    granted.MAX_STATES = 3

    async def many() -> list[bool]:
        return [await granted.use_once("ticket", f"{i:04x}", 86_400.0) for i in range(10)]

    assert trio.run(many) == [True] * 10
    assert len(granted._used) == 3
    assert list(granted._used) == [("ticket", "0007"), ("ticket", "0008"), ("ticket", "0009")]


def test_a_redeemed_ticket_stays_refused_after_its_use_mark_is_forgotten(tmp_path: Path, alice: Identity,
                                                                          bob: Identity) -> None:
    """The state of a redeemed ticket goes at once (not via the deletion queue), so the bound
    on use marks never reopens a replay."""
    at_alice, at_bob = full_handshake(alice, bob, MemoBackend())
    state, grant = issue_ticket(at_bob, wall_ms())
    hello = one_frame(ResumeInitiator(alice, accept_ticket_grant(at_alice, grant, wall_ms()), accept_as("bob"))
                      .start(wall_ms()))
    book = TicketBook(HaWiring(NodeConfig(home=tmp_path), bob, lambda e: None), bob, None, lambda e: None)
    granted = book.granted_states
    granted.MAX_STATES = 2

    async def redeem_twice() -> None:
        await granted.put_state(ticket_state_id(state.ticket_id), wrap_ticket(book.wrapper, state))
        await book.redeem(hello, accept_as("alice"), HandshakeConfig())
        for i in range(5):  # other uses push this ticket's mark out
            await granted.use_once("ticket", f"other{i}", 86_400.0)
        with pytest.raises(TicketError, match="unknown"):
            await book.redeem(hello, accept_as("alice"), HandshakeConfig())

    trio.run(redeem_twice)
