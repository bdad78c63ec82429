"""Where a node without [ha] keeps the tickets it granted: in its own memory (daemon/tickets.py)."""

from __future__ import annotations

from pathlib import Path

import trio

from pqtunnel.identity import Identity
from pqtunneld.config import HaSettings, NodeConfig
from pqtunneld.ha import HaWiring
from pqtunneld.tickets import GrantedInMemory, TicketBook


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
