"""Resource limits as pure rules: how much of a resource one key and the whole node may hold.

A stranger or a hostile peer must never make the node run out of descriptors, processes
or memory, so every resource a peer can make us spend is counted before it is spent:

* ``SlotLimit``: at most ``total`` things at once on the node, at most ``per_key`` for any
  one key (a peer, a source address). Exec processes and unauthenticated connections use it.
* ``BufferBudget``: bytes received on streams that no reader has taken yet, per session and
  node-wide. Credit flow control bounds one stream (one window); only this bounds the sum.
* ``Throttle``: at most one report per interval, counting the ones held back, so a flood
  of refusals costs one log line a second, not one per refusal.

The application asks before it spends and says when it gives back; times are monotonic
milliseconds passed in by the caller.
"""

from __future__ import annotations

from typing import Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)


class SlotLimit(Generic[K]):
    """Counts slots held per key; refuses past the node-wide or the per-key limit.

    ``what`` names the resource and ``per`` the key in refusal reasons, e.g. "too many
    processes: 16 at once per peer".
    """

    def __init__(self, total: int, per_key: int, *, what: str, per: str) -> None:
        if total < 1 or per_key < 1:
            raise ValueError(f"limits must be >= 1, not total={total} per_key={per_key}")
        self.total = total
        self.per_key = per_key
        self.what = what
        self.per = per
        self.in_use = 0
        self._held: dict[K, int] = {}

    def held(self, key: K) -> int:
        return self._held.get(key, 0)

    def acquire(self, key: K) -> str | None:
        """Take a slot for ``key``: None when taken, else why not (nothing is taken then)."""
        if self.held(key) >= self.per_key:
            return f"too many {self.what}: {self.per_key} at once per {self.per}"
        if self.in_use >= self.total:
            return f"too many {self.what}: {self.total} at once on this node"
        self._held[key] = self.held(key) + 1
        self.in_use += 1
        return None

    def release(self, key: K) -> None:
        """Give back one slot of ``key`` (a release without a slot is ignored)."""
        count = self._held.get(key, 0)
        if count == 0:
            return
        if count == 1:
            del self._held[key]
        else:
            self._held[key] = count - 1
        self.in_use -= 1


class BufferBudget:
    """Node-wide budget for stream bytes received and not yet taken by a reader.

    A peer may send one window (1 MiB) on every stream before it must wait, so a peer that
    opens many streams and fills each window while nothing reads them would grow our memory
    by streams x window. Each session charges its share (``session()``) for every chunk it
    buffers; a chunk that would pass the session's or the node's budget is not buffered
    (the caller resets that stream), and past half of either budget new streams are
    refused, so streams are not opened only to be reset.
    """

    def __init__(self, total: int, per_session: int) -> None:
        if total < 1 or per_session < 1:
            raise ValueError(f"budgets must be >= 1 byte, not total={total} per_session={per_session}")
        self.total = total
        self.per_session = per_session
        self.used = 0

    def session(self) -> SessionBuffers:
        """A new session's share of this budget."""
        return SessionBuffers(self)


class SessionBuffers:
    """One session's charges against a ``BufferBudget``."""

    def __init__(self, budget: BufferBudget) -> None:
        self.budget = budget
        self.used = 0

    @property
    def crowded(self) -> bool:
        """More than half of the session's or the node's budget is unread: refuse new
        streams until readers catch up."""
        return self.used * 2 > self.budget.per_session or self.budget.used * 2 > self.budget.total

    def charge(self, size: int) -> str | None:
        """Charge ``size`` buffered bytes: None when they fit, else why not (nothing charged)."""
        if self.used + size > self.budget.per_session:
            return f"receive buffers full: {self.budget.per_session} bytes unread in this session"
        if self.budget.used + size > self.budget.total:
            return f"receive buffers full: {self.budget.total} bytes unread on this node"
        self.used += size
        self.budget.used += size
        return None

    def refund(self, size: int) -> None:
        """``size`` charged bytes were read or dropped (never refunds more than was charged)."""
        size = min(size, self.used)
        self.used -= size
        self.budget.used -= size


def unlimited() -> SessionBuffers:
    """A share of a budget nothing reaches: for connections run outside a node (tests, tools)."""
    return BufferBudget(total=1 << 62, per_session=1 << 62).session()


class Throttle:
    """At most one report per ``interval_ms``; counts the reports held back in between."""

    def __init__(self, interval_ms: int) -> None:
        self.interval_ms = interval_ms
        self._last_ms: int | None = None
        self._held_back = 0

    def allow(self, now_ms: int) -> int | None:
        """Report now? Returns how many were held back since the last report, or None (hold back)."""
        if self._last_ms is not None and now_ms - self._last_ms < self.interval_ms:
            self._held_back += 1
            return None
        held_back, self._held_back, self._last_ms = self._held_back, 0, now_ms
        return held_back
