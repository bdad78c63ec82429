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
    RECORD = 0x10


HANDSHAKE_KINDS = frozenset({Kind.HELLO, Kind.RESPONSE, Kind.FINISH, Kind.RETRY, Kind.ALERT})
MAX_HANDSHAKE_FRAME = 32 * 1024
MAX_RECORD_PLAINTEXT = 256 * 1024
RECORD_OVERHEAD = 8 + 8 + 16 + 1  # session id, counter, AEAD tag, content type
MAX_RECORD_FRAME = 1 + MAX_RECORD_PLAINTEXT + RECORD_OVERHEAD


def encode_frame(kind: Kind, body: bytes) -> bytes:
    return FRAME_HEADER.pack(len(body) + 1, kind) + body


@dataclass(frozen=True)
class Frame:
    kind: Kind
    body: bytes


def _limit_for(kind: int) -> int:
    if kind == Kind.RECORD:
        return MAX_RECORD_FRAME
    if kind in HANDSHAKE_KINDS:
        return MAX_HANDSHAKE_FRAME
    raise FramingError(f"unknown frame kind 0x{kind:02x}")


class FrameDecoder:
    """Splits a TCP byte stream into frames; keeps at most one partial frame buffered."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._offset = 0

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        frames: list[Frame] = []
        while True:
            frame = self._next_frame()
            if frame is None:
                break
            frames.append(frame)
        self._compact()
        return frames

    def _next_frame(self) -> Frame | None:
        available = len(self._buffer) - self._offset
        if available < FRAME_HEADER.size:
            return None
        length, kind = FRAME_HEADER.unpack_from(self._buffer, self._offset)
        if length < 1:
            raise FramingError("frame length 0")
        limit = _limit_for(kind)
        if length > limit:
            raise FramingError(f"{Kind(kind).name} frame of {length} bytes exceeds the limit of {limit}")
        end = self._offset + 4 + length
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[self._offset + FRAME_HEADER.size : end])
        self._offset = end
        return Frame(Kind(kind), body)

    def _compact(self) -> None:
        if self._offset:
            del self._buffer[: self._offset]
            self._offset = 0

    @property
    def buffered(self) -> int:
        return len(self._buffer) - self._offset
