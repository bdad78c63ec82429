"""The daemon's event bus: every structured event goes to every subscriber.

Logging subscribes today (one line per event, its level chosen by the event; lines a
stranger can provoke at will are rate-limited); the audit chain and the metrics will
subscribe to the same bus. A subscriber that fails is logged and skipped: one broken
reader must never stop the node or the other readers.
"""

from __future__ import annotations

import logging
from typing import Callable

from pqtunnel.events import Event
from pqtunnel.ratelimit import LogLimiter

from .logs import LOG
from .netio import monotonic_ms

Subscriber = Callable[[Event], None]
LOG_BURST = 20
LOG_INTERVAL_MS = 3_000
"""Rate-limited kinds: 20 lines at once, then one every 3 s (and a count of the rest)."""
Emit = Callable[[Event], None]


class EventBus:
    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def emit(self, event: Event) -> None:
        for subscriber in self._subscribers:
            try:
                subscriber(event)
            except Exception:  # a reader's bug must not cost the node anything
                LOG.exception("event subscriber %r failed on %s", subscriber, event.kind)


def log_event(event: Event) -> None:
    """The event's one-line message at the event's level; nothing is formatted for a level
    the log drops (a stream's debug lines would cost every new stream otherwise)."""
    level = logging.getLevelName(event.level.upper())
    if LOG.isEnabledFor(level):
        LOG.log(level, "%s", event.message(), extra={"event_fields": event.fields()})


LIMITED_KINDS = frozenset({"handshake_failed"})
"""Events a stranger can cause at will (a HELLO flood fails thousands of handshakes)."""


class EventLogger:
    """The default subscriber: ``log_event``, except that the lines of ``LIMITED_KINDS`` are
    rate-limited per kind and direction, and the next line let through says how many were
    held back. Only the log is limited: every event still reaches every other subscriber."""

    def __init__(self, limiter: LogLimiter | None = None, clock: Callable[[], int] = monotonic_ms) -> None:
        self._limiter = limiter or LogLimiter(burst=LOG_BURST, interval=LOG_INTERVAL_MS)
        self._clock = clock

    def __call__(self, event: Event) -> None:
        if event.kind not in LIMITED_KINDS:
            log_event(event)
            return
        category = f"{event.kind}:{getattr(event, 'direction', '')}"
        allowed, held_back = self._limiter.allow(category, self._clock())
        if not allowed:
            return
        suffix = f" ({held_back} similar lines held back)" if held_back else ""
        LOG.log(logging.getLevelName(event.level.upper()), "%s%s", event.message(), suffix,
                extra={"event_fields": {**event.fields(), "held_back": held_back}})
