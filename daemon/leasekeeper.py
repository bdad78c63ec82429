"""Drive a pure CounterLease (pqtunnel/leases.py) against a NonceStore, under trio.

The lease decides *when* to ask and *what*; this keeper only asks and feeds the answer
back, so the hot path (``next_counter``) takes a counter in hand without waiting while
the keeper fetches the next block in the background. A store that does not answer becomes
``Unanswered`` (the lease retries from the same expected mark, so the request cannot
commit twice) after a pause; data the store cannot vouch for becomes ``Refused`` (the lease
stops for good). The record layer will take its counters from here (docs/ha.md).
"""

from __future__ import annotations

from typing import Any, Callable

import trio

from pqtunnel.errors import LeaseStoppedError, NoCounterError, StoreDataError, StoreUnavailableError
from pqtunnel.events import CounterBlockReserved, Event
from pqtunnel.leases import CounterLease, Outcome, Refused, Reservation, Unanswered
from pqtunnel.stores import NonceStore

RETRY_PAUSE = (0.05, 1.0)
"""Pause after an unanswered reservation, doubling from the first value up to the second."""


def outcome_label(outcome: Outcome) -> str:
    """``MarkMoved`` -> ``mark_moved``: the result label of a reservation's event and metric."""
    name = type(outcome).__name__
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(name))


async def takeover_lease(store: NonceStore, key_id: str, *, floor: int = 0, **options: int) -> CounterLease:
    """A lease continuing ``key_id`` from its stored mark (a replica taking a session over)."""
    try:
        mark = await store.read_mark(key_id)
    except StoreDataError as exc:
        lease = CounterLease(key_id, None, floor=floor, **options)
        lease.stop(f"the store's data was refused: {exc}")
        return lease
    return CounterLease.takeover(key_id, mark, floor=floor, **options)


class LeaseKeeper:
    """One lease and the task that keeps it supplied; ``await next_counter()`` on the hot path."""

    def __init__(self, lease: CounterLease, store: NonceStore, emit: Callable[[Event], None] | None = None) -> None:
        self.lease = lease
        self.store = store
        self.emit = emit or (lambda event: None)
        """Where each reservation's CounterBlockReserved goes (the node's event bus: metrics)."""
        self.unanswered = 0
        self._wanted = trio.Event()
        self._changed = trio.Event()
        self._pause = RETRY_PAUSE[0]

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Ask for blocks whenever the lease wants one, until it stops (or the task is cancelled)."""
        task_status.started()
        while self.lease.stopped is None:
            request = self.lease.wants_reservation()
            if request is None:
                await self._wanted.wait()
                self._wanted = trio.Event()
                continue
            asked = trio.current_time()
            outcome = await self._ask(request)
            self.emit(CounterBlockReserved(self.store.kind, request.key_id, outcome_label(outcome),
                                           round(trio.current_time() - asked, 6)))
            self.lease.feed(request, outcome)
            self._notify()
            if isinstance(outcome, Unanswered):
                self.unanswered += 1
                await trio.sleep(self._pause)
                self._pause = min(self._pause * 2, RETRY_PAUSE[1])
            else:
                self._pause = RETRY_PAUSE[0]
        self._notify()

    async def _ask(self, request: Reservation) -> Outcome:
        try:
            return await self.store.reserve(request.key_id, request.expected_mark, request.new_mark)
        except StoreUnavailableError as exc:
            return Unanswered(str(exc))
        except StoreDataError as exc:
            return Refused(str(exc))

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def counter_now(self) -> int:
        """A counter in hand, or NoCounterError (LeaseStoppedError: never again); never waits."""
        try:
            return self.lease.next_counter()
        finally:
            if self.lease.available <= self.lease.low_water:
                self._wanted.set()

    @property
    def available(self) -> int:
        """Counters in hand."""
        return self.lease.available

    def counters(self) -> ReservedCounters:
        """This keeper as the record layer's ``CounterSource``."""
        return ReservedCounters(self)

    async def wait_changed(self) -> None:
        """Until the lease changes (a block granted, a retry, a stop)."""
        await self._changed.wait()

    async def wait_ready(self) -> None:
        """Until a counter is in hand; LeaseStoppedError if none will ever be."""
        while self.lease.available == 0:
            if self.lease.stopped is not None:
                raise LeaseStoppedError(f"no counters for {self.lease.key_id}: {self.lease.stopped}")
            self._wanted.set()
            await self._changed.wait()

    async def next_counter(self) -> int:
        """The next counter, waiting for the store only when none is in hand."""
        while True:
            changed = self._changed
            try:
                return self.counter_now()
            except LeaseStoppedError:
                raise
            except NoCounterError:
                await changed.wait()


class ReservedCounters:
    """A LeaseKeeper seen by the record layer (``pqtunnel.records.CounterSource``): counters in
    hand only, taken without waiting; running low wakes the keeper."""

    def __init__(self, keeper: LeaseKeeper) -> None:
        self._keeper = keeper

    @property
    def available(self) -> int:
        return self._keeper.available

    def next_counter(self) -> int:
        return self._keeper.counter_now()
