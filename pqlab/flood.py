"""A HELLO flood as an attacker sends it: cheap HELLOs, one TCP connection each.

``HelloForge`` builds one genuine HELLO with the library, then re-stamps its timestamp for
every connection. The payload travels in clear, so a re-stamped HELLO is new to the
responder's replay cache and costs the sender microseconds, while answering it costs the
responder a signature and an encapsulation. A flooder that follows RETRYs echoes the
cookie in a HELLO with the same ephemeral key, as a genuine initiator does, so it proves
its address and competes for the responder's budget like an honest peer.

Used by ``tests/e2e/test_handshake_flood.py`` and ``benchmarks/flood.py``.
"""

from __future__ import annotations

import hashlib
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from pqtunnel.crypto.backend import KEM_SIZES
from pqtunnel.handshake import AlertCode, InitiatorHandshake, decode_payload, encode_payload
from pqtunnel.identity import Identity
from pqtunnel.wire import Kind, encode_frame

HEADER = struct.Struct(">IB")
ANSWER_TIMEOUT = 5.0


class HelloForge:
    """Re-stamped copies of one real HELLO (and their retried form, carrying a cookie)."""

    def __init__(self, identity: Identity | None = None) -> None:
        initiator = InitiatorHandshake(identity or Identity.generate("flood"), lambda peer: "victim")
        body = initiator.start(int(time.time() * 1000))[HEADER.size:]
        kem = initiator.suite.kem
        offset = 2 + 32 + (KEM_SIZES[kem].public_key if kem else 0)  # version, suite, e, e1 (docs/PROTOCOL.md 4.1)
        self._prefix = body[:offset]
        self._payload = decode_payload(body[offset:], "HELLO")
        self._first = b""

    def hello(self, now_ms: int | None = None) -> bytes:
        """A HELLO frame stamped ``now_ms`` (default: the wall clock), never sent before."""
        payload = dict(self._payload, ts=int(time.time() * 1000) if now_ms is None else now_ms)
        body = self._prefix + encode_payload(payload)
        self._first = hashlib.sha256(body).digest()
        return encode_frame(Kind.HELLO, body)

    def retried(self, cookie: bytes) -> bytes:
        """The HELLO answering a RETRY: same ephemeral key, the cookie echoed.

        ``first`` (the hash of the HELLO that was answered) is what protocol versions before
        issue 13 checked the cookie against; current responders ignore it, so the same flood
        can measure both.
        """
        payload: dict[str, Any] = dict(self._payload, ts=int(time.time() * 1000),
                                       retry={"cookie": cookie, "first": self._first})
        return encode_frame(Kind.HELLO, self._prefix + encode_payload(payload))


def _read_frame(sock: socket.socket) -> tuple[Kind, bytes] | None:
    header = _read_exactly(sock, HEADER.size)
    if header is None:
        return None
    length, kind = HEADER.unpack(header)
    body = _read_exactly(sock, length - 1)
    return (Kind(kind), body) if body is not None else None


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def _answer_name(answer: tuple[Kind, bytes] | None) -> str:
    if answer is None:
        return "closed"
    kind, body = answer
    if kind is Kind.ALERT:
        return "busy" if body[:1] == bytes([AlertCode.BUSY]) else f"alert {body[1:].decode(errors='replace')}"
    return kind.name.lower()


def knock(port: int, forge: HelloForge, *, source: str = "127.0.0.1", host: str = "127.0.0.1",
          follow_retry: bool = True, timeout: float = ANSWER_TIMEOUT) -> str:
    """One flood connection: send a HELLO, read the answer, close.

    Returns ``response`` (the responder signed), ``retry``, ``busy`` (ALERT busy), another
    ALERT's name, ``closed`` (no answer) or ``error`` (could not connect or timed out).
    With ``follow_retry`` a RETRY is answered with the cookie and the final answer returned.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout, source_address=(source, 0)) as sock:
            sock.sendall(forge.hello())
            answer = _read_frame(sock)
            if follow_retry and answer is not None and answer[0] is Kind.RETRY:
                cookie = decode_payload(answer[1], "RETRY").get("cookie")
                sock.sendall(forge.retried(cookie if isinstance(cookie, bytes) else b""))
                return "retry+" + _answer_name(_read_frame(sock))
            return _answer_name(answer)
    except OSError:
        return "error"


@dataclass
class FloodTally:
    """How a flood's connections were answered, and how fast they went."""

    answers: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def sent(self) -> int:
        return sum(self.answers.values())

    @property
    def signed(self) -> int:
        """Connections that made the responder sign (RESPONSE, directly or after a RETRY)."""
        return self.answers["response"] + self.answers["retry+response"]

    def merge(self, other: FloodTally) -> None:
        self.answers.update(other.answers)
        self.seconds = max(self.seconds, other.seconds)


def flood(port: int, *, source: str = "127.0.0.1", count: int | None = None, seconds: float | None = None,
          stop: Callable[[], bool] | None = None, follow_retry: bool = True, host: str = "127.0.0.1") -> FloodTally:
    """Knock ``count`` times, for ``seconds``, or until ``stop()``, from ``source``, as fast as
    answers come (one connection at a time: run several floods for more pressure)."""
    if sum(limit is not None for limit in (count, seconds, stop)) != 1:
        raise ValueError("give exactly one of count, seconds or stop")
    forge = HelloForge()
    tally = FloodTally()
    started = time.monotonic()

    def more() -> bool:
        if count is not None:
            return tally.sent < count
        if seconds is not None:
            return time.monotonic() - started < seconds
        return not stop()  # type: ignore[misc]

    while more():
        tally.answers[knock(port, forge, source=source, host=host, follow_retry=follow_retry)] += 1
    tally.seconds = time.monotonic() - started
    return tally
