"""Outer framing of everything pqtunnel sends over TCP: ``length u32 | kind u8 | body``.

``length`` counts the kind byte and the body. Handshake frames are small and bounded
tightly; records are bounded by the maximum record size. Anything else is a FramingError,
raised before a single byte of it is buffered beyond the header.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from .errors import FramingError

FRAME_HEADER = struct.Struct(">IB")


class Kind(IntEnum):
    HELLO = 0x01
    RESPONSE = 0x02
    FINISH = 0x03
    RETRY = 0x04
    ALERT = 0x05
    RESUME_HELLO = 0x06
    RESUME_ACCEPT = 0x07
    RECORD = 0x10


HANDSHAKE_KINDS = frozenset({Kind.HELLO, Kind.RESPONSE, Kind.FINISH, Kind.RETRY, Kind.ALERT,
                             Kind.RESUME_HELLO, Kind.RESUME_ACCEPT})
MAX_HANDSHAKE_FRAME = 32 * 1024
MAX_RECORD_PLAINTEXT = 256 * 1024
RECORD_OVERHEAD = 8 + 8 + 16 + 1  # session id, counter, AEAD tag, content type
MAX_RECORD_FRAME = 1 + MAX_RECORD_PLAINTEXT + RECORD_OVERHEAD


def encode_frame(kind: Kind, body: bytes) -> bytes:
    return FRAME_HEADER.pack(len(body) + 1, kind) + body


@dataclass(frozen=True)
class Frame:
    """One frame. A RECORD body is a zero-copy memoryview of the received bytes."""

    kind: Kind
    body: bytes | memoryview


def _limit_for(kind: int, max_record: int) -> int:
    if kind == Kind.RECORD:
        return max_record
    if kind in HANDSHAKE_KINDS:
        return MAX_HANDSHAKE_FRAME
    raise FramingError(f"unknown frame kind 0x{kind:02x}")


def _check_header(length: int, kind: int, max_record: int = MAX_RECORD_FRAME) -> Kind:
    if length < 1:
        raise FramingError("frame length 0")
    limit = _limit_for(kind, max_record)
    if length > limit:
        raise FramingError(f"{Kind(kind).name} frame of {length} bytes exceeds the limit of {limit}")
    return Kind(kind)


class FrameDecoder:
    """Splits a TCP byte stream into frames; keeps at most one partial frame buffered.

    Frames that arrive whole are sliced out of the received bytes without copying (this is
    the bulk-data hot path); only a frame split across reads is assembled in a buffer.
    """

    def __init__(self, max_record: int = MAX_RECORD_FRAME) -> None:
        self._buffer = bytearray()
        self.max_record = max_record  # a session keeps this small until it has keys

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        if not isinstance(data, bytes):
            data = bytes(data)  # slices must not see later mutation
        view = memoryview(data)
        frames: list[Frame] = []
        pos = self._complete_pending(view, frames) if self._buffer else 0
        if self._buffer:
            return frames
        end = len(view)
        while end - pos >= FRAME_HEADER.size:
            length, kind_value = FRAME_HEADER.unpack_from(view, pos)
            kind = _check_header(length, kind_value, self.max_record)
            stop = pos + 4 + length
            if stop > end:
                break
            body = view[pos + FRAME_HEADER.size : stop]
            frames.append(Frame(kind, body if kind is Kind.RECORD else bytes(body)))
            pos = stop
        if pos < end:
            self._buffer = bytearray(view[pos:])
            if len(self._buffer) >= FRAME_HEADER.size:
                _check_header(*FRAME_HEADER.unpack_from(self._buffer), self.max_record)  # refuse before buffering a body
        return frames

    def _complete_pending(self, view: memoryview, frames: list[Frame]) -> int:
        """Top up the buffered partial frame from ``view``; returns how much of ``view`` was used."""
        used = 0
        if len(self._buffer) < FRAME_HEADER.size:
            used = min(FRAME_HEADER.size - len(self._buffer), len(view))
            self._buffer += view[:used]
            if len(self._buffer) < FRAME_HEADER.size:
                return used
        length, kind_value = FRAME_HEADER.unpack_from(self._buffer)
        kind = _check_header(length, kind_value, self.max_record)
        missing = 4 + length - len(self._buffer)
        take = min(missing, len(view) - used)
        self._buffer += view[used : used + take]
        used += take
        if take == missing:
            frames.append(Frame(kind, bytes(self._buffer[FRAME_HEADER.size :])))
            self._buffer = bytearray()
        return used

    @property
    def buffered(self) -> int:
        return len(self._buffer)
