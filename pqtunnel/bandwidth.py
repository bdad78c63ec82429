"""A byte budget as a pure object: how long must a legacy session wait before moving more bytes?

``[policy.legacy] rate`` and ``burst`` keep sessions without post-quantum key exchange on a
short leash: each such session gets one bucket for both directions together. The bucket
only does arithmetic on the monotonic milliseconds the caller passes in; the I/O shell
asks ``delay_ms`` before it moves bytes, sleeps that long, and reports what it moved with
``consume``. The balance may go negative (a read or a write can be larger than what is
left), and the next caller then waits until the debt is paid, so over any interval the
bytes moved stay within ``burst + rate * seconds`` plus the one chunk in flight.

Integer arithmetic in thousandths of a byte, so no rounding drift, however long it runs.
"""

from __future__ import annotations

SCALE = 1000
"""Balance unit: 1/1000 byte, so ``rate`` bytes/s refill exactly ``rate`` units per millisecond."""


class ByteBucket:
    """``rate`` bytes per second, at most ``burst`` bytes saved up; starts full."""

    def __init__(self, rate: int, burst: int, now_ms: int) -> None:
        self._check(rate, burst)
        self.rate = rate
        self.burst = burst
        self._balance = burst * SCALE
        self._updated_ms = now_ms

    @staticmethod
    def _check(rate: int, burst: int) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError(f"a token bucket needs a positive rate and burst, not rate={rate} burst={burst}")

    def _refill(self, now_ms: int) -> None:
        elapsed = max(0, now_ms - self._updated_ms)  # a caller's clock never runs the bucket backwards
        self._balance = min(self.burst * SCALE, self._balance + elapsed * self.rate)
        self._updated_ms = max(self._updated_ms, now_ms)

    def available(self, now_ms: int) -> int:
        """Whole bytes that may move now without waiting (negative: the debt still to pay)."""
        self._refill(now_ms)
        return self._balance // SCALE

    def delay_ms(self, now_ms: int) -> int:
        """Milliseconds until the balance is no longer negative (0: go ahead now)."""
        self._refill(now_ms)
        if self._balance >= 0:
            return 0
        return -(self._balance // self.rate)  # ceil(debt / rate)

    def consume(self, size: int, now_ms: int) -> int:
        """Count ``size`` bytes that moved; returns ``delay_ms`` afterwards."""
        if size < 0:
            raise ValueError(f"cannot consume {size} bytes")
        self._refill(now_ms)
        self._balance -= size * SCALE
        return self.delay_ms(now_ms)

    def reconfigure(self, rate: int, burst: int, now_ms: int) -> None:
        """New budget (a reloaded policy); the debt is kept, savings are cut to the new burst."""
        self._check(rate, burst)
        self._refill(now_ms)
        self.rate, self.burst = rate, burst
        self._balance = min(self._balance, burst * SCALE)
