"""One stream of structured events: what happened to sessions, streams and the node.

The daemon emits these at the one place each fact becomes known; logging reads them
today, and the compliance audit and the metrics read the very same objects, so the three
can never disagree. Each event is a frozen dataclass of plain facts (no objects, no I/O);
``fields()`` gives the JSON-ready dict, ``message()`` the one human log line.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import KW_ONLY, dataclass
from enum import Enum
from typing import Any, ClassVar


class Fault(str, Enum):
    """Whose fault a failure was: the peer's (bad bytes, untrusted) or ours (a bug, a limit)."""

    PEER = "peer"
    LOCAL = "local"
    NETWORK = "network"


@functools.cache
def _field_names(kind: type) -> tuple[str, ...]:
    """An event class's field names, looked up once per class (every stream emits events)."""
    return tuple(field.name for field in dataclasses.fields(kind))


@dataclass(frozen=True)
class Event:
    """Base of every event. ``level`` is the log level name the default log line uses."""

    kind: ClassVar[str] = "event"
    level: ClassVar[str] = "info"

    def fields(self) -> dict[str, Any]:
        """The event as a flat JSON-ready mapping, with its ``event`` name first."""
        data: dict[str, Any] = {"event": self.kind}
        for name in _field_names(type(self)):
            value = getattr(self, name)
            data[name] = value.value if isinstance(value, Enum) else value
        return data

    def message(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.fields().items())


@dataclass(frozen=True)
class SessionUp(Event):
    kind: ClassVar[str] = "session_up"

    peer: str
    fingerprint: str
    addr: str
    direction: str
    session_id: str
    suite: str
    kem: str
    signature: str
    aead: str
    trust: str
    handshake_seconds: float | None = None
    """From the connection (TCP connected or accepted) to the session keys, measured by the caller."""

    def message(self) -> str:
        return f"session up: {self.peer} {self.direction} {self.addr}, {self.kem}, {self.signature}, {self.aead}"


@dataclass(frozen=True)
class SessionDown(Event):
    kind: ClassVar[str] = "session_down"

    peer: str
    fingerprint: str
    addr: str
    session_id: str
    reason: str
    bytes_in: int
    bytes_out: int
    duration: float
    direction: str = ""
    suite: str = ""
    kem: str = ""
    signature: str = ""
    aead: str = ""

    def message(self) -> str:
        return f"session down: {self.peer} ({self.fingerprint}): {self.reason}"


@dataclass(frozen=True)
class HandshakeFailed(Event):
    kind: ClassVar[str] = "handshake_failed"
    level: ClassVar[str] = "warning"

    peer: str
    addr: str
    direction: str
    reason: str
    fault: Fault
    fingerprint: str = ""
    """The peer's fingerprint, when it authenticated before it was refused."""
    suite: str = ""
    rule: str = ""
    """The policy rule that refused the peer (empty: not refused by a rule, e.g. a network error)."""
    handshake_seconds: float | None = None
    """From the connection to the failure (None: refused before a handshake began)."""

    def message(self) -> str:
        return f"handshake with {self.peer} at {self.addr} failed: {self.reason}"


@dataclass(frozen=True)
class DialOutcome(Event):
    """What became of one dial to a peer at one address, other than a session."""

    peer: str
    addr: str
    reason: str


@dataclass(frozen=True)
class TicketRefused(DialOutcome):
    """Our dial offered a resumption ticket and did not get a session from it (the peer
    restarted, or the ticket expired or was used): the dial goes on at once with a full
    handshake, so this is no failure of the connection."""

    kind: ClassVar[str] = "ticket_refused"

    def message(self) -> str:
        return f"{self.peer} at {self.addr} did not resume with our ticket ({self.reason}): full handshake instead"


@dataclass(frozen=True)
class PeerUnreachable(DialOutcome):
    kind: ClassVar[str] = "peer_unreachable"
    level: ClassVar[str] = "warning"

    def message(self) -> str:
        return f"cannot reach {self.peer} at {self.addr}: {self.reason}"


@dataclass(frozen=True)
class Rekeyed(Event):
    kind: ClassVar[str] = "rekeyed"

    peer: str
    fingerprint: str
    session_id: str
    epoch: int

    def message(self) -> str:
        return f"rekeyed session with {self.peer} ({self.fingerprint}) (epoch {self.epoch})"


@dataclass(frozen=True)
class StreamFacts:
    """What an auditor needs about a stream besides its decision: the target as a service
    name or a port, and the session carrying it (the peer's address, suite and algorithms).
    Keyword-only, so the events' positional fields stay as they were."""

    _: KW_ONLY
    service: str | None = None
    port: int | None = None
    addr: str = ""
    suite: str = ""
    kem: str = ""
    signature: str = ""
    aead: str = ""


@dataclass(frozen=True)
class StreamAllowed(StreamFacts, Event):
    kind: ClassVar[str] = "stream_allowed"
    level: ClassVar[str] = "debug"  # one line per stream open is noise at info (and costs the new-stream path)

    peer: str
    fingerprint: str
    stream_id: int
    target: str
    rule: str

    def message(self) -> str:
        return f"stream {self.stream_id}: {self.peer} -> {self.target} allowed ({self.rule})"


@dataclass(frozen=True)
class StreamDenied(StreamFacts, Event):
    kind: ClassVar[str] = "stream_denied"

    peer: str
    fingerprint: str
    stream_id: int
    target: str
    rule: str
    reason: str

    def message(self) -> str:
        return f"refused stream {self.stream_id} from {self.peer} to {self.target}: {self.reason}"


@dataclass(frozen=True)
class StreamEnded(StreamFacts, Event):
    kind: ClassVar[str] = "stream_closed"
    level: ClassVar[str] = "debug"  # like StreamAllowed: every stream is in the audit; the log says it at debug

    peer: str
    fingerprint: str
    stream_id: int
    target: str
    bytes_in: int
    bytes_out: int
    duration: float
    reason: str

    def message(self) -> str:
        return (f"stream {self.stream_id}: {self.peer} -> {self.target} closed "
                f"({self.bytes_in} B in, {self.bytes_out} B out): {self.reason}")


@dataclass(frozen=True)
class NodeStarted(Event):
    kind: ClassVar[str] = "node_started"

    name: str
    fingerprint: str
    listen: str
    socks: str
    suites: str

    def message(self) -> str:
        return (f"node {self.name} ({self.fingerprint}) listening on {self.listen}, "
                f"SOCKS on {self.socks}, suites {self.suites}")


@dataclass(frozen=True)
class NodeStopping(Event):
    kind: ClassVar[str] = "node_stopping"

    signal: str
    sessions: int

    def message(self) -> str:
        return f"shutting down ({self.signal}): closing {self.sessions} session(s)"


@dataclass(frozen=True)
class ConfigReloaded(Event):
    """``pqtunnel reload`` or SIGHUP: the new configuration is in force (``ok``), or it was
    refused and the previous one stays (``reason`` names the file, line or policy test).
    ``policy`` summarises the ``[policy]`` now in force; ``closed_sessions`` and
    ``closed_streams`` count what the new policy no longer allowed."""

    kind: ClassVar[str] = "config_reloaded"

    ok: bool
    reason: str
    path: str = ""
    policy: str = ""
    closed_sessions: int = 0
    closed_streams: int = 0

    @property
    def level(self) -> str:  # type: ignore[override]
        return "info" if self.ok else "error"

    def message(self) -> str:
        if not self.ok:
            return f"configuration refused, the previous one stays in force: {self.reason}"
        return (f"configuration reloaded from {self.path or 'the config file'} (policy: {self.policy or 'none'}); "
                f"closed {self.closed_sessions} session(s) and {self.closed_streams} stream(s) the policy no longer allows")


@dataclass(frozen=True)
class StoreHealthChanged(Event):
    """The HA nonce store (docs/ha.md) started answering or stopped: without it no replica
    reserves counters, so nothing is sent under keys shared between replicas."""

    kind: ClassVar[str] = "store_health"

    store: str
    healthy: bool
    detail: str

    @property
    def level(self) -> str:  # type: ignore[override]
        return "info" if self.healthy else "warning"

    def message(self) -> str:
        if self.healthy:
            return f"nonce store {self.store} answers ({self.detail})"
        return (f"nonce store {self.store} unreachable ({self.detail}): "
                f"refusing to send under shared keys until it answers")


@dataclass(frozen=True)
class StoreDataRefused(Event):
    """The store held a value that is corrupt or not ours: refused, never trusted."""

    kind: ClassVar[str] = "store_data_refused"
    level: ClassVar[str] = "error"

    store: str
    key: str
    reason: str

    def message(self) -> str:
        return f"nonce store {self.store}: refused the data of {self.key}: {self.reason}"


@dataclass(frozen=True)
class CounterBlockReserved(Event):
    """A counter lease asked the nonce store for a block (docs/ha.md): ``result`` is how the
    store answered (``granted``, ``mark_moved``, ``key_missing``, ``unanswered``, ``refused``),
    ``seconds`` how long the answer took (measured by the caller)."""

    kind: ClassVar[str] = "counter_block_reserved"
    level: ClassVar[str] = "debug"  # one per block: the metrics count them, the log need not

    store: str
    key: str
    result: str
    seconds: float

    def message(self) -> str:
        return f"nonce store {self.store}: block for {self.key} {self.result} in {self.seconds * 1000:.1f} ms"


@dataclass(frozen=True)
class StoreChecked(Event):
    """One health check of the nonce store and how long it took (a change of health is
    StoreHealthChanged as well)."""

    kind: ClassVar[str] = "store_checked"
    level: ClassVar[str] = "debug"

    store: str
    healthy: bool
    seconds: float

    def message(self) -> str:
        return f"nonce store {self.store} {'answers' if self.healthy else 'does not answer'} ({self.seconds * 1000:.1f} ms)"


@dataclass(frozen=True)
class PeerMigrated(Event):
    """A peer trusted through a legacy anchor (``method``: ``migrated:ssh``) had its hybrid
    fingerprint pinned for good: from now on the pin decides, not the classical key."""

    kind: ClassVar[str] = "peer_migrated"

    peer: str
    fingerprint: str
    method: str

    def message(self) -> str:
        return f"peer {self.peer} migrated ({self.method}): {self.fingerprint} is now pinned"


@dataclass(frozen=True)
class SessionMoved(Event):
    """A session continued on another replica of a node without a new handshake (docs/ha.md):
    logged by the initiator that resumed it and by the replica that took it over."""

    kind: ClassVar[str] = "session_moved"

    peer: str
    fingerprint: str
    addr: str
    direction: str
    session_id: str
    replica: str
    migrations: int

    def message(self) -> str:
        where = f"replica {self.replica}" if self.replica else "another replica"
        return f"session {self.session_id} with {self.peer} moved to {where} at {self.addr} (move {self.migrations})"


@dataclass(frozen=True)
class ResumeRefused(Event):
    """A RESUME that this replica would not continue: unknown or replayed session, keys that
    do not match, a peer the policy refuses, or a store that does not answer."""

    kind: ClassVar[str] = "resume_refused"
    level: ClassVar[str] = "warning"

    addr: str
    session_id: str
    reason: str
    fault: Fault

    def message(self) -> str:
        return f"RESUME of session {self.session_id} from {self.addr} refused: {self.reason}"
