"""The encrypted record layer (sans-IO).

    length u32 | kind u8 (0x10) | session_id [8] | counter u64 | AEAD(content_type u8 | data)

The 21-byte header is the AEAD's associated data; the nonce is ``0x00000000 | counter``
(big-endian), so it is explicit on the wire. Counters strictly increase per direction;
gaps are allowed (a replica taking over jumps ahead), repeats and reordering are refused.
Counters never restart, not even across rekeys, so a (key, nonce) pair cannot repeat.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Protocol

from .crypto.backend import InvalidTag, make_aead
from .crypto.suites import Aead
from .errors import CounterReplayError, OversizedRecordError, RecordAuthError, RecordError, SessionIdMismatchError
from .wire import MAX_RECORD_PLAINTEXT, Kind

RECORD_HEADER = struct.Struct(">IB8sQ")
RECORD_PREFIX = struct.Struct(">8sQ")  # the part of the header inside the frame body
NONCE_PREFIX = b"\x00\x00\x00\x00"
MAX_COUNTER = 2**64 - 1
TAG_SIZE = 16


class ContentType(IntEnum):
    DATA = 0x00
    PING = 0x01
    PONG = 0x02
    CLOSE = 0x03
    REKEY_INIT = 0x10
    REKEY_RESP = 0x11
    REKEY_DONE = 0x12
    RESUME = 0x20
    """Initiator, first record on a new connection to another replica: continue this session."""
    RESUMED = 0x21
    """Replica's answer to RESUME: it holds the session keys and took over the session."""
    REPLICA = 0x22
    """Responder to initiator, after key confirmation: I am replica <name> of an HA node, so a
    lost connection may be resumed at the node's other addresses."""
    TICKET = 0x23
    """Responder to initiator: a resumption ticket grant (pqtunnel/tickets.py)."""
    RESUME_CONFIRM = 0x24
    """Initiator, first record after RESUMED: the replica's challenge echoed (freshness)."""


class CounterSource(Protocol):
    """Where a record layer whose keys are shared by replicas takes its send counters.

    ``next_counter`` hands out counters of durably reserved blocks only (pqtunnel/leases.py);
    it raises NoCounterError when none is in hand (LeaseStoppedError: never again).
    """

    @property
    def available(self) -> int: ...

    def next_counter(self) -> int: ...


class RecordLayer:
    """Seals and opens records for one session; keys can be replaced in place (rekey)."""

    def __init__(self, aead: Aead, send_key: bytes, recv_key: bytes, session_id: bytes, *,
                 first_send_counter: int = 0) -> None:
        if len(session_id) != 8:
            raise ValueError("session id must be 8 bytes")
        self.aead = aead
        self.session_id = session_id
        self._sealer = make_aead(aead, send_key)
        self._opener = make_aead(aead, recv_key)
        self._keys = (send_key, recv_key)
        self.next_send_counter = first_send_counter
        self.last_recv_counter = -1
        self.counters: CounterSource | None = None
        """Set on a replica's shared-key session: counters then come only from reserved blocks."""

    def set_send_key(self, key: bytes) -> None:
        self._sealer = make_aead(self.aead, key)
        self._keys = (key, self._keys[1])

    def set_recv_key(self, key: bytes) -> None:
        self._opener = make_aead(self.aead, key)
        self._keys = (self._keys[0], key)

    @property
    def keys(self) -> tuple[bytes, bytes]:
        """(send key, receive key) now: what a replica's session snapshot wraps (handover.py)."""
        return self._keys

    def seal(self, content_type: ContentType, data: bytes | memoryview = b"") -> bytes:
        """Encrypt one record and return the complete frame."""
        header, ciphertext = self.seal_parts(content_type, data)
        return header + ciphertext

    def seal_parts(self, content_type: ContentType, data: bytes | memoryview = b"") -> tuple[bytes, bytes]:
        """Encrypt one record; returns (header, ciphertext) so the sender can scatter-gather."""
        if len(data) > MAX_RECORD_PLAINTEXT:
            raise OversizedRecordError(f"record of {len(data)} bytes exceeds {MAX_RECORD_PLAINTEXT}")
        return self._encrypt(bytes((content_type,)) + data)

    def seal_prepared(self, content_type: ContentType, buffer: bytearray) -> tuple[bytes, bytes]:
        """seal_parts for a plaintext built in place, without copying it: ``buffer[0]`` is
        free for the content type (written here) and the record's data follows.

        The bulk path: the multiplexer builds its batches this way (mux.BATCH_RESERVED).
        """
        if not buffer:
            raise RecordError("a prepared record needs its reserved content-type byte")
        if len(buffer) - 1 > MAX_RECORD_PLAINTEXT:
            raise OversizedRecordError(f"record of {len(buffer) - 1} bytes exceeds {MAX_RECORD_PLAINTEXT}")
        buffer[0] = content_type
        return self._encrypt(buffer)

    def _encrypt(self, plaintext: bytes | bytearray) -> tuple[bytes, bytes]:
        """(header, ciphertext) of the record whose plaintext is content type + data."""
        counter = self._take_counter()
        length = 1 + RECORD_PREFIX.size + len(plaintext) + TAG_SIZE
        header = RECORD_HEADER.pack(length, Kind.RECORD, self.session_id, counter)
        return header, self._sealer.encrypt(NONCE_PREFIX + counter.to_bytes(8, "big"), plaintext, header)

    def _take_counter(self) -> int:
        """The next send counter: local and increasing, or from the reserved blocks (HA)."""
        if self.counters is not None:
            counter = self.counters.next_counter()  # raises NoCounterError: nothing is sealed
            if counter < self.next_send_counter:
                raise RecordError(f"reserved counter {counter} is below {self.next_send_counter}: refusing to reuse")
        else:
            counter = self.next_send_counter
        if counter > MAX_COUNTER:
            raise RecordError("send counter exhausted; the session must be replaced")
        self.next_send_counter = counter + 1
        return counter

    def open(self, body: bytes | memoryview) -> tuple[ContentType, memoryview]:
        """Authenticate and decrypt a RECORD frame body; raises a RecordError subclass.

        The data comes back as a memoryview of the plaintext: no copy on the hot path.
        """
        if len(body) < RECORD_PREFIX.size + 1 + TAG_SIZE:
            raise RecordError(f"record of {len(body)} bytes is too short")
        session_id, counter = RECORD_PREFIX.unpack_from(body)
        if session_id != self.session_id:
            raise SessionIdMismatchError(f"record for session {session_id.hex()}, this is {self.session_id.hex()}")
        if counter <= self.last_recv_counter:
            raise CounterReplayError(f"record counter {counter} is not above {self.last_recv_counter} (replay or reorder)")
        header = RECORD_HEADER.pack(len(body) + 1, Kind.RECORD, session_id, counter)
        try:
            plaintext = self._opener.decrypt(NONCE_PREFIX + counter.to_bytes(8, "big"), body[RECORD_PREFIX.size :], header)
        except InvalidTag:
            raise RecordAuthError(f"record {counter} failed authentication") from None
        self.last_recv_counter = counter
        try:
            content_type = ContentType(plaintext[0])
        except ValueError:
            raise RecordError(f"record {counter} has unknown content type 0x{plaintext[0]:02x}") from None
        return content_type, memoryview(plaintext)[1:]
