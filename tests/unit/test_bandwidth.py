"""Spec for the legacy byte budget (pqtunnel/bandwidth.py): a pure token bucket on caller time."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pqtunnel.bandwidth import ByteBucket

KIB = 1024


def test_a_full_bucket_lets_the_burst_through_at_once() -> None:
    bucket = ByteBucket(rate=100 * KIB, burst=64 * KIB, now_ms=0)
    assert bucket.delay_ms(0) == 0 and bucket.available(0) == 64 * KIB
    assert bucket.consume(64 * KIB, 0) == 0


def test_debt_is_paid_at_the_rate() -> None:
    bucket = ByteBucket(rate=1000, burst=1000, now_ms=0)
    assert bucket.consume(3000, 0) == 2000  # 2000 bytes of debt at 1000 B/s
    assert bucket.delay_ms(1500) == 500
    assert bucket.delay_ms(2000) == 0


def test_savings_never_exceed_the_burst() -> None:
    bucket = ByteBucket(rate=1000, burst=500, now_ms=0)
    assert bucket.available(60_000) == 500


def test_a_clock_that_goes_backwards_does_not_refill() -> None:
    bucket = ByteBucket(rate=1000, burst=1000, now_ms=10_000)
    bucket.consume(1000, 10_000)
    assert bucket.available(5_000) == 0 and bucket.available(10_500) == 500


def test_reconfiguring_keeps_the_debt_and_cuts_the_savings() -> None:
    bucket = ByteBucket(rate=1000, burst=10_000, now_ms=0)
    bucket.reconfigure(rate=500, burst=100, now_ms=0)
    assert bucket.available(0) == 100
    bucket.consume(600, 0)
    assert bucket.delay_ms(0) == 1000


@pytest.mark.parametrize("rate, burst", [(0, 1), (1, 0), (-5, 10)])
def test_a_budget_must_be_positive(rate: int, burst: int) -> None:
    with pytest.raises(ValueError):
        ByteBucket(rate=rate, burst=burst, now_ms=0)


@settings(max_examples=300, deadline=None)
@given(rate=st.integers(1, 10**6), burst=st.integers(1, 10**6),
       steps=st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 10**6)), min_size=1, max_size=40))
def test_a_caller_that_waits_as_told_never_exceeds_burst_plus_rate_times_time(rate: int, burst: int,
                                                                              steps: list) -> None:
    """What the shell does: wait delay_ms, move a chunk, report it. Over the whole run the bytes
    moved stay within burst + rate * elapsed + the last chunk (which may overdraw)."""
    bucket = ByteBucket(rate=rate, burst=burst, now_ms=0)
    now = moved = 0
    for pause, chunk in steps:
        now += pause
        now += bucket.delay_ms(now)
        bucket.consume(chunk, now)
        moved += chunk
        assert moved - chunk <= burst + rate * now // 1000
