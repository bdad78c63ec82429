"""Spec for the node's pure peer rules (pqtunnel/peers.py): backoff, candidate rotation,
the duplicate-session tiebreak, the cookie threshold and the one-session-per-peer table."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pqtunnel.peers import (
    BACKOFF_MAX_MS,
    BACKOFF_START_MS,
    COOKIE_THRESHOLD,
    MAX_CANDIDATES,
    SIMULTANEOUS_WINDOW_MS,
    Backoff,
    Direction,
    HandshakeGate,
    Link,
    SessionFacts,
    SessionTable,
    duplicate_loser,
)

SMALL, LARGE = "pq1:aaaa", "pq1:zzzz"


def test_backoff_doubles_up_to_its_cap_and_resets_after_a_session() -> None:
    backoff = Backoff()
    delays = [backoff.next_delay() for _ in range(10)]
    assert delays[:3] == [BACKOFF_START_MS, 2 * BACKOFF_START_MS, 4 * BACKOFF_START_MS]
    assert max(delays) == BACKOFF_MAX_MS and delays[-1] == BACKOFF_MAX_MS
    backoff.reset()
    assert backoff.next_delay() == BACKOFF_START_MS


def test_a_failed_attempt_moves_to_the_next_candidate_and_names_the_address() -> None:
    link = Link("bob", ["10.0.0.2:7330", "10.0.0.3:7330"])
    link.failed("connection refused")
    assert link.address == "10.0.0.3:7330"
    assert link.last_error == "10.0.0.2:7330: connection refused" and link.failures == 1
    link.failed("untrusted", handshake=True)
    assert link.address == "10.0.0.2:7330" and link.handshake_failed


def test_new_candidates_keep_the_current_address_when_it_is_still_listed() -> None:
    link = Link("bob", ["a", "b"])
    link.rotate()
    link.set_candidates(["c", "b"])
    assert link.address == "b"
    link.set_candidates([])
    assert link.candidates == ["c", "b"], "an empty update never leaves a link with nowhere to dial"


def test_simultaneous_dials_keep_the_session_dialled_by_the_smaller_fingerprint() -> None:
    # We are SMALL; the peer is LARGE. Our outbound session was dialled by us (the smaller).
    ours = SessionFacts(Direction.OUTBOUND, LARGE, 1_000)
    theirs = SessionFacts(Direction.INBOUND, LARGE, 1_500)
    assert duplicate_loser(ours, theirs, SMALL) == "new"
    assert duplicate_loser(theirs, ours, SMALL) == "old"
    # The peer runs the same rule with the roles swapped and reaches the same session.
    their_view_of_ours = SessionFacts(Direction.INBOUND, SMALL, 1_000)
    their_view_of_theirs = SessionFacts(Direction.OUTBOUND, SMALL, 1_500)
    assert duplicate_loser(their_view_of_ours, their_view_of_theirs, LARGE) == "new"


def test_a_later_session_replaces_an_older_one() -> None:
    old = SessionFacts(Direction.OUTBOUND, LARGE, 0)
    new = SessionFacts(Direction.INBOUND, LARGE, SIMULTANEOUS_WINDOW_MS + 1)
    assert duplicate_loser(old, new, SMALL) == "old"


@given(st.integers(0, SIMULTANEOUS_WINDOW_MS), st.booleans())
def test_both_nodes_always_agree_on_the_survivor(gap: int, we_dialled_first: bool) -> None:
    """Whatever the order, both ends close the same connection (so one always survives)."""
    first = Direction.OUTBOUND if we_dialled_first else Direction.INBOUND
    second = Direction.INBOUND if we_dialled_first else Direction.OUTBOUND
    mine = duplicate_loser(SessionFacts(first, LARGE, 0), SessionFacts(second, LARGE, gap), SMALL)
    flip = {Direction.INBOUND: Direction.OUTBOUND, Direction.OUTBOUND: Direction.INBOUND}
    theirs = duplicate_loser(SessionFacts(flip[first], SMALL, 0), SessionFacts(flip[second], SMALL, gap), LARGE)
    assert mine == theirs


def test_strangers_need_a_cookie_only_past_the_threshold() -> None:
    gate = HandshakeGate()
    assert not any(gate.begin() for _ in range(COOKIE_THRESHOLD))
    assert gate.begin(), "one more concurrent handshake must echo a cookie"
    gate.end()
    gate.end()
    assert not gate.begin()


def test_the_table_keeps_one_session_per_peer_and_names_the_loser() -> None:
    table: SessionTable[str] = SessionTable(SMALL)
    assert table.register("bob", "first", SessionFacts(Direction.OUTBOUND, LARGE, 0)) is None
    loser = table.register("bob", "second", SessionFacts(Direction.INBOUND, LARGE, 10))
    assert loser == "second" and table.get("bob") == "first"
    assert not table.unregister("bob", "second"), "only the registered session can be removed"
    assert table.unregister("bob", "first") and "bob" not in table


def test_the_address_that_last_worked_is_dialled_first() -> None:
    link = Link("bob", ["tarpit-1", "tarpit-2", "real"])
    assert link.race_order() == ["tarpit-1", "tarpit-2", "real"]
    link.connected("real")
    assert link.race_order() == ["real", "tarpit-1", "tarpit-2"]
    link.set_candidates(["tarpit-3", "real"])
    assert link.race_order()[0] == "real"


def test_a_name_never_has_more_than_a_few_candidates() -> None:
    """Anyone on the LAN can advertise a name with many addresses; only a few are dialled."""
    link = Link("bob", [f"10.0.0.{n}" for n in range(20)])
    assert len(link.candidates) == MAX_CANDIDATES
    link.set_candidates([f"10.0.1.{n}" for n in range(20)] + ["10.0.1.0"])
    assert len(link.candidates) == MAX_CANDIDATES and len(set(link.candidates)) == MAX_CANDIDATES
