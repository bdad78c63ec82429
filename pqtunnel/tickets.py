"""Resumption tickets: a one-round-trip handshake for a peer met before (sans-IO).

After a full handshake both sides hold the session's ``resumption_secret`` (handshake.py,
never sent). The responder issues a ticket by sending, inside the session, only a random
``ticket_id`` and a lifetime (the *grant*); both sides derive the ticket's secret

    psk = HKDF(resumption_secret, "pqtunnel/1 ticket" || ticket_id)[0]

so the psk is never on the wire. The responder keeps a ``TicketState`` (wrapped, in the
store its replicas share); the initiator keeps a ``ClientTicket``. Later the initiator
sends RESUME_HELLO (ticket id, fresh X25519 ``e``, timestamp, MAC under the psk), the
responder answers RESUME_ACCEPT (its fresh ``e``, MAC), and both derive new session keys
from the psk, ``X25519(e_i, e_r)`` and ``X25519(s_i, e_r)``. The psk comes from a hybrid
handshake, so the resumed session stays post-quantum secret; the fresh ephemerals give
forward secrecy against a later theft of the ticket. Each ticket is good for one
resumption: the application records its use in the shared store before it accepts.
Byte layouts and the key schedule: docs/PROTOCOL.md section 4.10.
"""

from __future__ import annotations

import hashlib
import hmac
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Generic, TypeVar

import msgpack

from .crypto import backend as prim
from .crypto.suites import Aead, suite_by_name
from .entropy import SYSTEM_ENTROPY, Entropy
from .errors import (
    ConfigError,
    DowngradeError,
    LocalProtocolError,
    MalformedHandshakeError,
    NoCommonSuiteError,
    RecordError,
    ReplayError,
    StoreDataError,
    TicketAuthError,
    TicketExpiredError,
    TicketMismatchError,
    UnsupportedVersionError,
)
from .handover import StateWrapper, _bytes, _int, _map, _text, peer_from_wire, peer_to_wire
from .handshake import (
    PROTOCOL_VERSION,
    REKEY_LABEL,
    RESUMPTION_LABEL,
    SESSION_ID_LABEL,
    Authorizer,
    HandshakeConfig,
    HandshakeResult,
    HandshakeStep,
    parse_alert,
)
from .identity import Identity, WireIdentity
from .wire import Frame, Kind, encode_frame

TICKET_LABEL = b"pqtunnel/1 ticket"
RESUME_LABEL = b"pqtunnel/1 resume"
RESUME_PROLOGUE = b"pqtunnel/1 resume\x00"
TICKET_FORMAT = b"pqtunnel-ticket/1"
"""Format label of a wrapped TicketState (the responder's, in the shared store)."""
CLIENT_TICKET_FORMAT = b"pqtunnel-client-ticket/1"
"""Format label of a wrapped ClientTicket (the initiator's, in its own store)."""
TICKET_USE_KIND = "ticket"
"""The ``kind`` of a ticket's single-use record (``NonceStore.use_once``)."""

TICKET_ID_SIZE = 16
KEY_SIZE = 32
MAC_SIZE = 32
DHLEN = 32
GRANT_SIZE = 1 + TICKET_ID_SIZE + 4
RESUME_HELLO_SIZE = 1 + TICKET_ID_SIZE + DHLEN + 8 + MAC_SIZE
RESUME_ACCEPT_SIZE = DHLEN + MAC_SIZE
DEFAULT_TICKET_LIFETIME_S = 24 * 3600
MAX_TICKET_LIFETIME_S = 7 * 24 * 3600
"""As in TLS 1.3 (RFC 8446 4.6.1): a ticket older than a week is never accepted."""


# --- primitives: the handshake's HKDF (HMAC-BLAKE2s) and BLAKE2s -------------------------------------


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2s).digest()


def hkdf(chaining_key: bytes, material: bytes, outputs: int) -> tuple[bytes, ...]:
    """Noise's HKDF with HMAC-BLAKE2s, as in the handshake (PROTOCOL.md 4.6)."""
    temp = _hmac(chaining_key, material)
    out = [_hmac(temp, b"\x01")]
    for i in range(2, outputs + 1):
        out.append(_hmac(temp, out[-1] + bytes([i])))
    return tuple(out)


def _hash(data: bytes) -> bytes:
    return hashlib.blake2s(data).digest()


def ticket_psk(resumption_secret: bytes, ticket_id: bytes) -> bytes:
    """The ticket's secret: each side derives it from the session, nobody sends it."""
    if len(resumption_secret) != KEY_SIZE:
        raise LocalProtocolError("this session has no resumption secret: it cannot issue or take tickets")
    return hkdf(resumption_secret, TICKET_LABEL + ticket_id, 2)[0]


# --- store ids -------------------------------------------------------------------------------------------


def ticket_state_id(ticket_id: bytes) -> str:
    """Store id of the responder's wrapped TicketState: ``ticket.<32 hex digits>``."""
    return f"ticket.{ticket_id.hex()}"


def ticket_use_id(ticket_id: bytes) -> str:
    """Record id of the ticket's single use (``use_once(TICKET_USE_KIND, ...)``)."""
    return ticket_id.hex()


def client_ticket_state_id(peer_fingerprint: str, ticket_id: bytes) -> str:
    """Store id of an initiator's wrapped ClientTicket: ``client-ticket.<fingerprint>.<hex>``,
    so ``list_states(f"client-ticket.{fp}.")`` finds the tickets for one peer."""
    return f"client-ticket.{peer_fingerprint}.{ticket_id.hex()}"


# --- the grant, carried in a record of the established session --------------------------------------------


@dataclass(frozen=True)
class TicketGrant:
    """What the responder sends to issue a ticket: no secret, only its id and lifetime."""

    ticket_id: bytes
    lifetime_s: int


def encode_ticket_grant(grant: TicketGrant) -> bytes:
    """``version (u8) | ticket_id (16) | lifetime_s (u32)``: 21 bytes."""
    return bytes([PROTOCOL_VERSION]) + grant.ticket_id + grant.lifetime_s.to_bytes(4, "big")


def parse_ticket_grant(body: bytes | memoryview) -> TicketGrant:
    """The grant in a record body; RecordError unless it is exactly one well-formed grant."""
    body = bytes(body)
    if len(body) != GRANT_SIZE:
        raise RecordError(f"ticket grant has {len(body)} bytes, expected {GRANT_SIZE}")
    if body[0] != PROTOCOL_VERSION:
        raise RecordError(f"ticket grant of protocol version {body[0]}")
    lifetime = int.from_bytes(body[1 + TICKET_ID_SIZE :], "big")
    if not 1 <= lifetime <= MAX_TICKET_LIFETIME_S:
        raise RecordError(f"ticket grant lifetime {lifetime} s is outside 1..{MAX_TICKET_LIFETIME_S}")
    return TicketGrant(body[1 : 1 + TICKET_ID_SIZE], lifetime)


# --- what each side keeps -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ticket:
    """A ticket as one side keeps it; ``peer*`` are the *other* side's identity."""

    ticket_id: bytes
    psk: bytes = field(repr=False)
    suite: str
    aead: Aead
    peer: dict[str, Any] = field(repr=False)
    """The peer's identity map as in handover.SessionSnapshot.peer (``n``, ``ed``, ``h``, ``pq``, ...)."""
    peer_name: str
    peer_static: bytes
    issued_ms: int
    expires_ms: int
    """Wall-clock expiry, by this side's clock."""

    @property
    def peer_fingerprint(self) -> str:
        return self.peer_identity().fingerprint

    def peer_identity(self) -> WireIdentity:
        return peer_from_wire(self.peer, suite_by_name(self.suite))

    def is_expired(self, wall_ms: int) -> bool:
        return wall_ms > self.expires_ms

    def to_msgpack(self) -> bytes:
        return msgpack.packb({
            "tid": self.ticket_id, "psk": self.psk, "suite": self.suite, "aead": int(self.aead), "peer": self.peer,
            "name": self.peer_name, "static": self.peer_static, "at": self.issued_ms, "exp": self.expires_ms},
            use_bin_type=True)

    @classmethod
    def _decode(cls, data: bytes, what: str) -> Any:
        try:
            fields = msgpack.unpackb(data, raw=False, strict_map_key=True)
            ticket = cls(_bytes(fields, "tid", TICKET_ID_SIZE), _bytes(fields, "psk", KEY_SIZE), _text(fields, "suite"),
                         Aead(_int(fields, "aead")), _map(fields, "peer"), _text(fields, "name"),
                         _bytes(fields, "static", DHLEN), _int(fields, "at"), _int(fields, "exp"))
            ticket.peer_identity()  # the suite exists and the peer's identity is well formed
        except (ValueError, TypeError, KeyError, ConfigError, MalformedHandshakeError, msgpack.UnpackException) as exc:
            raise StoreDataError(f"stored {what} is malformed: {exc}") from None
        return ticket


class TicketState(_Ticket):
    """The responder's record of a ticket it issued (wrapped in the replicas' shared store)."""

    def use_ttl_s(self, wall_ms: int, margin_ms: int = 120_000) -> float:
        """How long the single-use record must be kept: past the ticket's expiry, with a
        margin for replicas whose clocks run behind."""
        return max(0, self.expires_ms + margin_ms - wall_ms) / 1000

    @classmethod
    def from_msgpack(cls, data: bytes) -> TicketState:
        """Decode a ticket state; StoreDataError for anything that is not one."""
        state: TicketState = cls._decode(data, "ticket state")
        return state


class ClientTicket(_Ticket):
    """The initiator's ticket (persisted by the application across restarts)."""

    @classmethod
    def from_msgpack(cls, data: bytes) -> ClientTicket:
        """Decode a client ticket; StoreDataError for anything that is not one."""
        ticket: ClientTicket = cls._decode(data, "client ticket")
        return ticket


def _lifetime(lifetime_s: int) -> int:
    if not 1 <= lifetime_s <= MAX_TICKET_LIFETIME_S:
        raise ConfigError(f"ticket lifetime must be 1..{MAX_TICKET_LIFETIME_S} s, not {lifetime_s}")
    return lifetime_s


def issue_ticket(result: HandshakeResult, wall_ms: int, *, lifetime_s: int = DEFAULT_TICKET_LIFETIME_S,
                 entropy: Entropy = SYSTEM_ENTROPY) -> tuple[TicketState, bytes]:
    """Responder: a new ticket for the session ``result``; (state to store, grant body to send)."""
    if result.is_initiator:
        raise LocalProtocolError("only the responder of a session issues tickets")
    ticket_id = entropy.random_bytes(TICKET_ID_SIZE)
    state = TicketState(ticket_id, ticket_psk(result.resumption_secret, ticket_id), result.suite.name, result.aead,
                        peer_to_wire(result.peer), result.peer_name, result.peer_static, wall_ms,
                        wall_ms + _lifetime(lifetime_s) * 1000)
    return state, encode_ticket_grant(TicketGrant(ticket_id, lifetime_s))


def accept_ticket_grant(result: HandshakeResult, body: bytes | memoryview, wall_ms: int) -> ClientTicket:
    """Initiator: the ticket a grant received in session ``result`` gives (RecordError if malformed)."""
    if not result.is_initiator:
        raise LocalProtocolError("only the initiator of a session takes tickets")
    grant = parse_ticket_grant(body)
    return ClientTicket(grant.ticket_id, ticket_psk(result.resumption_secret, grant.ticket_id), result.suite.name,
                        result.aead, peer_to_wire(result.peer), result.peer_name, result.peer_static, wall_ms,
                        wall_ms + grant.lifetime_s * 1000)


def wrap_ticket(wrapper: StateWrapper, state: TicketState) -> bytes:
    """The state sealed for the store under ``ticket_state_id``: only this node's replicas open it."""
    return wrapper.wrap_bytes(TICKET_FORMAT, ticket_state_id(state.ticket_id), state.to_msgpack())


def unwrap_ticket(wrapper: StateWrapper, ticket_id: bytes, blob: bytes) -> TicketState:
    """The stored state of ``ticket_id``; StoreDataError unless it is genuinely this node's and that ticket's."""
    store_id = ticket_state_id(ticket_id)
    state = TicketState.from_msgpack(wrapper.unwrap_bytes(TICKET_FORMAT, store_id, blob, "pqtunnel ticket"))
    if state.ticket_id != ticket_id:
        raise StoreDataError(f"stored state of {store_id} names ticket {state.ticket_id.hex()}")
    return state


def wrap_client_ticket(wrapper: StateWrapper, ticket: ClientTicket) -> bytes:
    """The client ticket sealed for its store under ``client_ticket_state_id``."""
    store_id = client_ticket_state_id(ticket.peer_fingerprint, ticket.ticket_id)
    return wrapper.wrap_bytes(CLIENT_TICKET_FORMAT, store_id, ticket.to_msgpack())


def unwrap_client_ticket(wrapper: StateWrapper, store_id: str, blob: bytes) -> ClientTicket:
    """The client ticket stored under ``store_id``; StoreDataError unless ours and for that id."""
    ticket = ClientTicket.from_msgpack(wrapper.unwrap_bytes(CLIENT_TICKET_FORMAT, store_id, blob, "pqtunnel client ticket"))
    if client_ticket_state_id(ticket.peer_fingerprint, ticket.ticket_id) != store_id:
        raise StoreDataError(f"stored state of {store_id} names another ticket")
    return ticket


# --- the resumed handshake ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResumeHello:
    """A parsed RESUME_HELLO body, not yet authenticated."""

    ticket_id: bytes
    ephemeral: bytes
    timestamp_ms: int
    mac: bytes
    signed: bytes
    """The body before the MAC: what the MAC covers (with the prologue)."""


def parse_resume_hello(body: bytes | memoryview) -> ResumeHello:
    """Cut a RESUME_HELLO body into its fields (the application looks the ticket id up first)."""
    body = bytes(body)
    if len(body) < 1:
        raise MalformedHandshakeError("RESUME_HELLO is empty")
    if body[0] != PROTOCOL_VERSION:
        raise UnsupportedVersionError(f"peer speaks protocol version {body[0]}, this node speaks {PROTOCOL_VERSION}")
    if len(body) != RESUME_HELLO_SIZE:
        raise MalformedHandshakeError(f"RESUME_HELLO has {len(body)} bytes, expected {RESUME_HELLO_SIZE}")
    e_at = 1 + TICKET_ID_SIZE
    ts_at = e_at + DHLEN
    mac_at = ts_at + 8
    return ResumeHello(body[1:e_at], body[e_at:ts_at], int.from_bytes(body[ts_at:mac_at], "big"), body[mac_at:],
                       body[:mac_at])


def _prologue(ticket: _Ticket, initiator_fp: str, responder_fp: str) -> bytes:
    """Binds the resumption to the ticket's suite and AEAD and to both nodes' identities."""
    suite = suite_by_name(ticket.suite)
    fps = b"".join(bytes([len(fp)]) + fp.encode() for fp in (initiator_fp, responder_fp))
    return RESUME_PROLOGUE + bytes([PROTOCOL_VERSION, suite.wire_id, int(ticket.aead)]) + fps


def _dh(private: bytes, public: bytes) -> bytes:
    try:
        return prim.x25519_dh(private, public)
    except ValueError:
        raise MalformedHandshakeError("peer sent a low-order X25519 key") from None


class _Schedule:
    """The resumed handshake's transcript and keys, the same on both sides."""

    def __init__(self, psk: bytes, prologue: bytes, hello_signed: bytes) -> None:
        self.ck, self.k_hello = hkdf(psk, RESUME_LABEL, 2)
        self.h = _hash(prologue + hello_signed)

    def hello_mac(self) -> bytes:
        return _hmac(self.k_hello, self.h)

    def accept(self, hello_mac: bytes, responder_e: bytes, ee: bytes, se: bytes) -> bytes:
        """Mix the responder's ``e`` and both Diffie-Hellman results; the ACCEPT MAC."""
        self.h = _hash(self.h + hello_mac + responder_e)
        self.ck, k_accept = hkdf(self.ck, ee + se + self.h, 2)
        return _hmac(k_accept, self.h)

    def result(self, accept_mac: bytes, *, initiator: bool, ticket: _Ticket, peer: WireIdentity,
               peer_name: str) -> HandshakeResult:
        h = _hash(self.h + accept_mac)
        i2r, r2i = hkdf(self.ck, b"", 2)
        return HandshakeResult(
            is_initiator=initiator, suite=suite_by_name(ticket.suite), aead=ticket.aead, peer=peer,
            peer_name=peer_name, peer_static=ticket.peer_static, handshake_hash=h,
            session_id=hashlib.blake2s(SESSION_ID_LABEL + h, digest_size=8).digest(),
            send_key=i2r if initiator else r2i, recv_key=r2i if initiator else i2r,
            rekey_chain=hkdf(self.ck, REKEY_LABEL, 2)[0], resumption_secret=hkdf(self.ck, RESUMPTION_LABEL, 2)[0])


def _check_policy(ticket: _Ticket, config: HandshakeConfig) -> None:
    """A ticket keeps the suite and AEAD of its session: only if this node still allows them."""
    suite = suite_by_name(ticket.suite)
    if suite not in config.allowed_suites:
        raise DowngradeError(f"the ticket is for suite {suite.name}, which this node no longer allows")
    if ticket.aead not in config.aeads:
        raise NoCommonSuiteError(f"the ticket is for AEAD {ticket.aead.name}, which this node no longer allows")


class ResumeState(Enum):
    START = "start"
    HELLO_SENT = "resume hello sent"
    CHECKED = "resume hello checked"
    DONE = "done"


def _expect(frame: Frame, kinds: tuple[Kind, ...], state: ResumeState, role: str) -> None:
    if frame.kind not in kinds:
        raise MalformedHandshakeError(f"{role} did not expect {frame.kind.name} while {state.value}")


TicketT = TypeVar("TicketT", bound=_Ticket)


class _Resumption(ABC, Generic[TicketT]):
    """What both sides of a resumption are built from: an identity, the ticket this side
    keeps, the peer's judge and the node's handshake settings."""

    is_initiator: bool

    def __init__(self, identity: Identity, ticket: TicketT, authorize: Authorizer, *,
                 config: HandshakeConfig | None = None, entropy: Entropy | None = None,
                 backend: prim.CryptographyBackend | None = None) -> None:
        self.identity = identity
        self.ticket = ticket
        self.authorize = authorize
        self.config = config or HandshakeConfig()
        self.entropy = entropy or SYSTEM_ENTROPY
        self.backend = backend or prim.CryptographyBackend()
        """The session's primitives after the resumption (its rekeys' ML-KEM)."""
        self.state = ResumeState.START
        self._init_progress()

    @abstractmethod
    def _init_progress(self) -> None:
        """Each side's own progress through the resumption, before it starts."""

    @property
    def done(self) -> bool:
        return self.state is ResumeState.DONE


class ResumeInitiator(_Resumption[ClientTicket]):
    """The dialling side of a resumption: RESUME_HELLO out, RESUME_ACCEPT (or ALERT) in.

    ``authorize`` judges the peer again (pins and policy may have changed since the ticket
    was issued) and names it, as in the full handshake.
    """

    is_initiator = True

    def _init_progress(self) -> None:
        self._ephemeral = b""
        self._schedule: _Schedule | None = None
        self._hello_mac = b""

    def start(self, wall_ms: int) -> bytes:
        """The RESUME_HELLO frame. TicketError if the ticket is expired or no longer allowed."""
        if self.state is not ResumeState.START:
            raise LocalProtocolError(f"RESUME_HELLO cannot be sent while the initiator is {self.state.value}")
        if self.ticket.is_expired(wall_ms):
            raise TicketExpiredError("the ticket has expired")
        try:
            _check_policy(self.ticket, self.config)
        except (DowngradeError, NoCommonSuiteError) as exc:
            raise TicketMismatchError(str(exc)) from None
        self._ephemeral = self.entropy.x25519_private()
        signed = (bytes([PROTOCOL_VERSION]) + self.ticket.ticket_id + prim.x25519_public(self._ephemeral)
                  + wall_ms.to_bytes(8, "big"))
        prologue = _prologue(self.ticket, self.identity.fingerprint, self.ticket.peer_fingerprint)
        self._schedule = _Schedule(self.ticket.psk, prologue, signed)
        self._hello_mac = self._schedule.hello_mac()
        self.state = ResumeState.HELLO_SENT
        return encode_frame(Kind.RESUME_HELLO, signed + self._hello_mac)

    def receive(self, frame: Frame, now_ms: int) -> HandshakeStep:
        """RESUME_ACCEPT gives the result; an ALERT raises HandshakeRefusedError (fall back to a full handshake)."""
        _expect(frame, (Kind.RESUME_ACCEPT, Kind.ALERT) if self.state is ResumeState.HELLO_SENT else (),
                self.state, "resuming initiator")
        if frame.kind is Kind.ALERT:
            raise parse_alert(bytes(frame.body))
        body = bytes(frame.body)
        if len(body) != RESUME_ACCEPT_SIZE:
            raise MalformedHandshakeError(f"RESUME_ACCEPT has {len(body)} bytes, expected {RESUME_ACCEPT_SIZE}")
        responder_e, mac = body[:DHLEN], body[DHLEN:]
        schedule = self._schedule
        assert schedule is not None  # HELLO_SENT
        expected = schedule.accept(self._hello_mac, responder_e, _dh(self._ephemeral, responder_e),
                                   _dh(self.identity.x25519_static, responder_e))
        if not hmac.compare_digest(expected, mac):
            raise TicketAuthError("RESUME_ACCEPT MAC does not verify: the responder does not hold this ticket")
        peer = self.ticket.peer_identity()
        peer_name = self.authorize(peer)
        self.state = ResumeState.DONE
        return HandshakeStep(result=schedule.result(mac, initiator=True, ticket=self.ticket, peer=peer,
                                                    peer_name=peer_name))


class ResumeResponder(_Resumption[TicketState]):
    """The listening side, given the TicketState the application found for the HELLO's ticket id.

    ``check`` authenticates the RESUME_HELLO (cheap, no randomness); the application then
    records the ticket's single use in the shared store, and ``accept`` answers. Refusals:
    UnsupportedVersionError or MalformedHandshakeError (bad fields), TicketMismatchError (the
    state is another ticket's), TicketExpiredError, TicketAuthError (wrong MAC: tampered, or
    the ticket was issued to another peer or by another node), ReplayError (timestamp outside
    the window), DowngradeError/NoCommonSuiteError (suite or AEAD no longer allowed), and
    whatever ``authorize`` raises. ``alert_frame`` turns each into the initiator's ALERT.
    """

    is_initiator = False

    def _init_progress(self) -> None:
        self._checked_body = b""
        self._hello: ResumeHello | None = None
        self._schedule: _Schedule | None = None
        self._peer: WireIdentity | None = None
        self._peer_name = ""

    def check(self, frame: Frame, now_ms: int) -> ResumeHello:
        """Authenticate a RESUME_HELLO against the ticket; raises a HandshakeError subclass if refused."""
        _expect(frame, (Kind.RESUME_HELLO,) if self.state is ResumeState.START else (), self.state,
                "resuming responder")
        self.state = ResumeState.CHECKED  # a failure below leaves no way back
        hello = parse_resume_hello(frame.body)
        ticket = self.ticket
        if not hmac.compare_digest(hello.ticket_id, ticket.ticket_id):
            raise TicketMismatchError("RESUME_HELLO names another ticket than the state it was given")
        if ticket.is_expired(now_ms):
            raise TicketExpiredError(f"ticket {ticket.ticket_id.hex()} expired {(now_ms - ticket.expires_ms) / 1000:.0f} s ago")
        schedule = _Schedule(ticket.psk, _prologue(ticket, ticket.peer_fingerprint, self.identity.fingerprint),
                             hello.signed)
        if not hmac.compare_digest(schedule.hello_mac(), hello.mac):
            raise TicketAuthError("RESUME_HELLO MAC does not verify under its ticket")
        if abs(now_ms - hello.timestamp_ms) > self.config.replay_window_ms:
            raise ReplayError(f"RESUME_HELLO timestamp is {abs(now_ms - hello.timestamp_ms) / 1000:.0f} s away from our clock")
        _check_policy(ticket, self.config)
        self._peer = ticket.peer_identity()
        self._peer_name = self.authorize(self._peer)
        self._hello, self._schedule = hello, schedule
        self._checked_body = bytes(frame.body)
        return hello

    def accept(self) -> HandshakeStep:
        """RESUME_ACCEPT and the result; only after ``check`` (and the single-use record)."""
        hello, schedule, peer = self._hello, self._schedule, self._peer
        if self.state is not ResumeState.CHECKED or hello is None or schedule is None or peer is None:
            raise LocalProtocolError(f"RESUME_ACCEPT cannot be sent while the responder is {self.state.value}")
        ephemeral = self.entropy.x25519_private()
        public = prim.x25519_public(ephemeral)
        mac = schedule.accept(hello.mac, public, _dh(ephemeral, hello.ephemeral), _dh(ephemeral, self.ticket.peer_static))
        self.state = ResumeState.DONE
        result = schedule.result(mac, initiator=False, ticket=self.ticket, peer=peer, peer_name=self._peer_name)
        return HandshakeStep(to_send=encode_frame(Kind.RESUME_ACCEPT, public + mac), result=result)

    def receive(self, frame: Frame, now_ms: int) -> HandshakeStep:
        """``check`` then ``accept``. After the application's own ``check`` (and the single-use
        record), the same RESUME_HELLO fed again is accepted without checking twice."""
        if self.state is ResumeState.CHECKED and self._checked_body:
            if bytes(frame.body) != self._checked_body:
                raise LocalProtocolError("a RESUME_HELLO other than the one checked was fed")
            return self.accept()
        self.check(frame, now_ms)
        return self.accept()
