"""The node's protocol rules about peers, as pure state: links, backoff, tiebreak, admission.

These are rules a test must be able to drive without sockets or clocks:

* ``Link``: the addresses we dial for one peer name, which one is next, and why the last
  attempt failed. A failed dial or handshake moves on to the next candidate; only the
  handshake decides who answered.
* ``Backoff``: exponential redial delay, reset by a session that came up.
* ``duplicate_loser``: two sessions with one peer (simultaneous dials): both nodes keep the
  one dialled by the smaller fingerprint; otherwise the newer replaces the older.
* ``HandshakeGate``: past a threshold of concurrent inbound handshakes, strangers must echo
  a cookie before the responder signs anything (WireGuard's cookie idea).
* ``ConnectionGate``: caps connections that have not authenticated yet, overall and per
  source address, so strangers cannot hold every descriptor of the daemon.
* ``SessionTable``: one session per peer name, applying ``duplicate_loser``.

Times are monotonic milliseconds passed in by the caller.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import Enum
from typing import Generic, Hashable, TypeVar

from .limits import SlotLimit

BACKOFF_START_MS = 500
BACKOFF_MAX_MS = 30_000
COOKIE_THRESHOLD = 32
"""Concurrent inbound handshakes before strangers must echo a cookie."""
MAX_UNAUTHENTICATED = 128
"""Inbound connections that have not finished the handshake, node-wide."""
MAX_UNAUTHENTICATED_PER_ADDRESS = 8
"""The same, per source address (IPv4 address, IPv6 /64)."""
MAX_CANDIDATES = 4
"""Addresses dialled for one name: anyone on the LAN can advertise more (tarpits)."""
RACE_STAGGER_MS = 250
"""Delay between starting dials to successive candidates (Happy Eyeballs style)."""
SIMULTANEOUS_WINDOW_MS = 5_000
"""Two sessions established closer together than this are a simultaneous dial."""

A = TypeVar("A", bound=Hashable)
S = TypeVar("S")


class Direction(str, Enum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"


@dataclass
class Backoff:
    """Redial delay: starts small, doubles per failure up to a cap, resets on success."""

    start_ms: int = BACKOFF_START_MS
    max_ms: int = BACKOFF_MAX_MS
    delay_ms: int = BACKOFF_START_MS

    def next_delay(self) -> int:
        """The delay to wait now; the following one is doubled (capped)."""
        delay = self.delay_ms
        self.delay_ms = min(self.delay_ms * 2, self.max_ms)
        return delay

    def reset(self) -> None:
        self.delay_ms = self.start_ms


@dataclass
class Link(Generic[A]):
    """Where to dial one peer name, and how the attempts went."""

    name: str
    candidates: list[A]
    source: str = "static"
    index: int = 0
    last_error: str = ""
    failures: int = 0
    handshake_failed: bool = False
    backoff: Backoff = field(default_factory=Backoff)
    last_good: A | None = None

    def __post_init__(self) -> None:
        self.candidates = self.candidates[:MAX_CANDIDATES]

    @property
    def address(self) -> A:
        return self.candidates[self.index % len(self.candidates)]

    def set_candidates(self, addresses: list[A]) -> None:
        """Replace the candidates, staying on the current address if it is still listed."""
        current = self.address
        self.candidates = list(dict.fromkeys(addresses))[:MAX_CANDIDATES] or self.candidates
        self.index = self.candidates.index(current) if current in self.candidates else 0

    def race_order(self) -> list[A]:
        """Candidates in the order to start dialling them: the one that last worked first, so a
        tarpit advertised beside it (accepts, never answers) costs nothing."""
        if self.last_good in self.candidates:
            return [self.last_good, *(a for a in self.candidates if a != self.last_good)]
        return list(self.candidates)

    def rotate(self) -> None:
        self.index = (self.index + 1) % len(self.candidates)

    def failed(self, reason: str, *, handshake: bool = False) -> None:
        """Record a failed attempt at the current address and move to the next candidate."""
        self.handshake_failed = handshake
        self.last_error = f"{self.address}: {reason}" if len(self.candidates) > 1 else reason
        self.failures += 1
        self.rotate()

    def connected(self, address: A | None = None) -> None:
        self.last_error = ""
        self.backoff.reset()
        if address is not None:
            self.last_good = address


@dataclass(frozen=True)
class SessionFacts:
    """What the tiebreak needs to know about a session."""

    direction: Direction
    peer_fingerprint: str
    established_ms: int


def duplicate_loser(old: SessionFacts, new: SessionFacts, our_fingerprint: str) -> str:
    """Which of two sessions with one peer to close: ``"old"`` or ``"new"``.

    Simultaneous dials: both nodes keep the session dialled by the smaller fingerprint,
    so they agree without talking. Otherwise the newer session replaces the older.
    """
    if new.established_ms - old.established_ms > SIMULTANEOUS_WINDOW_MS:
        return "old"

    def dialler(facts: SessionFacts) -> str:
        return our_fingerprint if facts.direction is Direction.OUTBOUND else facts.peer_fingerprint

    return "new" if dialler(old) < dialler(new) else "old"


@dataclass
class HandshakeGate:
    """Counts inbound handshakes in progress; past the threshold, strangers need a cookie."""

    threshold: int = COOKIE_THRESHOLD
    pending: int = 0

    def begin(self) -> bool:
        """A handshake starts; returns whether it must require a cookie."""
        self.pending += 1
        return self.pending > self.threshold

    def end(self) -> None:
        """The handshake finished (either way)."""
        self.pending = max(0, self.pending - 1)


def source_key(host: str) -> str:
    """The unit one source is counted in: an IPv4 address, or an IPv6 /64 (one host
    usually owns a whole /64, so counting single IPv6 addresses would cap nothing)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class ConnectionGate:
    """Caps inbound connections that have not authenticated yet: node-wide and per source.

    Each such connection holds a descriptor until its handshake ends (at most the handshake
    timeout), and a stranger can open them for free; past either cap a new connection is
    closed at once, so strangers can neither exhaust descriptors nor crowd out each other's
    sources. A connection leaves the gate when its handshake ends, either way.
    """

    def __init__(self, total: int = MAX_UNAUTHENTICATED, per_address: int = MAX_UNAUTHENTICATED_PER_ADDRESS) -> None:
        self._slots: SlotLimit[str] = SlotLimit(total, per_address, what="unauthenticated connections",
                                                per="source address")

    @property
    def pending(self) -> int:
        return self._slots.in_use

    def admit(self, host: str) -> str | None:
        """A connection from ``host`` arrived: None to serve it, else why it is closed at once."""
        return self._slots.acquire(source_key(host))

    def release(self, host: str) -> None:
        """The handshake of a connection from ``host`` ended (established or failed)."""
        self._slots.release(source_key(host))


class SessionTable(Generic[S]):
    """One live session per peer name; a duplicate is resolved by ``duplicate_loser``."""

    def __init__(self, our_fingerprint: str) -> None:
        self.our_fingerprint = our_fingerprint
        self._sessions: dict[str, tuple[S, SessionFacts]] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._sessions

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, name: str) -> S | None:
        entry = self._sessions.get(name)
        return entry[0] if entry else None

    def items(self) -> list[tuple[str, S]]:
        return [(name, entry[0]) for name, entry in sorted(self._sessions.items())]

    def values(self) -> list[S]:
        return [entry[0] for entry in self._sessions.values()]

    def names(self) -> set[str]:
        return set(self._sessions)

    def register(self, name: str, session: S, facts: SessionFacts) -> S | None:
        """Add a session that just came up; returns the session to close, if any.

        Returns ``session`` itself when it loses to the existing one (it is not added).
        """
        existing = self._sessions.get(name)
        if existing is None or existing[0] is session:
            self._sessions[name] = (session, facts)
            return None
        if duplicate_loser(existing[1], facts, self.our_fingerprint) == "new":
            return session
        self._sessions[name] = (session, facts)
        return existing[0]

    def unregister(self, name: str, session: S) -> bool:
        """Remove ``session`` if it is the one registered for ``name``."""
        entry = self._sessions.get(name)
        if entry is None or entry[0] is not session:
            return False
        del self._sessions[name]
        return True
