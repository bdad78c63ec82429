"""Counter leases: a replica seals a record only with a counter from a block it durably holds.

Record nonces are explicit counters (``records.py``). When several replicas of one node can
send under one session key (docs/ha.md), a counter is only safe if no other replica can
ever use it. So counters come in blocks ``[n, n+B)`` reserved in a shared store by
compare-and-swap on the key's *high-water mark* (the end of the highest block ever
reserved): the store moves the mark from ``n`` to ``n+B`` only if it still is ``n``.

Why blocks never overlap, whatever crashes or freezes: the stored mark only grows, and
every committed swap moves it from ``m`` to some ``m' > m``, so the committed intervals
``[m, m')`` are disjoint. A lease uses a block only when the store *answered* that its own
swap committed. A replica that takes a session over starts from the stored mark, above
every block anyone holds; a replica that was frozen and wakes up still holds only its own
old block. A swap whose answer was lost is retried from the same expected mark: the retry
either commits (the first never did) or finds the mark moved (the first did), and then that
block is leaked: wasted counters, never used.

This module is the pure state machine (sans-IO): ``wants_reservation()`` says what to ask
the store, the shell asks and feeds the answer back with ``feed()``. It asks ahead of time
(when at most ``low_water`` counters are left) so the hot path never waits for the store;
``next_counter()`` raises NoCounterError when nothing is in hand yet and LeaseStoppedError
when nothing will ever be again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Union

from .errors import LeaseStoppedError, LocalProtocolError, NoCounterError

MAX_MARK = 2**64
"""Counters are u64, so the highest possible mark (an exclusive end) is 2**64."""
DEFAULT_BLOCK_SIZE = 1 << 16
"""Counters per reservation: 65 536 records of up to 256 KiB each."""
DIRECTIONS = ("i2r", "r2i")


def counter_key_id(session_id: bytes, direction: str) -> str:
    """The store key of one session direction's counters: ``<16 hex digits>.<i2r|r2i>``.

    Counters never restart within a session, not even across rekeys (records.py), so one
    mark per session and direction covers every epoch's key.
    """
    if len(session_id) != 8 or direction not in DIRECTIONS:
        raise LocalProtocolError(f"no counter key for session {session_id.hex()} direction {direction!r}")
    return f"{session_id.hex()}.{direction}"


@dataclass(frozen=True)
class Block:
    """Counters ``start <= c < end``, reserved by one committed compare-and-swap."""

    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start

    def __contains__(self, counter: object) -> bool:
        return isinstance(counter, int) and self.start <= counter < self.end


@dataclass(frozen=True)
class Reservation:
    """One request to the store: move ``key_id``'s mark from ``expected_mark`` to ``new_mark``.

    ``expected_mark`` None means "create": the key must not exist yet (a fresh session key).
    ``seq`` tells the answer to this request from a late answer to an earlier one.
    """

    key_id: str
    expected_mark: int | None
    new_mark: int
    seq: int

    @property
    def block(self) -> Block:
        return Block(self.expected_mark or 0, self.new_mark)


# --- what the store answered (the first three are the store contract's results) -----------------------


@dataclass(frozen=True)
class Granted:
    """The swap committed: the block is ours."""


@dataclass(frozen=True)
class MarkMoved:
    """The swap did not commit: the stored mark is ``current`` (retry from it)."""

    current: int


@dataclass(frozen=True)
class KeyMissing:
    """The swap did not commit: the store holds no mark for the key (the session is gone)."""


@dataclass(frozen=True)
class Unanswered:
    """No answer (timeout, lost reply, store unreachable): the swap may or may not have committed."""

    reason: str


@dataclass(frozen=True)
class Refused:
    """The store answered with data we cannot trust (corrupt or foreign): stop, never guess."""

    reason: str


ReserveResult = Union[Granted, MarkMoved, KeyMissing]
"""What ``NonceStore.reserve`` returns (pqtunnel/stores.py)."""
Outcome = Union[Granted, MarkMoved, KeyMissing, Unanswered, Refused]


class CounterLease:
    """The counters one replica may use under one key, and when to ask for more.

    Build it with ``fresh`` (this replica created the key: the mark must not exist yet) or
    ``takeover`` (continue a key another replica used: start from the stored mark).
    """

    def __init__(self, key_id: str, known_mark: int | None, *, block_size: int = DEFAULT_BLOCK_SIZE,
                 low_water: int | None = None, floor: int = 0) -> None:
        if block_size <= 0:
            raise ValueError("block size must be positive")
        self.key_id = key_id
        self.block_size = block_size
        self.low_water = block_size // 2 if low_water is None else low_water
        if not 0 <= self.low_water < block_size:
            raise ValueError("low water must be below the block size")
        self.floor = floor
        self._known_mark = known_mark
        self._blocks: deque[Block] = deque()
        self._next = 0
        self._pending: Reservation | None = None
        self._seq = 0
        self.stopped: str | None = None
        self.leaked: list[Block] = []
        """Blocks that may have been reserved for us but were never confirmed: never used."""

    @classmethod
    def fresh(cls, key_id: str, **options: int) -> CounterLease:
        """A lease for a key this replica has just created (a new session key)."""
        return cls(key_id, None, **options)

    @classmethod
    def takeover(cls, key_id: str, stored_mark: int | None, *, floor: int = 0, **options: int) -> CounterLease:
        """A lease continuing a key from its stored mark (read just before).

        ``floor`` is the lowest mark the caller knows must be stored (e.g. from the session
        state it took over); a lower or missing mark means the store lost state: stop.
        """
        lease = cls(key_id, stored_mark, floor=floor, **options)
        if stored_mark is None:
            lease.stop("no counter mark is stored for this key: the session's state is gone")
        elif stored_mark < floor:
            lease.stop(f"stored counter mark {stored_mark} is below the known floor {floor}: store rolled back")
        return lease

    # --- the hot path ----------------------------------------------------------------------------

    @property
    def available(self) -> int:
        """Counters in hand (current block's rest plus any block held ahead)."""
        total = sum(len(b) for b in self._blocks)
        return total - (self._next - self._blocks[0].start if self._blocks else 0)

    @property
    def ready(self) -> bool:
        return self.available > 0

    def next_counter(self) -> int:
        """The next counter to seal with; every value is handed out at most once."""
        while self._blocks and self._next >= self._blocks[0].end:
            self._blocks.popleft()
            if self._blocks:
                self._next = self._blocks[0].start
        if not self._blocks:
            if self.stopped is not None:
                raise LeaseStoppedError(f"no counters for {self.key_id}: {self.stopped}")
            raise NoCounterError(f"no counters in hand for {self.key_id}: waiting for the store")
        counter = self._next
        self._next += 1
        return counter

    @property
    def held(self) -> list[Block]:
        """The blocks held now, the current one first (what ``sessions --json`` will show)."""
        blocks = list(self._blocks)
        if blocks and self._next > blocks[0].start:
            blocks[0] = Block(min(self._next, blocks[0].end), blocks[0].end)
        return [b for b in blocks if len(b)]

    # --- talking to the store --------------------------------------------------------------------

    @property
    def pending(self) -> Reservation | None:
        return self._pending

    def wants_reservation(self) -> Reservation | None:
        """The request to send now, if one is due and none is outstanding (at most one at a time)."""
        if self.stopped is not None or self._pending is not None or self.available > self.low_water:
            return None
        start = self._known_mark or 0
        if start >= MAX_MARK:
            self.stop("the 64-bit counter space is used up: the session must be replaced")
            return None
        self._seq += 1
        self._pending = Reservation(self.key_id, self._known_mark, min(start + self.block_size, MAX_MARK), self._seq)
        return self._pending

    def feed(self, request: Reservation, outcome: Outcome) -> None:
        """What the store answered to ``request`` (the outstanding one)."""
        if request is not self._pending:
            raise LocalProtocolError(f"answer to reservation {request.seq} of {self.key_id}, which is not outstanding")
        self._pending = None
        if isinstance(outcome, Granted):
            self._grant(request)
        elif isinstance(outcome, MarkMoved):
            self._moved(request, outcome.current)
        elif isinstance(outcome, KeyMissing):
            self.stop("the counter mark is gone from the store (the session ended elsewhere)"
                       if request.expected_mark is not None else "the store refused to create the mark")
        elif isinstance(outcome, Unanswered):
            self.leaked.append(request.block)  # if it committed, nobody will ever use it
        elif isinstance(outcome, Refused):
            self.stop(f"the store's data was refused: {outcome.reason}")
        else:
            raise LocalProtocolError(f"unknown reservation outcome {outcome!r}")

    def _grant(self, request: Reservation) -> None:
        block = request.block
        if self.leaked and self.leaked[-1] == block:
            self.leaked.pop()  # the retry of a lost request committed: the block was never taken before
        if not self._blocks:
            self._next = block.start
        self._blocks.append(block)
        self._known_mark = request.new_mark

    def _moved(self, request: Reservation, current: int) -> None:
        expected = request.expected_mark
        if not max(expected or 0, self.floor) < current <= MAX_MARK:
            self.stop(f"stored counter mark {current} is not above {expected or 0}: store rolled back or corrupt")
            return
        self._known_mark = current  # any block below it is someone's (or leaked): retry from the mark

    def stop(self, reason: str) -> None:
        """No more reservations, ever (the first reason is kept); blocks in hand stay usable."""
        if self.stopped is None:
            self.stopped = reason
