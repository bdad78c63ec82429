"""Token buckets and log flood control, sans-IO: the caller passes the time.

``TokenBucket`` is ``burst`` tokens at once, then one token every ``interval`` (in the
caller's time unit); discovery rations peer-table changes with it and handshake admission
rations expensive handshake work. ``LogLimiter`` keeps a record flood from flooding the log.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenBucket:
    """Token bucket: ``burst`` at once, then one token every ``interval``."""

    tokens: float
    stamp: float

    @classmethod
    def full(cls, burst: int, now: float) -> TokenBucket:
        return cls(tokens=float(burst), stamp=now)

    def refill(self, now: float, burst: int, interval: float) -> None:
        if now > self.stamp:
            self.tokens = min(float(burst), self.tokens + (now - self.stamp) / interval)
            self.stamp = now

    def available(self, now: float, burst: int, interval: float) -> bool:
        """Whether a token could be taken now (takes nothing)."""
        self.refill(now, burst, interval)
        return self.tokens >= 1.0 - 1e-9

    def take(self, now: float, burst: int, interval: float) -> bool:
        self.refill(now, burst, interval)
        if self.tokens >= 1.0 - 1e-9:
            self.tokens = max(0.0, self.tokens - 1.0)
            return True
        return False

    def ready_at(self, interval: float) -> float:
        return self.stamp + max(0.0, 1.0 - self.tokens) * interval


class LogLimiter:
    """Per-category token bucket for log lines, so a record flood cannot flood the log."""

    def __init__(self, burst: int = 20, interval: float = 5.0, max_categories: int = 256) -> None:
        self.burst = burst
        self.interval = interval
        self.max_categories = max_categories
        self._buckets: dict[str, TokenBucket] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, category: str, now: float) -> tuple[bool, int]:
        """(may log now, lines suppressed since the last allowed one in this category)."""
        if category not in self._buckets and len(self._buckets) >= self.max_categories:
            self._buckets.clear()  # bounded memory; in practice categories are few
            self._suppressed.clear()
        bucket = self._buckets.setdefault(category, TokenBucket(tokens=float(self.burst), stamp=now))
        if not bucket.take(now, self.burst, self.interval):
            self._suppressed[category] = self._suppressed.get(category, 0) + 1
            return False, 0
        return True, self._suppressed.pop(category, 0)
