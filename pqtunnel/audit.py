"""The audit chain: hash-chained JSON lines, their verification, and the compliance report.

Sans-IO: this module turns records into bytes and bytes back into verdicts; the file
writer, rotation and reading live in the application (``daemon/audit.py``). The format is
specified byte for byte in ``docs/audit.md``; in short:

* A record is a flat JSON object. Its **body** is the record plus ``"prev"`` (the previous
  line's hash, 64 lowercase hex digits), encoded canonically: keys sorted, no whitespace
  (separators ``,`` and ``:``), ASCII only (``\\uXXXX`` escapes), no NaN or infinity.
* ``hash`` = SHA-256 of the body's bytes, as 64 lowercase hex digits. It covers every field
  and ``prev``, so each line commits to the whole chain before it.
* The **line** is the body with ``,"hash":"<hash>"`` inserted before its final ``}``, then
  ``\\n``. A verifier needs no JSON canonicalisation: it cuts the fixed-size hash suffix
  off the bytes as stored and hashes what is left (plus the closing brace).
* The first line of a chain is an ``audit_opened`` record with ``"chain": "new"``, whose
  ``prev`` is a random 256-bit anchor. Every later line, also the first line of a rotated
  file, has the previous line's hash as ``prev``.

Why bytes and not re-encoded JSON: a float or an escape encoded differently by another
JSON library must not turn an intact file into a "changed" one; the writer is canonical so
that the same record always gives the same line, and the verifier trusts only the bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .crypto.suites import SUITES
from .entropy import SYSTEM_ENTROPY, Entropy
from .errors import PqtunnelError
from .events import Event
from .mux import ErrorCode
from .policy import UNTRUSTED, Decision, PeerRequest, Rule, StreamRequest

HASH_HEX_LENGTH = 64
HASH_SUFFIX_PREFIX = b',"hash":"'
HASH_SUFFIX_LENGTH = len(HASH_SUFFIX_PREFIX) + HASH_HEX_LENGTH + len(b'"}')
_HEX64 = re.compile(rb"[0-9a-f]{64}")

OPENED = "audit_opened"
"""The record the writer puts first in a chain (``chain: new``) and after each restart
(``chain: continued``): which node, from which software, continuing what."""
GAP = "audit_gap"
"""The record written when the file can be written again: how many events were lost."""
CHAIN_NEW, CHAIN_CONTINUED = "new", "continued"

NOT_AUDITED = frozenset({"peer_unreachable", "counter_block_reserved", "store_checked"})
"""Event kinds the audit skips: dial failures and the nonce store's routine answers (metrics
count those) say nothing about who reached what."""

RULE_AUDIT_REQUIRED = "audit-required"
"""The rule that refuses new sessions and streams while a required audit cannot be written."""


class AuditFormatError(PqtunnelError):
    """A line is not an audit line (bad JSON, missing or malformed chain fields)."""


# --- encoding ------------------------------------------------------------------------------------


def canonical_body(record: Mapping[str, Any], prev: str) -> bytes:
    """The bytes the hash covers: the record plus ``prev``, keys sorted, compact, ASCII."""
    if "hash" in record or "prev" in record:
        raise ValueError("a record must not carry the chain fields 'prev' or 'hash'")
    if not _HEX64.fullmatch(prev.encode()):
        raise ValueError(f"prev must be {HASH_HEX_LENGTH} lowercase hex digits")
    return json.dumps({**record, "prev": prev}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True, allow_nan=False).encode("ascii")


def line_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def encode_line(record: Mapping[str, Any], prev: str) -> tuple[bytes, str]:
    """One audit line (with its newline) for ``record`` chained after ``prev``, and its hash."""
    body = canonical_body(record, prev)
    digest = line_hash(body)
    return body[:-1] + HASH_SUFFIX_PREFIX + digest.encode("ascii") + b'"}\n', digest


def new_anchor(entropy: Entropy = SYSTEM_ENTROPY) -> str:
    """The random ``prev`` of a new chain's first line: 256 bits, so no two chains share one."""
    return entropy.random_bytes(32).hex()


@dataclass(frozen=True)
class AuditLine:
    """One decoded line: its fields (without ``hash``; ``prev`` included) and its hash."""

    fields: dict[str, Any]
    hash: str
    hash_ok: bool

    @property
    def prev(self) -> str:
        return self.fields["prev"]


def decode_line(data: bytes) -> AuditLine:
    """Parse one line (without its newline); ``hash_ok`` says whether the hash matches."""
    if len(data) <= HASH_SUFFIX_LENGTH or not data.endswith(b'"}'):
        raise AuditFormatError("not an audit line (no hash at its end)")
    suffix = data[-HASH_SUFFIX_LENGTH:]
    digest = suffix[len(HASH_SUFFIX_PREFIX):-2]
    if not suffix.startswith(HASH_SUFFIX_PREFIX) or not _HEX64.fullmatch(digest):
        raise AuditFormatError("not an audit line (no hash at its end)")
    body = data[:-HASH_SUFFIX_LENGTH] + b"}"
    try:
        fields = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise AuditFormatError("not an audit line (its body is not JSON)") from None
    if not isinstance(fields, dict) or "hash" in fields:
        raise AuditFormatError("not an audit line (its body is not a JSON object without 'hash')")
    prev = fields.get("prev")
    if not isinstance(prev, str) or not _HEX64.fullmatch(prev.encode()):
        raise AuditFormatError("not an audit line (no valid 'prev')")
    return AuditLine(fields, digest.decode("ascii"), line_hash(body) == digest.decode("ascii"))


# --- records from events -------------------------------------------------------------------------

_DECISIONS = {"stream_allowed": "allow", "stream_denied": "deny", "session_up": "allow"}


def record_for(event: Event, ts: str) -> dict[str, Any] | None:
    """The audit record of ``event`` stamped ``ts``, or None for events the audit skips.

    The record is the event's own fields (so the log, the audit and the metrics tell the
    same story) plus ``ts`` and, for decisions, ``decision`` (``allow``/``deny``). Empty
    values (None, "") are left out: an absent field means "not known for this event".
    """
    if event.kind in NOT_AUDITED:
        return None
    record: dict[str, Any] = {"ts": ts}
    record.update((k, v) for k, v in event.fields().items() if v is not None and v != "")
    decision = _DECISIONS.get(event.kind)
    if decision is None and event.kind == "handshake_failed" and "rule" in record:
        decision = "deny"  # refused by a rule of ours, not a network failure
    if decision is not None:
        record.setdefault("decision", decision)
    return record


# --- verification --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawLine:
    """One stored line: where it is (``source`` file name, 1-based ``number``) and its bytes
    without the newline; ``terminated`` is False for a last line that has no newline."""

    source: str
    number: int
    data: bytes
    terminated: bool = True

    @property
    def where(self) -> str:
        return f"{self.source} line {self.number}"


def split_lines(source: str, data: bytes) -> list[RawLine]:
    """A file's bytes as lines; a final line without ``\\n`` is kept, marked unterminated."""
    parts = data.split(b"\n")
    lines = [RawLine(source, i + 1, part) for i, part in enumerate(parts[:-1])]
    if parts[-1]:
        lines.append(RawLine(source, len(parts), parts[-1], terminated=False))
    return lines


@dataclass(frozen=True)
class Problem:
    """The first thing wrong with a chain: where, what kind, and a one-line explanation.

    ``kind`` is one of ``changed``, ``inserted``, ``removed``, ``reordered``, ``truncated``.
    """

    source: str
    number: int
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.source} line {self.number}: {self.message}"


@dataclass(frozen=True)
class Verification:
    """The verdict on a chain: ``ok`` with the number of lines, the anchor the chain starts
    from and the hash of its last line (ship that off-host), or the first ``problem``."""

    lines: int
    anchor: str | None
    last_hash: str | None
    problem: Problem | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"ok": self.ok, "lines": self.lines, "anchor": self.anchor,
                                "last_hash": self.last_hash}
        if self.problem is not None:
            data["problem"] = {"file": self.problem.source, "line": self.problem.number,
                               "kind": self.problem.kind, "message": self.problem.message}
        return data


class _Broken(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(str(problem))
        self.problem = problem


def verify(lines: Sequence[RawLine]) -> Verification:
    """Check a whole chain (all files, oldest first) and name the first line that is wrong.

    Every line must decode, its hash must match its bytes, and its ``prev`` must be the hash
    of the line before it; the very first line must be a new chain's ``audit_opened``. When
    a ``prev`` points elsewhere the verdict says which way: to an earlier line (the lines in
    between were inserted), to a later line (reordered), or nowhere (lines were removed).
    """
    decoded: list[AuditLine] = []
    try:
        for raw in lines:
            decoded.append(_decode_checked(raw))
        _check_links(lines, decoded)
    except _Broken as broken:
        return Verification(len(decoded), decoded[0].prev if decoded else None, None, broken.problem)
    if not decoded:
        return Verification(0, None, None)
    return Verification(len(decoded), decoded[0].prev, decoded[-1].hash)


def _decode_checked(raw: RawLine) -> AuditLine:
    if not raw.terminated:
        raise _Broken(Problem(raw.source, raw.number, "truncated",
                              "truncated: the file ends inside this line (no newline)"))
    try:
        line = decode_line(raw.data)
    except AuditFormatError as exc:
        raise _Broken(Problem(raw.source, raw.number, "changed", f"changed: {exc}")) from None
    if not line.hash_ok:
        raise _Broken(Problem(raw.source, raw.number, "changed",
                              "changed: its hash does not match its content"))
    return line


def _check_links(lines: Sequence[RawLine], decoded: Sequence[AuditLine]) -> None:
    if not decoded:
        return
    first = decoded[0].fields
    if first.get("event") != OPENED or first.get("chain") != CHAIN_NEW:
        raise _Broken(Problem(lines[0].source, lines[0].number, "removed",
                              "removed: the chain does not start here (the lines or files before it are missing)"))
    position = {line.hash: i for i, line in enumerate(decoded)}
    for i in range(1, len(decoded)):
        if decoded[i].prev != decoded[i - 1].hash:
            raise _Broken(_diagnose(lines, decoded, position, i))


def _diagnose(lines: Sequence[RawLine], decoded: Sequence[AuditLine], position: Mapping[str, int],
              i: int) -> Problem:
    """Line ``i`` does not follow line ``i - 1``: say which line is the first culprit."""
    target = position.get(decoded[i].prev)
    if target is not None and target < i - 1:  # lines target+1 .. i-1 were slipped in
        culprit = lines[target + 1]
        return Problem(culprit.source, culprit.number, "inserted",
                       f"inserted: not part of the chain ({lines[i].where} follows {lines[target].where})")
    if target is not None and target > i:
        return Problem(lines[i].source, lines[i].number, "reordered",
                       f"reordered: it follows {lines[target].where}, which comes after it")
    return Problem(lines[i].source, lines[i].number, "removed",
                   "removed: the line(s) before this one are missing")


# --- the compliance report -----------------------------------------------------------------------


def is_post_quantum(record: Mapping[str, Any]) -> bool:
    """A session is post-quantum when its key exchange includes ML-KEM."""
    suite = SUITES.get(str(record.get("suite", "")))
    if suite is not None:
        return suite.is_hybrid
    return "ML-KEM" in str(record.get("kem", ""))


@dataclass
class _Session:
    peer: str = ""
    fingerprint: str = ""
    addr: str = ""
    suite: str = ""
    kem: str = ""
    signature: str = ""
    aead: str = ""
    started: str = ""
    bytes: int = 0
    ended: bool = False

    def take(self, record: Mapping[str, Any]) -> None:
        for name in ("peer", "fingerprint", "addr", "suite", "kem", "signature", "aead"):
            value = record.get(name)
            if isinstance(value, str) and value and not getattr(self, name):
                setattr(self, name, value)

    @property
    def post_quantum(self) -> bool:
        return is_post_quantum({"suite": self.suite, "kem": self.kem})


@dataclass
class _Tally:
    sessions: int = 0
    bytes: int = 0

    def add(self, session: _Session) -> None:
        self.sessions += 1
        self.bytes += session.bytes


@dataclass
class _Report:
    lines: int = 0
    first: str | None = None
    last: str | None = None
    sessions: dict[str, _Session] = field(default_factory=dict)
    streams: dict[str, int] = field(default_factory=lambda: {"allowed": 0, "denied": 0, "closed": 0})
    denials: dict[str, int] = field(default_factory=dict)
    handshakes_failed: int = 0
    lost_events: int = 0
    nodes: list[str] = field(default_factory=list)
    reloads: dict[str, int] = field(default_factory=lambda: {"applied": 0, "refused": 0})
    migrations: list[dict[str, Any]] = field(default_factory=list)


_STREAM_COUNTS = {"stream_allowed": "allowed", "stream_denied": "denied", "stream_closed": "closed"}


def build_report(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The compliance summary an auditor asks for, from parsed audit records (any order of
    files already verified or not: the report trusts what it is given).

    Sessions and bytes per suite, KEM, signature and AEAD; the share of sessions and of bytes
    that were post-quantum; the legacy (non-PQ) sessions and whose they were; denials by
    rule; the peers never seen with a post-quantum suite.
    """
    state = _Report()
    for record in records:
        _take(state, record)
    return _summarise(state)


def _take(state: _Report, record: Mapping[str, Any]) -> None:
    state.lines += 1
    ts = record.get("ts")
    if isinstance(ts, str):
        state.first = state.first or ts
        state.last = ts
    event = record.get("event")
    if event in ("session_up", "session_down"):
        key = str(record.get("session_id") or f"line-{state.lines}")
        session = state.sessions.setdefault(key, _Session())
        session.take(record)
        if event == "session_up":
            session.started = session.started or str(ts or "")
        else:
            session.ended = True
            session.bytes = _int(record.get("bytes_in")) + _int(record.get("bytes_out"))
    elif event in _STREAM_COUNTS:
        state.streams[_STREAM_COUNTS[event]] += 1
    elif event == "handshake_failed":
        state.handshakes_failed += 1
    elif event == GAP:
        state.lost_events += _int(record.get("lost"))
    elif event == OPENED and isinstance(record.get("node"), str) and record["node"] not in state.nodes:
        state.nodes.append(record["node"])
    elif event == "config_reloaded":  # a policy loaded (ok) or refused, the previous one staying
        state.reloads["applied" if record.get("ok") is True else "refused"] += 1
    elif event == "peer_migrated":  # a peer pinned through a legacy anchor (docs/migration.md)
        state.migrations.append({k: record.get(k) for k in ("ts", "peer", "fingerprint", "method")})
    if record.get("decision") == "deny":
        rule = str(record.get("rule") or "unknown")
        state.denials[rule] = state.denials.get(rule, 0) + 1


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _summarise(state: _Report) -> dict[str, Any]:
    sessions = list(state.sessions.values())
    per: dict[str, dict[str, _Tally]] = {"suite": {}, "kem": {}, "signature": {}, "aead": {}}
    for session in sessions:
        for name, table in per.items():
            table.setdefault(getattr(session, name) or "unknown", _Tally()).add(session)
    pq = [s for s in sessions if s.post_quantum]
    total_bytes = sum(s.bytes for s in sessions)
    pq_bytes = sum(s.bytes for s in pq)
    return {
        "nodes": state.nodes,
        "lines": state.lines,
        "first": state.first,
        "last": state.last,
        "sessions": len(sessions),
        "bytes": total_bytes,
        **{f"by_{name}": {k: {"sessions": t.sessions, "bytes": t.bytes} for k, t in sorted(table.items())}
           for name, table in per.items()},
        "post_quantum": {
            "sessions": len(pq),
            "bytes": pq_bytes,
            "share_of_sessions": _percent(len(pq), len(sessions)),
            "share_of_bytes": _percent(pq_bytes, total_bytes),
        },
        "legacy_sessions": [_legacy_row(s) for s in sessions if not s.post_quantum],
        "denials": {"total": sum(state.denials.values()), "by_rule": dict(sorted(state.denials.items()))},
        "streams": dict(state.streams),
        "handshakes_failed": state.handshakes_failed,
        "reloads": dict(state.reloads),
        "migrations": state.migrations,
        "peers_never_post_quantum": _peers_never_pq(sessions),
        "lost_events": state.lost_events,
    }


def _percent(part: int, whole: int) -> float | None:
    """``part`` as a percentage of ``whole`` (None when there is nothing to divide)."""
    return round(100.0 * part / whole, 2) if whole else None


def _legacy_row(session: _Session) -> dict[str, Any]:
    return {"peer": session.peer, "fingerprint": session.fingerprint, "addr": session.addr,
            "suite": session.suite, "kem": session.kem, "signature": session.signature, "aead": session.aead,
            "started": session.started, "bytes": session.bytes}


def _peers_never_pq(sessions: Sequence[_Session]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for session in sessions:
        row = seen.setdefault(session.peer or "unknown", {"peer": session.peer or "unknown", "sessions": 0,
                                                          "post_quantum": False, "fingerprints": set()})
        row["sessions"] += 1
        row["post_quantum"] = row["post_quantum"] or session.post_quantum
        if session.fingerprint:
            row["fingerprints"].add(session.fingerprint)
    return [{"peer": row["peer"], "sessions": row["sessions"], "fingerprints": sorted(row["fingerprints"])}
            for _, row in sorted(seen.items()) if not row["post_quantum"]]


# --- the policy rule -----------------------------------------------------------------------------


def audit_required_rule(refusal: Callable[[], str | None]) -> Rule:
    """A Policy rule (for ``extra_rules``, ahead of all others) that refuses every new
    session and stream while ``refusal()`` names a reason, i.e. while an audit that
    ``[audit] required`` cannot be written: nothing happens that the audit would miss."""

    def rule(request: Any) -> Decision | None:
        reason = refusal()
        if reason is None:
            return None
        if isinstance(request, PeerRequest):
            return Decision(False, RULE_AUDIT_REQUIRED, f"{reason}: refusing new sessions",
                            name=request.dialled, trust=UNTRUSTED)
        if isinstance(request, StreamRequest):
            return Decision(False, RULE_AUDIT_REQUIRED, f"{reason}: refusing new streams", code=ErrorCode.NOT_ALLOWED)
        return None

    return rule
