"""Spec for handshake admission (pqtunnel/admission.py) and the token buckets under it.

A HELLO costs its sender microseconds and the responder a signature and an encapsulation,
so the responder rations that work: per source address and for the whole node, asking
strangers for a cookie when the budget runs low and refusing (BUSY) when it is spent.
Established sessions are never rationed.
"""

from __future__ import annotations

import pytest

from pqtunnel.admission import AdmissionLimits, HandshakeAdmission, Verdict, source_key
from pqtunnel.peers import HandshakeGate
from pqtunnel.ratelimit import LogLimiter, TokenBucket

LIMITS = AdmissionLimits(source_per_s=2.0, source_burst=4, node_per_s=10.0, node_burst=10, cookie_below=0.5)


def admission(**changes: object) -> HandshakeAdmission:
    limits = AdmissionLimits(**{**LIMITS.__dict__, **changes})
    return HandshakeAdmission(limits)


def verdicts(gate: HandshakeAdmission, source: str, count: int, *, proven: bool = False, now_ms: int = 0) -> list[Verdict]:
    return [gate.decide(source, proven=proven, now_ms=now_ms) for _ in range(count)]


# --- per source --------------------------------------------------------------------------------------


def test_a_source_gets_its_burst_then_is_busy_until_its_bucket_refills() -> None:
    gate = admission()
    assert verdicts(gate, "192.0.2.1", 4) == [Verdict.ADMIT] * 4
    assert gate.decide("192.0.2.1", proven=True, now_ms=0) is Verdict.BUSY
    assert gate.decide("192.0.2.1", proven=True, now_ms=499) is Verdict.BUSY
    assert gate.decide("192.0.2.1", proven=True, now_ms=500) is Verdict.ADMIT, "2 per second: one token per 500 ms"


def test_one_busy_source_does_not_cost_another_source_anything() -> None:
    gate = admission()
    verdicts(gate, "192.0.2.1", 10)
    assert gate.decide("192.0.2.2", proven=False, now_ms=0) is Verdict.ADMIT


def test_ipv6_sources_are_rationed_per_64_and_mapped_ipv4_as_ipv4() -> None:
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("::ffff:192.0.2.1") == source_key("192.0.2.1") == "192.0.2.1"
    assert source_key("not an address") == "not an address"
    gate = admission()
    verdicts(gate, "2001:db8:1:2::1", 4)
    assert gate.decide("2001:db8:1:2::ffff", proven=True, now_ms=0) is Verdict.BUSY


def test_the_source_table_is_bounded_and_forgets_the_least_recently_seen() -> None:
    gate = admission(max_sources=2, node_burst=100, node_per_s=100.0)
    verdicts(gate, "192.0.2.1", 4)
    verdicts(gate, "192.0.2.2", 1)
    verdicts(gate, "192.0.2.3", 1)  # pushes 192.0.2.1 out: it comes back with a full bucket
    assert gate.decide("192.0.2.1", proven=True, now_ms=0) is Verdict.ADMIT


# --- the whole node -------------------------------------------------------------------------------------


def test_many_sources_together_cannot_exceed_the_node_budget() -> None:
    gate = admission(cookie_below=0.0)
    admitted = [gate.decide(f"192.0.2.{n}", proven=True, now_ms=0) for n in range(1, 31)]
    assert admitted.count(Verdict.ADMIT) == 10
    assert admitted[10:] == [Verdict.BUSY] * 20
    assert gate.decide("198.51.100.1", proven=True, now_ms=100) is Verdict.ADMIT, "10 per second: one per 100 ms"


def test_strangers_need_a_cookie_once_the_budget_runs_low_and_a_cookie_costs_no_token() -> None:
    gate = admission()
    answers = [gate.decide(f"192.0.2.{n}", proven=False, now_ms=0) for n in range(1, 9)]
    assert answers == [Verdict.ADMIT] * 6 + [Verdict.COOKIE] * 2, "admitted down to half the burst (10 -> 4)"
    assert gate.budget(0) == pytest.approx(4.0), "the COOKIEs took nothing"
    assert gate.decide("192.0.2.99", proven=True, now_ms=0) is Verdict.ADMIT, "a proven HELLO may use the rest"


def test_strangers_need_a_cookie_when_too_many_handshakes_are_pending() -> None:
    gate = HandshakeAdmission(LIMITS, HandshakeGate(threshold=2))
    for _ in range(3):
        gate.begin()
    assert gate.under_load(0)
    assert gate.decide("192.0.2.1", proven=False, now_ms=0) is Verdict.COOKIE
    assert gate.decide("192.0.2.1", proven=True, now_ms=0) is Verdict.ADMIT
    gate.end()
    assert not gate.under_load(0)


def test_may_start_refuses_a_spent_source_at_accept_time_without_taking_a_token() -> None:
    gate = admission()
    assert gate.may_start("192.0.2.1", 0)
    verdicts(gate, "192.0.2.1", 4)
    assert not gate.may_start("192.0.2.1", 0)
    assert gate.may_start("192.0.2.2", 0)
    assert gate.budget(0) == pytest.approx(6.0)
    assert gate.stats.refused_at_accept == 1


def test_new_connections_are_taken_from_the_kernel_no_faster_than_the_accept_rate() -> None:
    gate = admission(accepts_per_s=100.0, accept_burst=3)
    assert [gate.accept_delay_ms(0) for _ in range(3)] == [0, 0, 0]
    assert gate.accept_delay_ms(0) == 10, "one connection per 10 ms: wait 10 ms"
    assert gate.accept_delay_ms(4) == 6
    assert gate.accept_delay_ms(10) == 0
    assert gate.accept_delay_ms(10) == 10


def test_the_stats_count_every_verdict() -> None:
    gate = admission()
    assert verdicts(gate, "192.0.2.1", 5) == [Verdict.ADMIT] * 4 + [Verdict.BUSY]
    assert [gate.decide(f"192.0.2.{n}", proven=False, now_ms=0) for n in (2, 3, 4)] == \
        [Verdict.ADMIT, Verdict.ADMIT, Verdict.COOKIE]
    assert (gate.stats.admitted, gate.stats.busy, gate.stats.cookies) == (6, 1, 1)


def test_a_clock_that_goes_back_earns_no_tokens() -> None:
    gate = admission()
    verdicts(gate, "192.0.2.1", 4, now_ms=10_000)
    assert gate.decide("192.0.2.1", proven=True, now_ms=0) is Verdict.BUSY


@pytest.mark.parametrize("changes", [{"source_per_s": 0}, {"node_burst": 0}, {"max_sources": 0}, {"cookie_below": 1.5},
                                     {"accepts_per_s": 0}],
                         ids=lambda c: next(iter(c)))
def test_nonsense_limits_are_refused(changes: dict) -> None:
    with pytest.raises(ValueError):
        admission(**changes)


# --- the buckets ----------------------------------------------------------------------------------------


def test_a_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    bucket = TokenBucket.full(2, now=0.0)
    assert [bucket.take(0.0, 2, 10.0) for _ in range(3)] == [True, True, False]
    assert bucket.ready_at(10.0) == 10.0
    assert not bucket.available(9.0, 2, 10.0)
    assert bucket.take(10.0, 2, 10.0)
    bucket.refill(1_000.0, 2, 10.0)
    assert bucket.tokens == 2.0


def test_the_log_limiter_keeps_a_bounded_number_of_categories() -> None:
    limiter = LogLimiter(burst=1, interval=10.0, max_categories=2)
    assert limiter.allow("a", 0.0) == (True, 0)
    assert limiter.allow("b", 0.0) == (True, 0)
    assert limiter.allow("c", 0.0) == (True, 0), "a third category starts afresh instead of growing the table"
