"""The pqtunnel handshake: Noise XXhfs (X25519 + ML-KEM) with hybrid transcript signatures.

Sans-IO: the caller feeds frames and the current time in milliseconds, and sends what
comes out. No sockets, no clocks, and all randomness comes from an injectable ``Entropy``.

    -> HELLO     version, suite | e, e1               | payload {v, suites, aeads, ts, retry?}
    <- RETRY     (optional) {suite, cookie}              stateless; the initiator starts over
                                                         (same e, never a weaker suite)
    <- RESPONSE  e, ee, ekem1, s, es                   | payload {aead, id, sig_R(h)}
    -> FINISH    s, se                                 | payload {id, sig_I(h)}

Both identities sign ``label | role | h`` with Ed25519 and ML-DSA (SIGMA style), so the
whole transcript, including the suite offer, is authenticated: a stripped or swapped offer
changes ``h`` and the handshake fails. See docs/PROTOCOL.md for byte layouts and vectors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import hmac
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Any, Callable

import msgpack

from .admission import Verdict
from .crypto import backend as prim
from .crypto.suites import DEFAULT_AEADS, DEFAULT_ALLOWED_SUITES, SUITES_BY_WIRE_ID, Aead, Suite, best_common_aead
from .errors import (
    BadSignatureError,
    CookieError,
    DowngradeError,
    HandshakeBusyError,
    HandshakeError,
    HandshakeRefusedError,
    LocalProtocolError,
    MalformedHandshakeError,
    NoCommonSuiteError,
    ReplayError,
    ResumeRefusedError,
    TicketAuthError,
    TicketError,
    UnsupportedVersionError,
    UntrustedPeerError,
)
from .entropy import SYSTEM_ENTROPY, Entropy
from .identity import Identity, WireIdentity
from .transition import MAX_TRANSITION
from .noisestate import DHLEN, TAGLEN, KemHooks, NoiseState, Reader
from .wire import Frame, Kind, encode_frame

PROTOCOL_VERSION = 1
PROLOGUE_LABEL = b"pqtunnel/1 prologue\x00"
SIGNATURE_LABEL = b"pqtunnel/1 transcript signature\x00"
SESSION_ID_LABEL = b"pqtunnel/1 session id"
REKEY_LABEL = b"pqtunnel/1 rekey chain"
RESUMPTION_LABEL = b"pqtunnel/1 resumption"
COOKIE_LABEL = b"pqtunnel/1 cookie\x00"
COOKIE_LIFETIME_MS = 120_000
"""A cookie is good this long either side of the moment it was issued (wall clock)."""
COOKIE_SIZE = 24
MAX_SPENT_COOKIES = 65_536
MAX_PAYLOAD = 28 * 1024
MAX_CERTIFICATE = 8 * 1024

Authorizer = Callable[[WireIdentity], str]
Admit = Callable[[bool], Verdict]
"""Asked before the responder signs: ``admit(proven)`` -> ADMIT, COOKIE (send a RETRY) or
BUSY (refuse); ``proven`` says the HELLO carried a valid cookie. See pqtunnel/admission.py."""


class InitiatorState(Enum):
    """Where the dialling side is; ``_expect`` refuses any frame its state does not take."""

    START = "start"
    """Nothing sent yet."""
    HELLO_SENT = "hello sent"
    """First HELLO out; RESPONSE, RETRY or ALERT may come."""
    RETRIED = "hello resent after retry"
    """HELLO out again with the responder's cookie; a second RETRY is refused."""
    DONE = "done"
    """FINISH sent, keys derived; any further handshake frame is refused."""


class ResponderState(Enum):
    """Where the listening side is."""

    AWAITING_HELLO = "awaiting hello"
    AWAITING_RETRIED_HELLO = "awaiting hello after retry"
    """We sent a stateless RETRY; one more HELLO (with the cookie) is allowed."""
    AWAITING_FINISH = "awaiting finish"
    DONE = "done"


_INITIATOR_TAKES: dict[InitiatorState, frozenset[Kind]] = {
    InitiatorState.START: frozenset(),
    InitiatorState.HELLO_SENT: frozenset({Kind.RESPONSE, Kind.RETRY, Kind.ALERT}),
    InitiatorState.RETRIED: frozenset({Kind.RESPONSE, Kind.RETRY, Kind.ALERT}),
    InitiatorState.DONE: frozenset(),
}
_RESPONDER_TAKES: dict[ResponderState, frozenset[Kind]] = {
    ResponderState.AWAITING_HELLO: frozenset({Kind.HELLO}),
    ResponderState.AWAITING_RETRIED_HELLO: frozenset({Kind.HELLO}),
    ResponderState.AWAITING_FINISH: frozenset({Kind.FINISH}),
    ResponderState.DONE: frozenset(),
}


def _expect(state: InitiatorState | ResponderState, takes: frozenset[Kind], frame: Frame, role: str) -> None:
    """Refuse a frame the current state does not take, naming both (the peer's fault)."""
    if frame.kind not in takes:
        if state in (InitiatorState.DONE, ResponderState.DONE):
            raise MalformedHandshakeError(f"unexpected {frame.kind.name} after the handshake finished")
        raise MalformedHandshakeError(f"{role} did not expect {frame.kind.name} while {state.value}")


class AlertCode(IntEnum):
    """Why a responder refused, sent in plaintext so the initiator can say why it failed."""

    UNSUPPORTED_VERSION = 1
    NO_COMMON_SUITE = 2
    UNTRUSTED = 3
    BAD_MESSAGE = 4
    REPLAY = 5
    BAD_COOKIE = 6
    BUSY = 7
    UNKNOWN_SESSION = 8
    """A RESUME this replica cannot continue: the initiator falls back to a full handshake."""
    UNKNOWN_TICKET = 9
    """A RESUME_HELLO whose ticket is unknown, already used or expired (pqtunnel/tickets.py)."""
    BAD_TICKET = 10
    """A RESUME_HELLO whose MAC does not verify under its ticket."""


_ALERT_FOR: list[tuple[type[HandshakeError], AlertCode]] = [
    (UnsupportedVersionError, AlertCode.UNSUPPORTED_VERSION),
    (NoCommonSuiteError, AlertCode.NO_COMMON_SUITE),
    (DowngradeError, AlertCode.NO_COMMON_SUITE),
    (UntrustedPeerError, AlertCode.UNTRUSTED),
    (ReplayError, AlertCode.REPLAY),
    (CookieError, AlertCode.BAD_COOKIE),
    (HandshakeBusyError, AlertCode.BUSY),
    (ResumeRefusedError, AlertCode.UNKNOWN_SESSION),
    (TicketAuthError, AlertCode.BAD_TICKET),
    (TicketError, AlertCode.UNKNOWN_TICKET),
]


def alert_frame(error: HandshakeError) -> bytes:
    """The ALERT a responder sends before closing; the reason text is deliberately generic."""
    code = next((c for cls, c in _ALERT_FOR if isinstance(error, cls)), AlertCode.BAD_MESSAGE)
    return encode_frame(Kind.ALERT, bytes([code]) + code.name.lower().replace("_", " ").encode())


def parse_alert(body: bytes) -> HandshakeRefusedError:
    if not body:
        return HandshakeRefusedError("peer refused the handshake (empty alert)")
    try:
        code = AlertCode(body[0]).name.lower().replace("_", " ")
    except ValueError:
        code = f"code {body[0]}"
    return HandshakeRefusedError(f"peer refused the handshake: {code}")


@dataclass(frozen=True)
class HandshakeConfig:
    """What this node accepts. ``allowed_suites`` is in preference order; the first is proposed."""

    allowed_suites: tuple[Suite, ...] = DEFAULT_ALLOWED_SUITES
    aeads: tuple[Aead, ...] = DEFAULT_AEADS
    replay_window_ms: int = 120_000


@dataclass(frozen=True)
class HandshakeResult:
    """Everything the record layer and the daemon need once both sides are authenticated."""

    is_initiator: bool
    suite: Suite
    aead: Aead
    peer: WireIdentity
    peer_name: str
    peer_static: bytes
    handshake_hash: bytes
    session_id: bytes
    send_key: bytes = field(repr=False)
    recv_key: bytes = field(repr=False)
    rekey_chain: bytes = field(repr=False)
    resumption_secret: bytes = field(default=b"", repr=False)
    """Where this session's resumption tickets draw their secrets (pqtunnel/tickets.py);
    empty for a result that cannot issue tickets."""


@dataclass(frozen=True)
class HandshakeStep:
    """Output of feeding one frame: bytes to send, and the result once complete."""

    to_send: bytes = b""
    result: HandshakeResult | None = None


class ReplayCache:
    """Hashes of recently accepted HELLOs, so a replayed one is refused inside the window.

    A HELLO accepted at ``t`` may carry a timestamp up to ``t + window``, and that timestamp
    passes the window check until ``t + 2 * window`` *inclusive* (the check is
    ``|now - ts| <= window``). So the hash is kept through ``t + 2 * window`` and forgotten
    only after it.
    """

    def __init__(self, window_ms: int = 120_000, max_entries: int = 65_536) -> None:
        self._seen: OrderedDict[bytes, int] = OrderedDict()
        self._window_ms = window_ms
        self._max = max_entries

    def check_and_add(self, digest: bytes, now_ms: int) -> None:
        self._expire(now_ms)
        if digest in self._seen:
            raise ReplayError("replayed handshake: this HELLO was already accepted")
        self._seen[digest] = now_ms + 2 * self._window_ms
        while len(self._seen) > self._max:
            self._seen.popitem(last=False)

    def _expire(self, now_ms: int) -> None:
        while self._seen:
            digest, last_valid = next(iter(self._seen.items()))
            if last_valid >= now_ms:
                break
            del self._seen[digest]


class CookieJar:
    """Retry cookies: bound to the HELLO they answer, and good for one HELLO only.

    A cookie is ``issued_ms (u64) || HMAC-SHA256(secret, label || issued_ms || suite id ||
    e || client IP)[0:16]``, where ``e`` is the X25519 ephemeral key of the HELLO it
    answers. The retried HELLO must carry that same ``e`` (the responder takes it from the
    HELLO itself, trusting nothing the client claims about its first HELLO), from the same
    address, for the suite the RETRY named, within ``COOKIE_LIFETIME_MS``.

    Single use: redeemed cookies are remembered until they expire, at most ``max_spent`` of
    them. When more are live, the earliest-issued is forgotten and every cookie issued at or
    before it is refused from then on (the *horizon*), so a full table never lets a cookie
    through twice; a genuine client redeems within a round trip, far above the horizon.
    """

    def __init__(self, secret: bytes | None = None, entropy: Entropy = SYSTEM_ENTROPY, *,
                 max_spent: int = MAX_SPENT_COOKIES) -> None:
        self._secret = secret or entropy.random_bytes(32)
        self._max_spent = max_spent
        self._spent_heap: list[tuple[int, bytes]] = []  # (issued_ms, mac), earliest first
        self._spent: set[bytes] = set()
        self._horizon_ms: int | None = None

    def _mac(self, issued_ms: int, peer_address: str, suite: Suite, ephemeral: bytes) -> bytes:
        message = COOKIE_LABEL + issued_ms.to_bytes(8, "big") + bytes([suite.wire_id]) + ephemeral + peer_address.encode()
        return hmac.new(self._secret, message, hashlib.sha256).digest()[:16]

    def issue(self, now_ms: int, peer_address: str, suite: Suite, ephemeral: bytes) -> bytes:
        """The cookie for a RETRY answering a HELLO with ephemeral key ``ephemeral``."""
        return now_ms.to_bytes(8, "big") + self._mac(now_ms, peer_address, suite, ephemeral)

    def redeem(self, cookie: Any, now_ms: int, peer_address: str, suite: Suite, ephemeral: bytes) -> None:
        """Accept ``cookie`` once for a HELLO with this address, suite and ephemeral key.

        Raises CookieError if it is malformed, expired, forged, for another HELLO, or used.
        """
        if not isinstance(cookie, bytes) or len(cookie) != COOKIE_SIZE:
            raise CookieError("retry cookie is malformed")
        issued_ms, mac = int.from_bytes(cookie[:8], "big"), cookie[8:]
        if abs(now_ms - issued_ms) > COOKIE_LIFETIME_MS:
            raise CookieError("retry cookie has expired")
        if not hmac.compare_digest(self._mac(issued_ms, peer_address, suite, ephemeral), mac):
            raise CookieError("retry cookie is forged or was issued for another HELLO")
        self._forget_expired(now_ms)
        if mac in self._spent or (self._horizon_ms is not None and issued_ms <= self._horizon_ms):
            raise CookieError("retry cookie was already used")
        self._remember(issued_ms, mac)

    def _remember(self, issued_ms: int, mac: bytes) -> None:
        heapq.heappush(self._spent_heap, (issued_ms, mac))
        self._spent.add(mac)
        while len(self._spent_heap) > self._max_spent:
            oldest, forgotten = heapq.heappop(self._spent_heap)
            self._spent.discard(forgotten)
            self._horizon_ms = oldest if self._horizon_ms is None else max(self._horizon_ms, oldest)

    def _forget_expired(self, now_ms: int) -> None:
        """Cookies issued more than a lifetime ago fail the expiry check; no need to keep them."""
        while self._spent_heap and self._spent_heap[0][0] < now_ms - COOKIE_LIFETIME_MS:
            _, mac = heapq.heappop(self._spent_heap)
            self._spent.discard(mac)

    @property
    def spent(self) -> int:
        """Redeemed cookies still remembered (bounded by ``max_spent``)."""
        return len(self._spent_heap)


# --- payload encoding ------------------------------------------------------------------------


def encode_payload(payload: dict[str, Any]) -> bytes:
    return msgpack.packb(payload, use_bin_type=True)


def decode_payload(data: bytes, what: str) -> dict[str, Any]:
    """Decode a msgpack map defensively: any malformation is a MalformedHandshakeError."""
    if len(data) > MAX_PAYLOAD:
        raise MalformedHandshakeError(f"{what} payload is too large")
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise MalformedHandshakeError(f"{what} payload is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(value, dict):
        raise MalformedHandshakeError(f"{what} payload is not a map")
    return value


def _int_list(payload: dict[str, Any], key: str, what: str) -> list[int]:
    value = payload.get(key)
    if not isinstance(value, list) or not value or len(value) > 16 or not all(isinstance(v, int) for v in value):
        raise MalformedHandshakeError(f"{what}: '{key}' must be a non-empty list of small integers")
    return value


def _prologue(suite: Suite) -> bytes:
    return PROLOGUE_LABEL + bytes([PROTOCOL_VERSION, suite.wire_id])


def _signature_message(role: bytes, handshake_hash: bytes) -> bytes:
    return SIGNATURE_LABEL + role + handshake_hash


def _kem_hooks(backend: prim.CryptographyBackend, entropy: Entropy, suite: Suite) -> KemHooks | None:
    if suite.kem is None:
        return None
    algorithm = suite.kem
    return KemHooks(
        algorithm=algorithm,
        keypair=lambda: backend.kem_keypair(algorithm, entropy.kem_seed()),
        encapsulate=lambda public: backend.kem_encapsulate(algorithm, public),
    )


def _finish(state: NoiseState, *, initiator: bool, suite: Suite, aead: Aead, peer: WireIdentity,
            peer_name: str) -> HandshakeResult:
    i2r, r2i = state.split()
    (rekey_chain,) = state.hkdf(state.ck, REKEY_LABEL, 2)[:1]
    (resumption_secret,) = state.hkdf(state.ck, RESUMPTION_LABEL, 2)[:1]
    session_id = hashlib.blake2s(SESSION_ID_LABEL + state.h, digest_size=8).digest()
    assert state.rs is not None
    return HandshakeResult(
        is_initiator=initiator,
        suite=suite,
        aead=aead,
        peer=peer,
        peer_name=peer_name,
        peer_static=state.rs,
        handshake_hash=state.h,
        session_id=session_id,
        send_key=i2r if initiator else r2i,
        recv_key=r2i if initiator else i2r,
        rekey_chain=rekey_chain,
        resumption_secret=resumption_secret,
    )


def _verify_peer(state: NoiseState, backend: prim.CryptographyBackend, suite: Suite, role: bytes,
                 signed_hash: bytes, payload: dict[str, Any]) -> WireIdentity:
    peer = WireIdentity.from_wire(payload.get("id"), suite)
    certificate = payload.get("cert")
    if certificate is not None:
        if not isinstance(certificate, bytes) or len(certificate) > MAX_CERTIFICATE:
            raise MalformedHandshakeError("certificate field is malformed or too large")
        peer = dataclasses.replace(peer, certificate=certificate)
    transition = payload.get("transition")
    if transition is not None:
        if not isinstance(transition, bytes) or len(transition) > MAX_TRANSITION:
            raise MalformedHandshakeError("transition field is malformed or too large")
        peer = dataclasses.replace(peer, transition=transition)
    if not peer.verify(backend, suite, _signature_message(role, signed_hash), payload.get("sig")):
        raise BadSignatureError(f"{peer.claimed_name!r} ({peer.fingerprint}): hybrid signature over the transcript did not verify")
    return peer


# --- initiator ---------------------------------------------------------------------------------


class InitiatorHandshake:
    """The dialling side. It reveals its identity only after authenticating the responder."""

    is_initiator = True

    def __init__(self, identity: Identity, authorize: Authorizer, *, config: HandshakeConfig | None = None,
                 backend: prim.CryptographyBackend | None = None, entropy: Entropy | None = None,
                 certificate: bytes | None = None, transition: bytes | None = None) -> None:
        self.identity = identity
        self.certificate = certificate
        self.transition = transition
        self.authorize = authorize
        self.config = config or HandshakeConfig()
        self.backend = backend or prim.CryptographyBackend()
        self.entropy = entropy or SYSTEM_ENTROPY
        self.suite = self.config.allowed_suites[0]
        self.state = InitiatorState.START
        self._noise: NoiseState | None = None
        self._ephemeral = b""

    @property
    def done(self) -> bool:
        return self.state is InitiatorState.DONE

    def start(self, now_ms: int, retry: dict[str, Any] | None = None) -> bytes:
        """Build the HELLO frame (again after a RETRY, carrying its cookie).

        ``now_ms`` is wall-clock time: it goes on the wire as the HELLO timestamp. A retried
        HELLO keeps the first one's X25519 ephemeral ``e`` (the cookie is bound to it; no
        Diffie-Hellman was done with it yet, as in Noise Pipes' fallback) and gets a fresh
        ML-KEM key, since the suite may have changed.
        """
        if self.state is not (InitiatorState.START if retry is None else InitiatorState.HELLO_SENT):
            raise LocalProtocolError(f"HELLO cannot be sent while the initiator is {self.state.value}")
        suite = self.suite
        if retry is None:
            self._ephemeral = self.entropy.x25519_private()
        self._noise = NoiseState(suite.noise_name, initiator=True, static_private=self.identity.x25519_static,
                                 ephemeral_private=self._ephemeral, prologue=_prologue(suite),
                                 kem=_kem_hooks(self.backend, self.entropy, suite))
        payload: dict[str, Any] = {
            "v": [PROTOCOL_VERSION],
            "suites": [s.wire_id for s in self.config.allowed_suites],
            "aeads": [int(a) for a in self.config.aeads],
            "ts": now_ms,
        }
        if retry is not None:
            payload["retry"] = retry
        body = bytes([PROTOCOL_VERSION, suite.wire_id]) + self._noise.write_e()
        if suite.kem is not None:
            body += self._noise.write_e1()
        body += self._noise.encrypt_and_hash(encode_payload(payload))
        self.state = InitiatorState.HELLO_SENT if retry is None else InitiatorState.RETRIED
        return encode_frame(Kind.HELLO, body)

    def receive(self, frame: Frame, now_ms: int) -> HandshakeStep:
        """Feed one handshake frame; ``now_ms`` is wall-clock time (for a retried HELLO)."""
        _expect(self.state, _INITIATOR_TAKES[self.state], frame, "initiator")
        if frame.kind is Kind.ALERT:
            raise parse_alert(frame.body)
        if frame.kind is Kind.RETRY:
            return HandshakeStep(to_send=self._on_retry(frame.body, now_ms))
        return self._on_response(frame.body)

    def _on_retry(self, body: bytes, now_ms: int) -> bytes:
        if self.state is InitiatorState.RETRIED:
            raise MalformedHandshakeError("second RETRY in one handshake")
        payload = decode_payload(body, "RETRY")
        suite = SUITES_BY_WIRE_ID.get(payload.get("suite", -1)) if isinstance(payload.get("suite"), int) else None
        if suite is None or suite not in self.config.allowed_suites:
            raise DowngradeError("RETRY asks for a suite this node does not allow")
        if suite.rank < self.suite.rank:  # a RETRY is unauthenticated: it may only move us up
            raise DowngradeError(f"RETRY asks for {suite.name}, weaker than the proposed {self.suite.name}")
        cookie = payload.get("cookie")
        if not isinstance(cookie, bytes) or len(cookie) > 64:
            raise MalformedHandshakeError("RETRY cookie is malformed")
        self.suite = suite
        return self.start(now_ms, retry={"cookie": cookie})

    def _on_response(self, body: bytes) -> HandshakeStep:
        state, suite = self._noise, self.suite
        assert state is not None  # HELLO_SENT or RETRIED: a HELLO built it
        reader = Reader(body, "RESPONSE")
        state.read_e(reader.take(DHLEN))
        state.ee()
        if suite.kem is not None:
            state.read_ekem1(reader.take(prim.KEM_SIZES[suite.kem].ciphertext + TAGLEN))
        state.read_s(reader.take(DHLEN + TAGLEN))
        state.es()
        signed_hash = state.h
        payload = decode_payload(state.decrypt_and_hash(reader.rest()), "RESPONSE")
        aead_id = payload.get("aead")
        if not isinstance(aead_id, int) or aead_id not in [int(a) for a in self.config.aeads]:
            raise DowngradeError("responder chose an AEAD this node did not offer")
        peer = _verify_peer(state, self.backend, suite, b"R", signed_hash, payload)
        peer_name = self.authorize(peer)  # before we reveal who we are
        out = state.write_s()
        state.se()
        signature = self.identity.sign(self.backend, suite, _signature_message(b"I", state.h))
        finish: dict[str, Any] = {"id": self.identity.public.to_wire(suite), "sig": signature}
        if self.certificate is not None:
            finish["cert"] = self.certificate
        if self.transition is not None:
            finish["transition"] = self.transition
        out += state.encrypt_and_hash(encode_payload(finish))
        self.state = InitiatorState.DONE
        result = _finish(state, initiator=True, suite=suite, aead=Aead(aead_id), peer=peer, peer_name=peer_name)
        return HandshakeStep(to_send=encode_frame(Kind.FINISH, out), result=result)


# --- responder -----------------------------------------------------------------------------------


class ResponderHandshake:
    """The listening side. Cheap checks (version, replay, cookie, admission) come before any signing.

    ``admit`` rations the expensive work (see pqtunnel/admission.py); without it every HELLO
    that passes the checks is answered. ``require_cookie`` makes every stranger echo a
    cookie first, whatever ``admit`` says.
    """

    is_initiator = False

    def __init__(self, identity: Identity, authorize: Authorizer, *, peer_address: str,
                 config: HandshakeConfig | None = None, backend: prim.CryptographyBackend | None = None,
                 entropy: Entropy | None = None, replay_cache: ReplayCache | None = None,
                 cookies: CookieJar | None = None, require_cookie: bool = False,
                 admit: Admit | None = None, certificate: bytes | None = None,
                 transition: bytes | None = None) -> None:
        self.identity = identity
        self.certificate = certificate
        self.transition = transition
        self.authorize = authorize
        self.peer_address = peer_address
        self.config = config or HandshakeConfig()
        self.backend = backend or prim.CryptographyBackend()
        self.entropy = entropy or SYSTEM_ENTROPY
        self.replay_cache = replay_cache or ReplayCache(self.config.replay_window_ms)
        self.cookies = cookies or CookieJar()
        self.require_cookie = require_cookie
        self.admit = admit
        self.state = ResponderState.AWAITING_HELLO
        self._noise: NoiseState | None = None
        self._suite: Suite | None = None
        self._aead: Aead | None = None

    @property
    def done(self) -> bool:
        return self.state is ResponderState.DONE

    @property
    def suite(self) -> Suite | None:
        """The suite this handshake runs with (None until a HELLO is answered with a RESPONSE);
        the authorize callback reads it, so policy can judge the session's algorithms."""
        return self._suite

    def receive(self, frame: Frame, now_ms: int) -> HandshakeStep:
        """Feed one handshake frame; ``now_ms`` is wall-clock time (HELLO timestamps, cookies)."""
        _expect(self.state, _RESPONDER_TAKES[self.state], frame, "responder")
        if frame.kind is Kind.HELLO:
            retried = self.state is ResponderState.AWAITING_RETRIED_HELLO
            self.state = ResponderState.AWAITING_RETRIED_HELLO  # a failure below leaves no way back
            return HandshakeStep(to_send=self._on_hello(frame.body, now_ms, retried))
        return self._on_finish(frame.body)

    def _on_hello(self, body: bytes, now_ms: int, retried: bool) -> bytes:
        """Cheap checks, then RETRY, ALERT busy or RESPONSE; only a RESPONSE costs a signature."""
        suite, state, payload = self._read_hello(body)
        offered, aeads = self._check_hello(payload, suite, now_ms)
        self.replay_cache.check_and_add(prim.sha256(body), now_ms)
        chosen = self._choose_suite(suite, offered)
        assert state.re is not None
        proven = self._redeem_cookie(payload.get("retry"), now_ms, suite, state.re)
        if not proven and chosen is not suite:
            return self._retry(chosen, state.re, now_ms, retried)
        if chosen is not suite:
            raise DowngradeError("HELLO after RETRY still proposes a suite this node does not allow")
        verdict = self._verdict(proven)
        if verdict is Verdict.COOKIE and not proven:
            return self._retry(suite, state.re, now_ms, retried)
        if verdict is not Verdict.ADMIT:
            raise HandshakeBusyError("too many handshakes right now; try again later")
        self._aead = self._choose_aead(aeads)
        self._suite, self._noise = suite, state
        self.state = ResponderState.AWAITING_FINISH
        return encode_frame(Kind.RESPONSE, self._response(state, suite))

    def _read_hello(self, body: bytes) -> tuple[Suite, NoiseState, dict[str, Any]]:
        """Header, ``e``, ``e1`` and the clear payload into a fresh Noise state (no DH yet)."""
        if len(body) < 2:
            raise MalformedHandshakeError("HELLO is truncated")
        if body[0] != PROTOCOL_VERSION:
            raise UnsupportedVersionError(f"peer speaks protocol version {body[0]}, this node speaks {PROTOCOL_VERSION}")
        suite = SUITES_BY_WIRE_ID.get(body[1])
        if suite is None:
            raise MalformedHandshakeError(f"HELLO proposes unknown suite id {body[1]}")
        state = NoiseState(suite.noise_name, initiator=False, static_private=self.identity.x25519_static,
                           ephemeral_private=b"", prologue=_prologue(suite),  # drawn only if we answer
                           kem=_kem_hooks(self.backend, self.entropy, suite))
        reader = Reader(body[2:], "HELLO")
        state.read_e(reader.take(DHLEN))
        if suite.kem is not None:
            state.read_e1(reader.take(prim.KEM_SIZES[suite.kem].public_key))
        return suite, state, decode_payload(state.decrypt_and_hash(reader.rest()), "HELLO")

    def _redeem_cookie(self, retry: Any, now_ms: int, suite: Suite, ephemeral: bytes) -> bool:
        """Whether the HELLO carries a valid, unused cookie; a bad one is refused outright."""
        if retry is None:
            return False
        if not isinstance(retry, dict):
            raise MalformedHandshakeError("HELLO retry field is not a map")
        self.cookies.redeem(retry.get("cookie"), now_ms, self.peer_address, suite, ephemeral)
        return True

    def _verdict(self, proven: bool) -> Verdict:
        if self.require_cookie and not proven:
            return Verdict.COOKIE
        return Verdict.ADMIT if self.admit is None else self.admit(proven)

    def _retry(self, suite: Suite, ephemeral: bytes, now_ms: int, retried: bool) -> bytes:
        """A RETRY naming ``suite``, with a cookie for this HELLO: cheap, no signature."""
        if retried:
            raise MalformedHandshakeError("too many HELLOs on one connection")
        cookie = self.cookies.issue(now_ms, self.peer_address, suite, ephemeral)
        return encode_frame(Kind.RETRY, encode_payload({"suite": suite.wire_id, "cookie": cookie}))

    def _check_hello(self, payload: dict[str, Any], suite: Suite, now_ms: int) -> tuple[list[int], list[int]]:
        if PROTOCOL_VERSION not in _int_list(payload, "v", "HELLO"):
            raise UnsupportedVersionError("no protocol version in common")
        offered = _int_list(payload, "suites", "HELLO")
        if suite.wire_id not in offered:
            raise DowngradeError("HELLO proposes a suite that is not in its own offer")
        aeads = _int_list(payload, "aeads", "HELLO")
        timestamp = payload.get("ts")
        if not isinstance(timestamp, int):
            raise MalformedHandshakeError("HELLO timestamp missing")
        if abs(now_ms - timestamp) > self.config.replay_window_ms:
            raise ReplayError(f"HELLO timestamp is {abs(now_ms - timestamp) / 1000:.0f} s away from our clock")
        return offered, aeads

    def _choose_suite(self, proposed: Suite, offered: list[int]) -> Suite:
        """Keep the initiator's proposal if we allow it, else its first offer that we allow and
        that is at least as strong (an initiator never follows a RETRY to a weaker suite)."""
        if proposed in self.config.allowed_suites:
            return proposed
        for wire_id in offered:
            suite = SUITES_BY_WIRE_ID.get(wire_id)
            if suite is not None and suite in self.config.allowed_suites and suite.rank >= proposed.rank:
                return suite
        raise NoCommonSuiteError(f"no offered suite at least as strong as {proposed.name} is allowed by this node")

    def _choose_aead(self, offered: list[int]) -> Aead:
        chosen = best_common_aead(offered, self.config.aeads)
        if chosen is None:
            raise NoCommonSuiteError("no AEAD in common")
        return chosen

    def _response(self, state: NoiseState, suite: Suite) -> bytes:
        state.e = self.entropy.x25519_private()
        out = state.write_e()
        state.ee()
        if suite.kem is not None:
            out += state.write_ekem1()
        out += state.write_s()
        state.es()
        signature = self.identity.sign(self.backend, suite, _signature_message(b"R", state.h))
        assert self._aead is not None
        payload: dict[str, Any] = {"aead": int(self._aead), "id": self.identity.public.to_wire(suite), "sig": signature}
        if self.certificate is not None:
            payload["cert"] = self.certificate
        if self.transition is not None:
            payload["transition"] = self.transition
        return out + state.encrypt_and_hash(encode_payload(payload))

    def _on_finish(self, body: bytes) -> HandshakeStep:
        state, suite, aead = self._noise, self._suite, self._aead
        assert state is not None and suite is not None and aead is not None  # AWAITING_FINISH
        reader = Reader(body, "FINISH")
        state.read_s(reader.take(DHLEN + TAGLEN))
        state.se()
        signed_hash = state.h
        payload = decode_payload(state.decrypt_and_hash(reader.rest()), "FINISH")
        peer = _verify_peer(state, self.backend, suite, b"I", signed_hash, payload)
        peer_name = self.authorize(peer)
        self.state = ResponderState.DONE
        return HandshakeStep(result=_finish(state, initiator=False, suite=suite, aead=aead, peer=peer, peer_name=peer_name))
