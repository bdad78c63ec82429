"""Admission of inbound handshakes: who may make this node do expensive work, and when.

Building a HELLO costs its sender microseconds; answering one costs the responder an
ML-DSA signature, an ML-KEM encapsulation and four X25519 operations (milliseconds). So
the responder rations that work with two token buckets, both refilled on the monotonic
clock the caller passes in:

* one per source (an IPv4 address, or an IPv6 /64, which one host usually owns), so one
  address cannot take the node's whole budget;
* one for the whole node, so that many addresses together cannot either: whatever the
  flood, handshakes get at most ``node_per_s`` signatures a second and established
  sessions keep the rest of the CPU (they are never rationed).

The node is *under load* when its budget has fallen below ``cookie_below`` of the burst,
or when more than ``HandshakeGate.threshold`` handshakes are in progress. Under load a
stranger must first echo a cookie (a RETRY costs the responder no signature), so a
source has to receive our packets before it can spend our budget. A HELLO is judged:

1. its source's bucket is empty, or the node's is: ``BUSY`` (refused with an ALERT);
2. it carries no valid cookie and the node is under load: ``COOKIE`` (answered by RETRY);
3. otherwise one token is taken from both buckets: ``ADMIT`` (the responder signs).

``may_start`` applies rule 1 when a connection is accepted, before a byte is read, so a
source that is out of budget costs the node an accept and a close, nothing more. And even
that is rationed: ``accept_delay_ms`` paces how fast the node takes new connections from
the kernel at all (``accepts_per_s``); the rest wait in the listen queue, where they cost
nothing. So whatever a flood sends, the work it can cause per second is bounded, and
established sessions, which are never paced, keep the rest of the CPU.
Pure state: times are monotonic milliseconds passed in by the caller.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum

from .peers import HandshakeGate, source_key
from .ratelimit import TokenBucket


class Verdict(Enum):
    """What the responder does with a HELLO that passed the cheap checks."""

    ADMIT = "admit"
    """Do the expensive work (sign, encapsulate) now."""
    COOKIE = "cookie"
    """Answer with a RETRY first: the sender must prove it receives our packets."""
    BUSY = "busy"
    """Refuse with an ALERT (``busy``); the initiator backs off and dials again later."""


@dataclass(frozen=True)
class AdmissionLimits:
    """Budgets for expensive responder work (handshakes per second and bursts)."""

    source_per_s: float = 5.0
    source_burst: int = 20
    node_per_s: float = 20.0
    node_burst: int = 40
    cookie_below: float = 0.5
    """Strangers need a cookie while the node's budget is below this share of its burst."""
    max_sources: int = 4096
    """Per-source buckets kept (least recently used are forgotten, i.e. refilled)."""
    accepts_per_s: float = 100.0
    accept_burst: int = 100
    """New inbound connections taken from the kernel per second (every source together)."""

    def __post_init__(self) -> None:
        rates = (self.source_per_s, self.node_per_s, self.accepts_per_s)
        if min(rates) <= 0 or min(self.source_burst, self.node_burst, self.max_sources, self.accept_burst) < 1:
            raise ValueError("admission rates, bursts and the source table size must be positive")
        if not 0.0 <= self.cookie_below <= 1.0:
            raise ValueError("cookie_below is a share of the burst, between 0 and 1")


@dataclass
class AdmissionStats:
    """What admission decided, for ``pqtunnel status`` and the flood benchmark."""

    admitted: int = 0
    cookies: int = 0
    busy: int = 0
    refused_at_accept: int = 0


@dataclass
class HandshakeAdmission:
    """The node's budgets for expensive handshake work, and its in-progress count."""

    limits: AdmissionLimits = field(default_factory=AdmissionLimits)
    gate: HandshakeGate = field(default_factory=HandshakeGate)
    stats: AdmissionStats = field(default_factory=AdmissionStats)

    def __post_init__(self) -> None:
        self._sources: OrderedDict[str, TokenBucket] = OrderedDict()
        self._node: TokenBucket | None = None
        self._accepts: TokenBucket | None = None

    # --- handshakes in progress -----------------------------------------------------------------

    def begin(self) -> None:
        """An inbound connection starts its handshake."""
        self.gate.begin()

    def end(self) -> None:
        """An inbound handshake finished, either way."""
        self.gate.end()

    # --- decisions ---------------------------------------------------------------------------------

    def accept_delay_ms(self, now_ms: int) -> int:
        """0: take the next connection from the kernel now (a token is taken); else how many
        milliseconds to leave it queued before asking again."""
        if self._accepts is None:
            self._accepts = TokenBucket.full(self.limits.accept_burst, now_ms)
        interval = 1000.0 / self.limits.accepts_per_s
        if self._accepts.take(now_ms, self.limits.accept_burst, interval):
            return 0
        return max(1, int(self._accepts.ready_at(interval) - now_ms + 0.999))

    def may_start(self, source: str, now_ms: int) -> bool:
        """Whether to read a new connection's HELLO at all (rule 1, taking nothing)."""
        if self._has_budget(source, now_ms):
            return True
        self.stats.refused_at_accept += 1
        return False

    def decide(self, source: str, *, proven: bool, now_ms: int) -> Verdict:
        """Judge one HELLO; ``proven``: it carried a valid cookie (the source receives our packets)."""
        if not self._has_budget(source, now_ms):
            self.stats.busy += 1
            return Verdict.BUSY
        if not proven and self.under_load(now_ms):
            self.stats.cookies += 1
            return Verdict.COOKIE
        self._source(source, now_ms).take(now_ms, self.limits.source_burst, self._source_interval)
        self._node_bucket(now_ms).take(now_ms, self.limits.node_burst, self._node_interval)
        self.stats.admitted += 1
        return Verdict.ADMIT

    def under_load(self, now_ms: int) -> bool:
        """Strangers must echo a cookie: the budget is running low, or many handshakes are pending."""
        bucket = self._node_bucket(now_ms)
        bucket.refill(now_ms, self.limits.node_burst, self._node_interval)
        low = bucket.tokens < self.limits.cookie_below * self.limits.node_burst
        return low or self.gate.pending > self.gate.threshold

    def budget(self, now_ms: int) -> float:
        """Whole handshakes the node may still do right now (for status)."""
        bucket = self._node_bucket(now_ms)
        bucket.refill(now_ms, self.limits.node_burst, self._node_interval)
        return bucket.tokens

    # --- buckets -------------------------------------------------------------------------------------

    @property
    def _source_interval(self) -> float:
        return 1000.0 / self.limits.source_per_s

    @property
    def _node_interval(self) -> float:
        return 1000.0 / self.limits.node_per_s

    def _has_budget(self, source: str, now_ms: int) -> bool:
        source_ok = self._source(source, now_ms).available(now_ms, self.limits.source_burst, self._source_interval)
        return source_ok and self._node_bucket(now_ms).available(now_ms, self.limits.node_burst, self._node_interval)

    def _source(self, source: str, now_ms: int) -> TokenBucket:
        key = source_key(source)
        bucket = self._sources.get(key)
        if bucket is None:
            bucket = self._sources[key] = TokenBucket.full(self.limits.source_burst, now_ms)
            while len(self._sources) > self.limits.max_sources:
                self._sources.popitem(last=False)
        self._sources.move_to_end(key)
        return bucket

    def _node_bucket(self, now_ms: int) -> TokenBucket:
        if self._node is None:
            self._node = TokenBucket.full(self.limits.node_burst, now_ms)
        return self._node
