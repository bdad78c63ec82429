"""The first frame of an inbound connection, read before anything answers it.

What a connection starts with decides who handles it: HELLO is a full handshake,
RESUME_HELLO a resumption with a ticket (daemon/tickets.py), a RECORD on a replica a session
moving in from another replica (daemon/replicas.py). The bytes read are handed on whole.
"""

from __future__ import annotations

import trio

from pqtunnel.errors import ProtocolError
from pqtunnel.wire import FRAME_HEADER, FrameDecoder, Kind

MAX_FIRST_RECORD = 128
"""A connection may start with a RECORD only as a RESUME (54 bytes); a longer one is refused."""


async def first_frame_bytes(stream: trio.SocketStream, timeout: float) -> bytes:
    """Read until the first frame is complete, the peer stops, the bytes turn out malformed
    (whoever reads them next refuses them with the precise reason), or ``timeout`` passes."""
    decoder = FrameDecoder(max_record=MAX_FIRST_RECORD)
    received = b""
    with trio.move_on_after(timeout):
        while True:
            data = await stream.receive_some(65536)
            received += data
            try:
                if not data or decoder.feed(data):
                    break
            except ProtocolError:
                break
    return received


def first_frame_kind(data: bytes) -> Kind | None:
    """The kind of the frame ``data`` starts with (None: too short or unknown)."""
    if len(data) < FRAME_HEADER.size:
        return None
    try:
        return Kind(data[FRAME_HEADER.size - 1])
    except ValueError:
        return None
