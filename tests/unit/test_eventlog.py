"""Spec for the daemon's log subscriber (daemon/eventlog.py): a flood of failed handshakes,
which any stranger can cause, fills the log with a bounded number of lines that still say
how many there were; every other event is logged as it comes."""

from __future__ import annotations

import logging

import pytest

from pqtunnel.events import Fault, HandshakeFailed, Rekeyed
from pqtunneld.eventlog import LOG_BURST, LOG_INTERVAL_MS, EventBus, EventLogger


class Clock:
    def __init__(self) -> None:
        self.now_ms = 0

    def __call__(self) -> int:
        return self.now_ms


def failed(n: int, direction: str = "inbound") -> HandshakeFailed:
    return HandshakeFailed(peer="unknown peer", addr=f"192.0.2.{n % 250}:4000", direction=direction,
                           reason="peer closed the connection during the handshake", fault=Fault.PEER)


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="pqtunneld")
    return caplog


def test_a_flood_of_failed_handshakes_is_logged_in_a_bounded_number_of_lines(logged) -> None:
    clock = Clock()
    log = EventLogger(clock=clock)
    for n in range(1_000):
        log(failed(n))
    assert len(logged.records) == LOG_BURST
    clock.now_ms += LOG_INTERVAL_MS
    log(failed(1_000))
    assert len(logged.records) == LOG_BURST + 1
    assert logged.records[-1].getMessage().endswith(f"({1_000 - LOG_BURST} similar lines held back)")


def test_inbound_failures_do_not_silence_our_own_outbound_ones(logged) -> None:
    log = EventLogger(clock=Clock())
    for n in range(LOG_BURST + 5):
        log(failed(n))
    log(failed(0, direction="outbound"))
    assert "handshake with unknown peer" in logged.records[-1].getMessage()
    assert len(logged.records) == LOG_BURST + 1


def test_other_events_are_never_limited(logged) -> None:
    log = EventLogger(clock=Clock())
    for n in range(LOG_BURST * 3):
        log(Rekeyed(peer="bob", fingerprint="pq1:x", session_id="00", epoch=n))
    assert len(logged.records) == LOG_BURST * 3


def test_only_the_log_is_limited_every_subscriber_still_gets_every_event(logged) -> None:
    bus = EventBus()
    seen = []
    bus.subscribe(EventLogger(clock=Clock()))
    bus.subscribe(seen.append)
    for n in range(LOG_BURST * 2):
        bus.emit(failed(n))
    assert len(seen) == LOG_BURST * 2 and len(logged.records) == LOG_BURST
