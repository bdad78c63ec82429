"""Shared fixtures and drivers for the sans-IO handshake, record and session tests.

Everything here is deterministic where it matters: ``FixedEntropy`` pins the ephemeral
secrets and ``MemoBackend`` memoises the two randomised primitives (ML-KEM encapsulation,
ML-DSA signing), so rebuilding a pair of handshakes reproduces byte-identical messages.
That is what lets the tampering tests say "this one flipped bit, and nothing else, made the
handshake fail".
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from pqtunnel.crypto.backend import CryptographyBackend
from pqtunnel.crypto.suites import HYBRID, Suite
from pqtunnel.errors import HandshakeError
from pqtunnel.handshake import (
    Entropy,
    HandshakeConfig,
    HandshakeResult,
    InitiatorHandshake,
    ResponderHandshake,
)
from pqtunnel.identity import Identity
from pqtunnel.session import RecordDataReceived, Established, Event, Session, SessionTimers
from pqtunnel.wire import Frame, FrameDecoder, Kind, encode_frame

#: A fixed "now" (2027-01-15) so timestamps in HELLOs are reproducible.
NOW_MS = 1_800_000_000_000
PEER_ADDRESS = "192.0.2.7"


# --- identities -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def alice() -> Identity:
    return Identity.generate("alice")


@pytest.fixture(scope="session")
def bob() -> Identity:
    return Identity.generate("bob")


@pytest.fixture(scope="session")
def mallory() -> Identity:
    return Identity.generate("mallory")


# --- deterministic crypto -----------------------------------------------------------------------


class CountingEntropy(Entropy):
    """Reproducible "randomness": 1, 2, 3, ... for each draw."""

    def __init__(self) -> None:
        self.draws = 0

    def random_bytes(self, size: int) -> bytes:
        self.draws += 1
        return bytes([self.draws]) * size


class FixedEntropy(Entropy):
    """Always the same ephemeral X25519 key and ML-KEM seed."""

    def __init__(self, fill: int) -> None:
        self._x25519 = bytes([fill]) * 32
        self._kem_seed = bytes([fill + 1]) * 64

    def x25519_private(self) -> bytes:
        return self._x25519

    def kem_seed(self) -> bytes:
        return self._kem_seed


class MemoBackend(CryptographyBackend):
    """Real primitives; encapsulation and ML-DSA signing are memoised per input.

    A memoised encapsulation is still a genuine one for that public key, and a memoised
    signature still verifies over that message, so the protocol is unchanged; only the
    randomness is frozen (and repeated handshakes get cheaper).
    """

    def __init__(self) -> None:
        self._encapsulations: dict[tuple[str, bytes], tuple[bytes, bytes]] = {}
        self._signatures: dict[tuple[str, bytes, bytes, bytes], bytes] = {}

    def kem_encapsulate(self, algorithm: str, public_key: bytes) -> tuple[bytes, bytes]:
        key = (algorithm, bytes(public_key))
        if key not in self._encapsulations:
            self._encapsulations[key] = super().kem_encapsulate(algorithm, public_key)
        return self._encapsulations[key]

    def mldsa_sign(self, algorithm: str, seed: bytes, message: bytes, context: bytes) -> bytes:
        key = (algorithm, seed, message, context)
        if key not in self._signatures:
            self._signatures[key] = super().mldsa_sign(algorithm, seed, message, context)
        return self._signatures[key]


@pytest.fixture(scope="session")
def memo_backend() -> MemoBackend:
    return MemoBackend()


def config_for(*suites: Suite, **kwargs) -> HandshakeConfig:
    return HandshakeConfig(allowed_suites=tuple(suites), **kwargs)


def accept_as(name: str) -> Callable[[object], str]:
    """An authorizer that trusts anyone and names them ``name``."""
    return lambda peer: name


def deterministic_pair(alice: Identity, bob: Identity, backend: CryptographyBackend, *,
                       initiator_config: HandshakeConfig | None = None,
                       responder_config: HandshakeConfig | None = None,
                       **responder_kwargs) -> tuple[InitiatorHandshake, ResponderHandshake]:
    """A fresh initiator (alice) and responder (bob) that always produce the same bytes."""
    initiator = InitiatorHandshake(alice, accept_as("bob"), config=initiator_config, backend=backend,
                                   entropy=FixedEntropy(0x41))
    responder = ResponderHandshake(bob, accept_as("alice"), peer_address=PEER_ADDRESS, config=responder_config,
                                   backend=backend, entropy=FixedEntropy(0x51), **responder_kwargs)
    return initiator, responder


# --- handshake driver ------------------------------------------------------------------------------

#: ``tamper(sender, frame)`` returns the raw bytes to deliver instead of the frame.
Tamper = Callable[[str, Frame], bytes]


@dataclass
class Exchange:
    """Everything that crossed the wire in one handshake, and how it ended."""

    frames: list[tuple[str, Frame]] = field(default_factory=list)  # (sender "I"/"R", frame as delivered)
    initiator_result: HandshakeResult | None = None
    responder_result: HandshakeResult | None = None
    error: HandshakeError | None = None
    failed_side: str | None = None  # "I" or "R": the side that raised

    @property
    def completed(self) -> bool:
        return self.initiator_result is not None and self.responder_result is not None

    def kinds(self, sender: str | None = None) -> list[Kind]:
        return [frame.kind for who, frame in self.frames if sender is None or who == sender]

    def body(self, kind: Kind, occurrence: int = 0) -> bytes:
        return [frame.body for _, frame in self.frames if frame.kind is kind][occurrence]


def run_handshake(initiator: InitiatorHandshake, responder: ResponderHandshake, *, now_ms: int = NOW_MS,
                  tamper: Tamper | None = None, start: list[tuple[str, bytes]] | None = None,
                  max_frames: int = 12) -> Exchange:
    """Drive both sides to the end, splitting the byte streams with FrameDecoder.

    Only HandshakeError is caught (recorded in ``Exchange.error``); any other exception
    escapes, so a test that expects a clean refusal fails loudly on a crash. ``start``
    replaces the initiator's first HELLO (e.g. to inject a forged frame).
    """
    exchange = Exchange()
    pending: deque[tuple[str, bytes]] = deque(start if start is not None else [("I", initiator.start(now_ms))])
    inbound = {"I": FrameDecoder(), "R": FrameDecoder()}  # bytes arriving at each side
    while pending:
        sender, data = pending.popleft()
        receiver = "R" if sender == "I" else "I"
        frames = FrameDecoder().feed(data)
        delivered = b"".join(tamper(sender, frame) if tamper else encode_frame(frame.kind, frame.body) for frame in frames)
        for frame in inbound[receiver].feed(delivered):
            exchange.frames.append((sender, frame))
            if len(exchange.frames) > max_frames:
                raise AssertionError(f"handshake did not terminate: {exchange.kinds()}")
            side = responder if receiver == "R" else initiator
            try:
                step = side.receive(frame, now_ms)
            except HandshakeError as exc:
                exchange.error, exchange.failed_side = exc, receiver
                return exchange
            if step.result is not None:
                if receiver == "R":
                    exchange.responder_result = step.result
                else:
                    exchange.initiator_result = step.result
            if step.to_send:
                pending.append((receiver, step.to_send))
    return exchange


def tamper_first(kind: Kind, change: Callable[[bytes], bytes]) -> Tamper:
    """Apply ``change`` to the body of the first frame of ``kind``; pass the rest untouched."""
    done = False

    def tamper(sender: str, frame: Frame) -> bytes:
        nonlocal done
        if frame.kind is kind and not done:
            done = True
            return encode_frame(kind, change(frame.body))
        return encode_frame(frame.kind, frame.body)

    return tamper


def flip_bit(data: bytes, position: int, bit: int) -> bytes:
    changed = bytearray(data)
    changed[position] ^= 1 << bit
    return bytes(changed)


def one_frame(data: bytes) -> Frame:
    """Decode bytes that must hold exactly one complete frame."""
    decoder = FrameDecoder()
    frames = decoder.feed(data)
    assert len(frames) == 1 and decoder.buffered == 0, f"expected one frame, got {len(frames)} (+{decoder.buffered} bytes)"
    return frames[0]


# --- sessions ---------------------------------------------------------------------------------------


def pump(a: Session, b: Session, now_ms: int, *, wire: list[tuple[str, bytes]] | None = None,
         max_rounds: int = 20) -> tuple[list[Event], list[Event]]:
    """Shuttle bytes between two sessions until both are quiet; returns (events at a, events at b).

    ``wire``, if given, collects ("a"/"b", bytes) for everything each side sent.
    """
    events_a: list[Event] = []
    events_b: list[Event] = []
    for _ in range(max_rounds):
        from_a = a.data_to_send()
        if from_a:
            if wire is not None:
                wire.append(("a", from_a))
            events_b += b.receive_data(from_a, now_ms)
        from_b = b.data_to_send()
        if from_b:
            if wire is not None:
                wire.append(("b", from_b))
            events_a += a.receive_data(from_b, now_ms)
        if not from_a and not from_b:
            return events_a, events_b
    raise AssertionError("sessions kept talking; pump did not settle")


def make_sessions(alice: Identity, bob: Identity, *, suite: Suite = HYBRID, now_ms: int = NOW_MS,
                  timers: SessionTimers | None = None) -> tuple[Session, Session]:
    """Two sessions (alice dials bob), not yet started."""
    config = config_for(suite)
    a = Session(InitiatorHandshake(alice, accept_as("bob"), config=config), now_ms=now_ms, timers=timers)
    b = Session(ResponderHandshake(bob, accept_as("alice"), peer_address=PEER_ADDRESS, config=config),
                now_ms=now_ms, timers=timers)
    return a, b


def establish(alice: Identity, bob: Identity, *, suite: Suite = HYBRID, now_ms: int = NOW_MS,
              timers: SessionTimers | None = None) -> tuple[Session, Session]:
    """Two established sessions with nothing left in flight."""
    a, b = make_sessions(alice, bob, suite=suite, now_ms=now_ms, timers=timers)
    a.start(now_ms)
    events_a, events_b = pump(a, b, now_ms)
    assert any(isinstance(e, Established) for e in events_a), events_a
    assert any(isinstance(e, Established) for e in events_b), events_b
    assert not any(isinstance(e, RecordDataReceived) for e in events_a + events_b)
    return a, b


# --- markers by folder: pytest -m unit | vectors | e2e ------------------------------------------------

_MARK_BY_FOLDER = {"unit": pytest.mark.unit, "vectors": pytest.mark.vectors, "e2e": pytest.mark.e2e}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each test carries the marker of its folder, so a layer can run alone."""
    for item in items:
        mark = _MARK_BY_FOLDER.get(Path(str(item.fspath)).parent.name)
        if mark is not None:
            item.add_marker(mark)
