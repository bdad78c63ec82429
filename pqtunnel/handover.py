"""Session handover between the replicas of one node (sans-IO): docs/ha.md, PROTOCOL.md §9.

A replica that holds a session keeps a **snapshot** of it (keys, rekey chain, epoch, the
peer's identity; never counters, which live in the nonce store's marks) in the shared
store, **wrapped**: encrypted and authenticated under a key that only the node's replicas
derive (from ``identity.key``, which they share), bound to the node and to the session's
store id. So a store's contents alone open nothing, and data that is corrupt, another
node's, or copied to another session's id is refused.

Wrapped blob (bytes)::

    "pqtunnel-session/1" [18] | salt [32] | ChaCha20-Poly1305(k, nonce 0, msgpack(snapshot), aad)
    k   = HMAC-SHA256(wrap_key, salt)           a fresh key per write: a zero nonce is safe
    aad = "pqtunnel-session/1" | 0x00 | namespace (node fingerprint) | 0x00 | state id

The RESUME exchange itself rides in ordinary records (``records.ContentType.RESUME`` and
``RESUMED``); this module builds and checks their bodies.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, replace
from typing import Any

import msgpack

from .crypto.backend import InvalidTag, make_aead
from .crypto.suites import Aead, Suite, suite_by_name
from .entropy import SYSTEM_ENTROPY, Entropy
from .errors import ConfigError, MalformedHandshakeError, RecordError, StoreDataError
from .handshake import HandshakeResult
from .identity import Identity, WireIdentity

STATE_FORMAT = b"pqtunnel-session/1"
WRAP_KEY_LABEL = b"pqtunnel session wrap v1\x00"
SALT_SIZE = 32
CHALLENGE_SIZE = 16
MAX_REPLICA_NAME = 63
ZERO_NONCE = bytes(12)


def state_id(session_id: bytes) -> str:
    """The store id of a session's snapshot: ``session.<16 hex digits>``."""
    return f"session.{session_id.hex()}"


def resume_key_id(session_id: bytes) -> str:
    """The store key whose mark is one above the counter of the latest accepted RESUME.

    Compare-and-swap on it makes each RESUME record usable once across all replicas: a
    replayed one (same or lower counter) finds the mark already past it.
    """
    return f"{session_id.hex()}.resume"


@dataclass(frozen=True)
class SessionSnapshot:
    """What another replica needs to continue a session as its responder."""

    session_id: bytes
    suite: str
    aead: Aead
    peer: dict[str, Any]
    """The peer's identity as in the handshake (``n``, ``ed``, ``h``, ``pq``), plus ``cert``/``tr``."""
    peer_name: str
    peer_static: bytes
    handshake_hash: bytes
    send_key: bytes
    recv_key: bytes
    rekey_chain: bytes
    epoch: int
    migrations: int = 0
    stored_ms: int = 0
    """Wall-clock time of this snapshot: a live session rewrites it at every rekey, so an old
    one belongs to a session nobody holds any more (``is_stale``)."""
    resumption_secret: bytes = b""
    """The session's ticket secret (pqtunnel/tickets.py), so a replica that took the session
    over can still issue tickets; empty (and not stored) when the session has none."""

    def is_stale(self, wall_ms: int, after_ms: int) -> bool:
        return wall_ms - self.stored_ms > after_ms

    @classmethod
    def of(cls, result: HandshakeResult, *, send_key: bytes, recv_key: bytes, rekey_chain: bytes,
           epoch: int, migrations: int, wall_ms: int) -> SessionSnapshot:
        """The snapshot of a live responder session, with its current epoch's keys."""
        return cls(result.session_id, result.suite.name, result.aead, peer_to_wire(result.peer), result.peer_name,
                   result.peer_static, result.handshake_hash, send_key, recv_key, rekey_chain, epoch, migrations,
                   wall_ms, result.resumption_secret)

    def result(self) -> HandshakeResult:
        """The handshake result this snapshot continues (responder side, current keys)."""
        suite = suite_by_name(self.suite)
        return HandshakeResult(is_initiator=False, suite=suite, aead=self.aead, peer=peer_from_wire(self.peer, suite),
                               peer_name=self.peer_name, peer_static=self.peer_static,
                               handshake_hash=self.handshake_hash, session_id=self.session_id,
                               send_key=self.send_key, recv_key=self.recv_key, rekey_chain=self.rekey_chain,
                               resumption_secret=self.resumption_secret)

    def to_msgpack(self) -> bytes:
        fields: dict[str, Any] = {
            "sid": self.session_id, "suite": self.suite, "aead": int(self.aead), "peer": self.peer,
            "name": self.peer_name, "static": self.peer_static, "hh": self.handshake_hash,
            "send": self.send_key, "recv": self.recv_key, "chain": self.rekey_chain,
            "epoch": self.epoch, "moves": self.migrations, "at": self.stored_ms}
        if self.resumption_secret:
            fields["res"] = self.resumption_secret
        return msgpack.packb(fields, use_bin_type=True)

    @classmethod
    def from_msgpack(cls, data: bytes) -> SessionSnapshot:
        """Decode a snapshot; StoreDataError for anything that is not one."""
        try:
            fields = msgpack.unpackb(data, raw=False, strict_map_key=True)
            snapshot = cls(
                _bytes(fields, "sid", 8), _text(fields, "suite"), Aead(_int(fields, "aead")), _map(fields, "peer"),
                _text(fields, "name"), _bytes(fields, "static"), _bytes(fields, "hh"), _bytes(fields, "send", 32),
                _bytes(fields, "recv", 32), _bytes(fields, "chain"), _int(fields, "epoch"), _int(fields, "moves"),
                _int(fields, "at"), _bytes(fields, "res", 32) if "res" in fields else b"")
            snapshot.result()  # the suite exists and the peer's identity is well formed
        except (ValueError, TypeError, KeyError, ConfigError, MalformedHandshakeError, msgpack.UnpackException) as exc:
            raise StoreDataError(f"stored session state is malformed: {exc}") from None
        return snapshot


def peer_to_wire(peer: WireIdentity) -> dict[str, Any]:
    """A peer's identity as the store keeps it: the handshake's map (``n``, ``ed``, ``h``,
    ``pq``), plus ``cert``/``tr`` when the peer presented them."""
    wire: dict[str, Any] = {"n": peer.claimed_name, "ed": peer.ed25519, "h": dict(peer.pq_key_hashes)}
    if peer.pq_key is not None:
        wire["pq"] = peer.pq_key
    if peer.certificate is not None:
        wire["cert"] = peer.certificate
    if peer.transition is not None:
        wire["tr"] = peer.transition
    return wire


def peer_from_wire(wire: dict[str, Any], suite: Suite) -> WireIdentity:
    """The inverse of ``peer_to_wire``; MalformedHandshakeError if the map is not an identity."""
    peer = WireIdentity.from_wire(wire, suite)
    return replace(peer, certificate=wire.get("cert"), transition=wire.get("tr"))


def _field(fields: Any, name: str, kind: type) -> Any:
    if not isinstance(fields, dict) or not isinstance(fields.get(name), kind) or isinstance(fields.get(name), bool):
        raise ValueError(f"field {name!r} missing or not {kind.__name__}")
    return fields[name]


def _bytes(fields: Any, name: str, size: int | None = None) -> bytes:
    value: bytes = _field(fields, name, bytes)
    if size is not None and len(value) != size:
        raise ValueError(f"field {name!r} has {len(value)} bytes, not {size}")
    return value


def _text(fields: Any, name: str) -> str:
    value: str = _field(fields, name, str)
    return value


def _int(fields: Any, name: str) -> int:
    value: int = _field(fields, name, int)
    if value < 0:
        raise ValueError(f"field {name!r} is negative")
    return value


def _map(fields: Any, name: str) -> dict[str, Any]:
    value: dict[str, Any] = _field(fields, name, dict)
    return value


class StateWrapper:
    """Wraps and unwraps session snapshots (and, with another format label, other state such
    as resumption tickets: pqtunnel/tickets.py) for the store, for one node."""

    def __init__(self, namespace: str, key: bytes, entropy: Entropy = SYSTEM_ENTROPY) -> None:
        self.namespace = namespace
        self._key = key
        self._entropy = entropy

    @classmethod
    def for_identity(cls, identity: Identity, entropy: Entropy = SYSTEM_ENTROPY) -> StateWrapper:
        """The wrapper of a node: namespace = its fingerprint, key derived from its seeds."""
        seeds = identity.ed25519_seed + b"".join(identity.pq_seeds[a] for a in sorted(identity.pq_seeds))
        return cls(identity.fingerprint, hmac.new(seeds, WRAP_KEY_LABEL, hashlib.sha256).digest(), entropy)

    def _aad(self, fmt: bytes, store_id: str) -> bytes:
        return fmt + b"\x00" + self.namespace.encode() + b"\x00" + store_id.encode()

    def _aead(self, salt: bytes) -> Any:
        return make_aead(Aead.CHACHA20_POLY1305, hmac.new(self._key, salt, hashlib.sha256).digest())

    def wrap_bytes(self, fmt: bytes, store_id: str, plain: bytes) -> bytes:
        """``fmt | salt | sealed plain``, bound to this node, ``fmt`` and ``store_id``."""
        salt = self._entropy.random_bytes(SALT_SIZE)
        return fmt + salt + self._aead(salt).encrypt(ZERO_NONCE, plain, self._aad(fmt, store_id))

    def unwrap_bytes(self, fmt: bytes, store_id: str, blob: bytes, what: str) -> bytes:
        """The plain bytes wrapped under ``fmt`` for ``store_id``; StoreDataError unless ours."""
        if not blob.startswith(fmt) or len(blob) < len(fmt) + SALT_SIZE + 16:
            raise StoreDataError(f"stored state of {store_id} is not a {what} ({len(blob)} bytes)")
        salt = blob[len(fmt) : len(fmt) + SALT_SIZE]
        try:
            return self._aead(salt).decrypt(ZERO_NONCE, blob[len(fmt) + SALT_SIZE :], self._aad(fmt, store_id))
        except InvalidTag:
            raise StoreDataError(f"stored state of {store_id} fails authentication (corrupt, or another node's)") from None

    def wrap(self, snapshot: SessionSnapshot) -> bytes:
        return self.wrap_bytes(STATE_FORMAT, state_id(snapshot.session_id), snapshot.to_msgpack())

    def unwrap(self, session_id: bytes, blob: bytes) -> SessionSnapshot:
        """The snapshot stored for ``session_id``; StoreDataError unless it is genuinely ours."""
        store_id = state_id(session_id)
        snapshot = SessionSnapshot.from_msgpack(self.unwrap_bytes(STATE_FORMAT, store_id, blob, "pqtunnel session state"))
        if snapshot.session_id != session_id:
            raise StoreDataError(f"stored state of {store_id} names session {snapshot.session_id.hex()}")
        return snapshot


# --- the RESUME exchange's bodies ---------------------------------------------------------------------


def resume_body(challenge: bytes) -> bytes:
    """RESUME: the initiator's fresh challenge, echoed by the replica that takes over."""
    return challenge


def parse_resume(body: bytes | memoryview) -> bytes:
    if len(body) != CHALLENGE_SIZE:
        raise RecordError(f"RESUME carries {len(body)} bytes, expected a {CHALLENGE_SIZE}-byte challenge")
    return bytes(body)


def resumed_body(challenge: bytes, own_challenge: bytes, replica: str) -> bytes:
    """RESUMED: the initiator's challenge echoed, the replica's own fresh challenge (echoed in
    RESUME_CONFIRM), then the replica's name (for ``sessions``)."""
    return challenge + own_challenge + replica.encode()[:MAX_REPLICA_NAME]


def parse_resumed(body: bytes | memoryview, challenge: bytes) -> tuple[bytes, str]:
    """(the replica's challenge, its name); RecordError unless our challenge is echoed."""
    if len(body) < 2 * CHALLENGE_SIZE or not hmac.compare_digest(bytes(body[:CHALLENGE_SIZE]), challenge):
        raise RecordError("RESUMED does not echo our challenge")
    replica_challenge = bytes(body[CHALLENGE_SIZE : 2 * CHALLENGE_SIZE])
    return replica_challenge, bytes(body[2 * CHALLENGE_SIZE : 2 * CHALLENGE_SIZE + MAX_REPLICA_NAME]).decode(
        errors="replace")


def check_resume_confirm(body: bytes | memoryview, challenge: bytes) -> None:
    """RESUME_CONFIRM must echo the replica's challenge: replayed records cannot, so a
    replayed RESUME (even after the store was rolled back) moves no data."""
    if len(body) != CHALLENGE_SIZE or not hmac.compare_digest(bytes(body), challenge):
        raise RecordError("RESUME_CONFIRM does not echo this replica's challenge (a replayed RESUME?)")
