"""Spec for the resource limits (pqtunnel/limits.py, peers.ConnectionGate): what one key and
the whole node may hold at once, as pure counters without sockets or clocks."""

from __future__ import annotations

import pytest

from pqtunnel.limits import BufferBudget, SlotLimit, Throttle, unlimited
from pqtunnel.peers import ConnectionGate, source_key

pytestmark = pytest.mark.unit


# --- SlotLimit ------------------------------------------------------------------------------------


def test_a_key_gets_at_most_its_share_and_says_so() -> None:
    slots: SlotLimit[str] = SlotLimit(10, 2, what="processes", per="peer")
    assert slots.acquire("mallory") is None and slots.acquire("mallory") is None
    assert slots.acquire("mallory") == "too many processes: 2 at once per peer"
    assert slots.held("mallory") == 2 and slots.in_use == 2


def test_the_node_limit_holds_across_keys() -> None:
    slots: SlotLimit[str] = SlotLimit(3, 2, what="processes", per="peer")
    for key in ("a", "a", "b"):
        assert slots.acquire(key) is None
    assert slots.acquire("c") == "too many processes: 3 at once on this node"
    assert slots.held("c") == 0, "a refused slot is not taken"


def test_a_released_slot_can_be_taken_again() -> None:
    slots: SlotLimit[str] = SlotLimit(1, 1, what="processes", per="peer")
    assert slots.acquire("a") is None
    slots.release("a")
    assert slots.in_use == 0 and slots.acquire("b") is None


def test_releasing_a_slot_that_was_never_taken_changes_nothing() -> None:
    slots: SlotLimit[str] = SlotLimit(2, 1, what="processes", per="peer")
    assert slots.acquire("a") is None
    slots.release("b")
    assert slots.in_use == 1 and slots.held("a") == 1


@pytest.mark.parametrize("total, per_key", [(0, 1), (1, 0), (-1, 5)])
def test_a_limit_below_one_is_a_mistake(total: int, per_key: int) -> None:
    with pytest.raises(ValueError):
        SlotLimit(total, per_key, what="processes", per="peer")


# --- ConnectionGate ---------------------------------------------------------------------------------


def test_one_source_address_cannot_take_every_handshake_slot() -> None:
    gate = ConnectionGate(total=100, per_address=3)
    assert [gate.admit("192.0.2.7") for _ in range(3)] == [None] * 3
    assert gate.admit("192.0.2.7") == "too many unauthenticated connections: 3 at once per source address"
    assert gate.admit("192.0.2.8") is None


def test_many_sources_together_stop_at_the_node_limit() -> None:
    gate = ConnectionGate(total=4, per_address=2)
    for host in ("192.0.2.1", "192.0.2.1", "192.0.2.2", "192.0.2.3"):
        assert gate.admit(host) is None
    assert gate.admit("192.0.2.4") == "too many unauthenticated connections: 4 at once on this node"
    gate.release("192.0.2.1")
    assert gate.pending == 3 and gate.admit("192.0.2.4") is None


def test_an_ipv6_source_is_counted_by_its_64_prefix() -> None:
    gate = ConnectionGate(total=100, per_address=2)
    assert gate.admit("2001:db8:0:1::1") is None and gate.admit("2001:db8:0:1::ffff") is None
    assert gate.admit("2001:db8:0:1:abcd::9") is not None, "every address of one /64 is one source"
    assert gate.admit("2001:db8:0:2::1") is None


@pytest.mark.parametrize("host, key", [
    ("192.0.2.1", "192.0.2.1"),
    ("::ffff:192.0.2.1", "192.0.2.1"),
    ("2001:db8::1", "2001:db8::/64"),
    ("fe80::1%eth0", "fe80::/64"),
    ("unknown", "unknown"),
])
def test_source_keys(host: str, key: str) -> None:
    assert source_key(host) == key


# --- BufferBudget -----------------------------------------------------------------------------------


def test_a_session_buffers_up_to_its_share_and_no_further() -> None:
    budget = BufferBudget(total=1000, per_session=100)
    session = budget.session()
    assert session.charge(60) is None and session.charge(40) is None
    assert session.charge(1) == "receive buffers full: 100 bytes unread in this session"
    assert session.used == 100 and budget.used == 100, "a refused charge charges nothing"


def test_sessions_share_the_node_budget() -> None:
    budget = BufferBudget(total=150, per_session=100)
    first, second = budget.session(), budget.session()
    assert first.charge(100) is None
    assert second.charge(60) == "receive buffers full: 150 bytes unread on this node"
    assert second.charge(50) is None


def test_bytes_read_are_refunded_and_make_room_again() -> None:
    budget = BufferBudget(total=1000, per_session=100)
    session = budget.session()
    assert session.charge(100) is None
    session.refund(30)
    assert session.used == 70 and budget.used == 70 and session.charge(30) is None


def test_a_refund_never_exceeds_what_was_charged() -> None:
    budget = BufferBudget(total=1000, per_session=100)
    first, second = budget.session(), budget.session()
    assert first.charge(10) is None and second.charge(50) is None
    first.refund(500)
    assert first.used == 0 and budget.used == 50, "one session cannot refund another's bytes"


def test_past_half_of_a_budget_new_streams_are_refused() -> None:
    budget = BufferBudget(total=1000, per_session=100)
    session, other = budget.session(), budget.session()
    assert session.charge(50) is None and not session.crowded
    assert session.charge(1) is None and session.crowded
    assert not other.crowded, "a crowded session leaves the others alone"
    assert other.charge(100) is None and other.charge(0) is None
    for _ in range(4):
        budget.session().charge(100)
    assert budget.session().crowded, "past half of the node budget every session is crowded"


def test_connections_outside_a_node_are_never_limited() -> None:
    session = unlimited()
    assert session.charge(1 << 40) is None and not session.crowded


# --- Throttle ---------------------------------------------------------------------------------------


def test_a_throttle_reports_once_per_interval_and_counts_what_it_held_back() -> None:
    throttle = Throttle(interval_ms=1000)
    assert throttle.allow(0) == 0
    assert [throttle.allow(t) for t in (1, 500, 999)] == [None, None, None]
    assert throttle.allow(1000) == 3
    assert throttle.allow(1500) is None and throttle.allow(5000) == 1
