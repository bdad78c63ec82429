"""The daemon's event bus: every structured event goes to every subscriber.

Logging subscribes today (one line per event, its level chosen by the event); the audit
chain and the metrics will subscribe to the same bus. A subscriber that fails is logged
and skipped: one broken reader must never stop the node or the other readers.
"""

from __future__ import annotations

import logging
from typing import Callable

from pqtunnel.events import Event

from .logs import LOG

Subscriber = Callable[[Event], None]
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
    """The default subscriber: the event's one-line message at the event's level."""
    LOG.log(logging.getLevelName(event.level.upper()), "%s", event.message())
