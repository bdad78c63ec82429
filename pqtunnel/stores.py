"""Store interfaces: where the library's long-lived state is kept between runs.

The library is sans-IO: it holds identities, pins and CA state in memory and never opens a
file. An application persists that state by implementing these protocols; the daemon's
file-backed implementations are in ``pqtunneld.stores`` (``daemon/stores.py``), and tests
may use in-memory ones.

``NonceStore`` is the shared store of HA replicas (docs/ha.md): counter-lease high-water
marks changed only by compare-and-swap, single-use records (resumption tickets, the
handshake anti-replay cache), and opaque session-state blobs for migration (wrapped by the
caller; deleting one also makes the store forget its history). Its backends (SQLite, etcd)
are in the application (``pqtunneld.noncestore``); ``StoreCodec`` is the one format of the
marks they hold, so every backend refuses corrupt or foreign data the same way.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .ca import Certificate
from .entropy import SYSTEM_ENTROPY, Entropy
from .errors import StateTooLargeError, StoreDataError, StoreKeyError
from .identity import Identity, PublicIdentity
from .leases import MAX_MARK, ReserveResult
from .trust import TrustedPeer


@runtime_checkable
class IdentityStore(Protocol):
    """Keeps this node's private identity."""

    def load(self) -> Identity:
        """The stored identity; IdentityError when there is none or it is unusable or unsafe."""
        ...

    def create(self, name: str, entropy: Entropy = SYSTEM_ENTROPY) -> Identity:
        """Generate and keep a new identity; IdentityExistsError rather than replace one."""
        ...


@runtime_checkable
class PinStore(Protocol):
    """Keeps the pinned peers (``TrustStore.from_peers(store.pins())`` is the live table)."""

    def pins(self) -> list[TrustedPeer]:
        """Every pin, in the order they were added (a later pin for a name wins)."""
        ...

    def add(self, name: str, fingerprint: str) -> bool:
        """Persist a pin; False if it was already there, PinConflictError if the name has another."""
        ...


@runtime_checkable
class CaStore(Protocol):
    """A node's view of its network CA: the CA key, the revocation list and its own certificate."""

    def ca_public(self) -> PublicIdentity | None:
        """The CA public key peers' certificates must be signed by (None: no CA configured)."""
        ...

    def revoked(self) -> Collection[str]:
        """The revoked serials now; CertificateError if the list cannot be known (fail closed)."""
        ...

    def own_certificate(self) -> Certificate | None:
        """The certificate this node presents in handshakes (None: it has none)."""
        ...


# --- the shared nonce store of HA replicas ------------------------------------------------------------


@dataclass(frozen=True)
class StoreHealth:
    """Whether the store answers now, and a short detail for ``pqtunnel status``."""

    ok: bool
    detail: str


@runtime_checkable
class NonceStore(Protocol):
    """Counter-lease marks, single-use records and session states, shared by the replicas of one node.

    Every method is one atomic, durable step. A method that cannot know its outcome (no
    answer in time) raises StoreUnavailableError; data that fails ``StoreCodec`` checks
    raises StoreDataError and is never used.
    """

    kind: str
    """``local`` or ``etcd``: what ``pqtunnel status`` names."""

    async def read_mark(self, key_id: str) -> int | None:
        """The stored high-water mark of ``key_id`` (None: no mark stored)."""
        ...

    async def reserve(self, key_id: str, expected_mark: int | None, new_mark: int) -> ReserveResult:
        """Compare-and-swap the mark: set ``new_mark`` only if the mark is ``expected_mark``.

        ``expected_mark`` None: only if no mark exists (create). Returns Granted,
        MarkMoved(current) or KeyMissing (pqtunnel/leases.py).
        """
        ...

    async def delete(self, key_id: str) -> None:
        """Forget ``key_id``'s mark, once no replica will ever seal under that key again."""
        ...

    async def use_once(self, kind: str, record_id: str, ttl_s: float) -> bool:
        """Record one use of ``(kind, record_id)``: True the first time, False ever after.

        The record is kept at least ``ttl_s`` seconds, so it must outlive whatever it
        protects (a ticket's lifetime, the replay window): the TLS 1.3 anti-replay model.
        """
        ...

    async def put_state(self, state_id: str, blob: bytes) -> None:
        """Durably store (replace) the blob under state_id.

        The blob is opaque: the caller has already wrapped it (encrypted and authenticated
        under a key only the node's replicas derive). At most ``MAX_STATE_SIZE`` bytes;
        bigger raises StateTooLargeError.
        """
        ...

    async def get_state(self, state_id: str) -> bytes | None:
        """The stored blob, or None."""
        ...

    async def delete_state(self, state_id: str) -> None:
        """Forget the blob, and make the store forget its history (forward secrecy).

        SQLite: delete with ``secure_delete`` on (freed pages are zeroed), then a WAL
        ``checkpoint(TRUNCATE)``. etcd: delete, then compact the keyspace history up to the
        current revision (physical), at most one compaction per ``COMPACT_INTERVAL``
        seconds, a trailing one after the last delete. Returns once a compaction (or
        checkpoint) that began after this delete has finished, so older history is gone
        too (an earlier replaced blob, other deleted blobs). Idempotent: after
        StoreUnavailableError, call it again.
        """
        ...

    async def list_states(self, prefix: str) -> list[str]:
        """The stored state ids that start with ``prefix`` (any of ``[A-Za-z0-9._:-]``, or empty), sorted."""
        ...

    async def health(self) -> StoreHealth:
        ...

    async def aclose(self) -> None:
        ...


_STORE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_STATE_PREFIX = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._:-]{0,127})?$")
MAX_STATE_SIZE = 64 * 1024
"""The largest session-state blob a NonceStore holds (a wrapped session state is far smaller)."""
_MARK_PREFIX = "pqtunnel-mark/1"
_TAG_SIZE = 16
_STORE_KEY_LABEL = b"pqtunnel store integrity v1\x00"


def check_store_id(value: str, what: str = "key id") -> str:
    """Ids become etcd keys and SQLite rows: short, printable, no separators of our own."""
    if not isinstance(value, str) or not _STORE_ID.fullmatch(value):
        raise StoreKeyError(f"{what} {value!r} is not 1-128 of [A-Za-z0-9._:-]")
    return value


def check_state(state_id: str, blob: bytes) -> bytes:
    """A session-state blob the store can hold: a valid id, bytes, at most ``MAX_STATE_SIZE``."""
    check_store_id(state_id, "state id")
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise StoreKeyError(f"the state of {state_id} must be bytes, not {type(blob).__name__}")
    blob = bytes(blob)
    if len(blob) > MAX_STATE_SIZE:
        raise StateTooLargeError(f"the state of {state_id} is {len(blob)} bytes, more than {MAX_STATE_SIZE}")
    return blob


def check_state_prefix(prefix: str) -> str:
    """A ``list_states`` prefix: empty, or the start of a valid id."""
    if not isinstance(prefix, str) or not _STATE_PREFIX.fullmatch(prefix):
        raise StoreKeyError(f"state id prefix {prefix!r} is not 0-128 of [A-Za-z0-9._:-]")
    return prefix


def stored_state(state_id: str, blob: bytes) -> bytes:
    """A blob read back: one bigger than we ever write is not ours (StoreDataError)."""
    if len(blob) > MAX_STATE_SIZE:
        raise StoreDataError(f"stored state of {state_id} is {len(blob)} bytes, more than pqtunnel writes")
    return blob


class StoreCodec:
    """The format of a stored mark: ``pqtunnel-mark/1 <mark> <tag>``.

    The tag is an HMAC over the node's namespace, the key id and the mark, under a key only
    the node's replicas can derive (from ``identity.key``, which they share). So a value
    that is garbled, written by another node or another program, or copied from another key
    id is refused: a replica never reserves from a mark it cannot vouch for. (It cannot tell
    a genuine older value replayed by someone who can write the store: the store itself is
    trusted to be linearizable; see docs/ha.md.)
    """

    def __init__(self, namespace: str, key: bytes) -> None:
        self.namespace = namespace
        self._key = key

    @classmethod
    def for_identity(cls, identity: Identity) -> StoreCodec:
        """The codec of a node: namespace = its fingerprint, key derived from its seeds."""
        seeds = identity.ed25519_seed + b"".join(identity.pq_seeds[a] for a in sorted(identity.pq_seeds))
        return cls(identity.fingerprint, hmac.new(seeds, _STORE_KEY_LABEL, hashlib.sha256).digest())

    def _tag(self, key_id: str, mark: int) -> str:
        message = f"{self.namespace}\x00{key_id}\x00{mark}".encode()
        return hmac.new(self._key, message, hashlib.sha256).digest()[:_TAG_SIZE].hex()

    def encode_mark(self, key_id: str, mark: int) -> bytes:
        if not 0 <= mark <= MAX_MARK:
            raise StoreKeyError(f"counter mark {mark} is outside 0..2**64")
        return f"{_MARK_PREFIX} {mark} {self._tag(key_id, mark)}".encode()

    def decode_mark(self, key_id: str, value: bytes) -> int:
        """The mark in ``value``; StoreDataError unless it is a well-formed mark of ours for ``key_id``."""
        try:
            prefix, mark_text, tag = value.decode("ascii").split(" ")
            mark = int(mark_text) if mark_text.isdigit() else -1
        except (UnicodeDecodeError, ValueError):
            raise StoreDataError(f"stored mark of {key_id} is not a pqtunnel mark ({len(value)} bytes)") from None
        if prefix != _MARK_PREFIX or not 0 <= mark <= MAX_MARK:
            raise StoreDataError(f"stored mark of {key_id} is not a pqtunnel mark (format {prefix[:20]!r})")
        if not hmac.compare_digest(tag, self._tag(key_id, mark)):
            raise StoreDataError(f"stored mark of {key_id} fails its integrity check (corrupt, or another node's)")
        return mark
