"""Sans-IO SOCKS5 server side (RFC 1928 + RFC 1929) and ``.pq`` target naming.

Local programs (curl, browsers, agents) reach peers through pqtunnel by pointing a SOCKS5
client at the daemon and asking for ``SERVICE.PEER.pq`` or ``PEER.pq``. This module only
turns bytes into events and decisions into bytes (like h11 or wsproto): it never touches a
socket or a clock, so every refusal path is testable byte by byte and the I/O shell stays
a thin loop::

    events = server.receive_data(chunk)      # b"" means the client sent EOF
    ... handle AuthRequested / ConnectRequested / SocksError ...
    await stream.send_all(server.data_to_send())
    if server.state is State.CLOSED: close the connection

Only CONNECT is supported. IPv4/IPv6 requests are parsed and reported so the caller
refuses them with one source of truth (``target_for_request`` + ``reply_for``).
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass, field
from typing import ClassVar, Final

from .errors import PqtunnelError, ProtocolError

SOCKS_VERSION: Final = 0x05
SOCKS4_VERSION: Final = 0x04
AUTH_SUBNEGOTIATION_VERSION: Final = 0x01

METHOD_NO_AUTH: Final = 0x00
METHOD_USERNAME_PASSWORD: Final = 0x02
METHOD_NO_ACCEPTABLE: Final = 0xFF

AUTH_SUCCESS: Final = b"\x01\x00"
AUTH_FAILURE: Final = b"\x01\x01"
NO_ACCEPTABLE_METHODS: Final = bytes([SOCKS_VERSION, METHOD_NO_ACCEPTABLE])
# SOCKS4 reply: VN=0, CD=0x5B "request rejected or failed", DSTPORT and DSTIP ignored.
SOCKS4_REJECT: Final = b"\x00\x5b\x00\x00\x00\x00\x00\x00"

MAX_BUFFERED: Final = 64 * 1024
"""Most bytes held for the caller before the reply (early data); more means a runaway client."""

_CMD_CONNECT: Final = 0x01
_COMMAND_NAMES: Final = {0x01: "CONNECT", 0x02: "BIND", 0x03: "UDP ASSOCIATE"}
_PRINTABLE_ASCII: Final = frozenset(range(0x21, 0x7F))

_HTTP_HINT_BODY: Final = (
    b"This port speaks SOCKS5 (pqtunnel), not HTTP. Use e.g. "
    b"curl --socks5-hostname HOST:PORT http://SERVICE.PEER.pq/\n"
)
HTTP_HINT_RESPONSE: Final = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
    b"Content-Length: " + str(len(_HTTP_HINT_BODY)).encode() + b"\r\n\r\n" + _HTTP_HINT_BODY
)
"""Sent when the first byte looks like an HTTP method, so someone using us as an HTTP proxy sees why."""


class ReplyCode(enum.IntEnum):
    """The REP field of a SOCKS5 reply (RFC 1928 section 6)."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class AddressType(enum.IntEnum):
    """The ATYP field of a SOCKS5 request."""

    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


class State(enum.Enum):
    """Where the negotiation is; WAIT_AUTH_DECISION and WAIT_REPLY wait for the caller."""

    WAIT_GREETING = enum.auto()
    WAIT_CREDENTIALS = enum.auto()
    WAIT_AUTH_DECISION = enum.auto()
    WAIT_REQUEST = enum.auto()
    WAIT_REPLY = enum.auto()
    ESTABLISHED = enum.auto()
    CLOSED = enum.auto()


_EOF_STAGES: Final = {
    State.WAIT_GREETING: "before completing its greeting",
    State.WAIT_CREDENTIALS: "before completing its credentials",
    State.WAIT_AUTH_DECISION: "after its credentials, before sending a request",
    State.WAIT_REQUEST: "before completing its request",
}


# --- events --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuthRequested:
    """The client sent RFC 1929 credentials; answer with ``accept_credentials``."""

    username: str
    password: str = field(repr=False)  # never in logs


@dataclass(frozen=True)
class ConnectRequested:
    """The client asked to CONNECT; answer with ``reply``."""

    host: str
    port: int
    address_type: AddressType


@dataclass(frozen=True)
class SocksError:
    """The negotiation failed; the server is closed.

    ``reply_code`` is the SOCKS5 reply that was queued, or None when the refusal was not a
    SOCKS5 reply (method refusal 0x05 0xFF, RFC 1929 failure, SOCKS4 reject, or nothing).
    Send ``data_to_send()`` and close the connection.
    """

    reason: str
    reply_code: ReplyCode | None


Event = AuthRequested | ConnectRequested | SocksError


class SocksUsageError(PqtunnelError):
    """The caller drove the state machine wrongly (a bug in pqtunnel, not in the client)."""


# --- the state machine -----------------------------------------------------------------------


class Socks5Server:
    """One client connection's SOCKS5 negotiation, from greeting to reply.

    With ``require_auth`` the only method offered is username/password (RFC 1929); without
    it, only "no authentication". Either way the selected method is the configured one, so
    behaviour does not depend on what the client happens to offer.
    """

    def __init__(self, *, require_auth: bool = False) -> None:
        self._require_auth = require_auth
        self._state = State.WAIT_GREETING
        self._buffer = bytearray()
        self._outgoing = bytearray()
        self._eof_received = False

    @property
    def state(self) -> State:
        return self._state

    @property
    def eof_received(self) -> bool:
        """True if the client half-closed after its request (forward EOF after the early data)."""
        return self._eof_received

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the client (``b""`` = EOF) and return the events they complete.

        Malformed input never raises: it yields a ``SocksError``. Bytes after the request are
        kept as early data (see ``trailing_data``). After a successful reply the caller owns
        the stream, so feeding more raises ``SocksUsageError`` rather than losing data.
        """
        if self._state is State.ESTABLISHED:
            raise SocksUsageError("receive_data after the tunnel was established: forward directly")
        if self._state is State.CLOSED:
            return []
        if not data:
            return self._receive_eof()
        self._buffer += data
        events = self._process()
        if len(self._buffer) > MAX_BUFFERED and self._state is not State.CLOSED:
            events.append(self._overflow())
        return events

    def data_to_send(self) -> bytes:
        """Return, and forget, the bytes that must be written to the client next."""
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    def accept_credentials(self, ok: bool) -> list[Event]:
        """Answer an ``AuthRequested``; returns events for a request the client already pipelined.

        A rejection queues the RFC 1929 failure status and closes the server.
        """
        self._expect(State.WAIT_AUTH_DECISION, "accept_credentials")
        if not ok:
            self._outgoing += AUTH_FAILURE
            self._close()
            return []
        self._outgoing += AUTH_SUCCESS
        self._state = State.WAIT_REQUEST
        return self._process()

    def reply(self, code: ReplyCode, bind_host: str = "0.0.0.0", bind_port: int = 0) -> None:
        """Answer a ``ConnectRequested``: SUCCEEDED establishes the tunnel, anything else closes."""
        self._expect(State.WAIT_REPLY, "reply")
        code = ReplyCode(code)
        self._outgoing += encode_reply(code, bind_host, bind_port)
        if code is ReplyCode.SUCCEEDED:
            self._state = State.ESTABLISHED
        else:
            self._close()

    def trailing_data(self) -> bytes:
        """Return, and forget, client bytes that followed the request (forward them after the reply)."""
        if self._state not in (State.WAIT_REPLY, State.ESTABLISHED):
            return b""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    # --- internals ---------------------------------------------------------------------------

    def _expect(self, state: State, method: str) -> None:
        if self._state is not state:
            raise SocksUsageError(f"{method} called in state {self._state.name}, expected {state.name}")

    def _close(self) -> None:
        self._state = State.CLOSED
        self._buffer.clear()

    def _fail(self, reason: str, payload: bytes = b"") -> SocksError:
        self._outgoing += payload
        self._close()
        return SocksError(reason, None)

    def _fail_with_reply(self, reason: str, code: ReplyCode) -> SocksError:
        self._outgoing += encode_reply(code)
        self._close()
        return SocksError(reason, code)

    def _overflow(self) -> SocksError:
        """Bound memory: only pipelined early data can pile up, while a decision is pending."""
        reason = f"client sent more than {MAX_BUFFERED} bytes before the reply"
        if self._state is State.WAIT_REPLY:
            return self._fail_with_reply(reason, ReplyCode.GENERAL_FAILURE)
        return self._fail(reason, AUTH_FAILURE if self._state is State.WAIT_AUTH_DECISION else b"")

    def _receive_eof(self) -> list[Event]:
        if self._state is State.WAIT_REPLY:
            self._eof_received = True
            return []
        stage = _EOF_STAGES[self._state]
        partial = f" ({len(self._buffer)} bytes of it received)" if self._buffer else ""
        return [self._fail(f"client closed the connection {stage}{partial}")]

    def _process(self) -> list[Event]:
        """Parse as far as the buffer and the current state allow."""
        events: list[Event] = []
        while (step := self._step()) is not None:
            events.extend(step)
        return events

    def _step(self) -> list[Event] | None:
        """Parse one message; None means more input (or a caller decision) is needed."""
        if self._state is State.WAIT_GREETING:
            return self._parse_greeting()
        if self._state is State.WAIT_CREDENTIALS:
            return self._parse_credentials()
        if self._state is State.WAIT_REQUEST:
            return self._parse_request()
        return None

    def _parse_greeting(self) -> list[Event] | None:
        buf = self._buffer
        if not buf:
            return None
        version = buf[0]
        if version == SOCKS4_VERSION:
            return [self._fail("SOCKS4/4a client; only SOCKS5 is supported", SOCKS4_REJECT)]
        if version != SOCKS_VERSION:
            return [self._refuse_version(version)]
        if len(buf) < 2:
            return None
        nmethods = buf[1]
        if nmethods == 0:
            reason = "malformed greeting: no authentication methods listed"
            return [self._fail(reason, NO_ACCEPTABLE_METHODS)]
        if len(buf) < 2 + nmethods:
            return None
        methods = bytes(buf[2 : 2 + nmethods])
        del buf[: 2 + nmethods]
        wanted = METHOD_USERNAME_PASSWORD if self._require_auth else METHOD_NO_AUTH
        if wanted not in methods:
            offered = ", ".join(f"0x{m:02x}" for m in methods)
            reason = f"no acceptable auth method: need 0x{wanted:02x}, client offered {offered}"
            return [self._fail(reason, NO_ACCEPTABLE_METHODS)]
        self._outgoing += bytes([SOCKS_VERSION, wanted])
        self._state = State.WAIT_CREDENTIALS if self._require_auth else State.WAIT_REQUEST
        return []

    def _refuse_version(self, version: int) -> SocksError:
        if 0x41 <= version <= 0x5A:  # 'A'..'Z': an HTTP method such as GET or CONNECT
            reason = f"not SOCKS5: first byte 0x{version:02x} looks like HTTP"
            return self._fail(reason, HTTP_HINT_RESPONSE)
        return self._fail(f"not SOCKS5: unsupported version byte 0x{version:02x}")

    def _parse_credentials(self) -> list[Event] | None:
        buf = self._buffer
        if not buf:
            return None
        if buf[0] != AUTH_SUBNEGOTIATION_VERSION:
            reason = f"bad username/password subnegotiation version 0x{buf[0]:02x}"
            return [self._fail(reason, AUTH_FAILURE)]
        if len(buf) < 2:
            return None
        ulen = buf[1]
        if len(buf) < 3 + ulen:
            return None
        plen = buf[2 + ulen]
        end = 3 + ulen + plen
        if len(buf) < end:
            return None
        raw_user, raw_password = bytes(buf[2 : 2 + ulen]), bytes(buf[3 + ulen : end])
        del buf[:end]
        try:
            username, password = raw_user.decode("utf-8"), raw_password.decode("utf-8")
        except UnicodeDecodeError:
            return [self._fail("username or password is not valid UTF-8", AUTH_FAILURE)]
        self._state = State.WAIT_AUTH_DECISION
        return [AuthRequested(username, password)]

    def _parse_request(self) -> list[Event] | None:
        buf = self._buffer
        if not buf:
            return None
        if buf[0] != SOCKS_VERSION:
            reason = f"request has version byte 0x{buf[0]:02x}"
            return [self._fail_with_reply(reason, ReplyCode.GENERAL_FAILURE)]
        if len(buf) < 2:
            return None
        if buf[1] != _CMD_CONNECT:
            name = _COMMAND_NAMES.get(buf[1], f"unknown command 0x{buf[1]:02x}")
            reason = f"{name} is not supported, only CONNECT"
            return [self._fail_with_reply(reason, ReplyCode.COMMAND_NOT_SUPPORTED)]
        if len(buf) < 4:
            return None  # byte 2 is RSV: ignored, as RFC 1928 gives it no meaning
        try:
            address_type = AddressType(buf[3])
        except ValueError:
            reason = f"unknown address type 0x{buf[3]:02x}"
            return [self._fail_with_reply(reason, ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED)]
        if address_type is AddressType.DOMAIN:
            return self._parse_domain_request()
        size = 4 if address_type is AddressType.IPV4 else 16
        if len(buf) < 4 + size + 2:
            return None
        host = str(ipaddress.ip_address(bytes(buf[4 : 4 + size])))
        return [self._connect_requested(host, 4 + size, address_type)]

    def _parse_domain_request(self) -> list[Event] | None:
        buf = self._buffer
        if len(buf) < 5:
            return None
        length = buf[4]
        if length == 0:
            return [self._fail_with_reply("empty domain name", ReplyCode.HOST_UNREACHABLE)]
        if len(buf) < 5 + length + 2:
            return None
        raw = bytes(buf[5 : 5 + length])
        if not _PRINTABLE_ASCII.issuperset(raw):
            reason = f"domain name {raw!r} contains non-ASCII, space or control bytes"
            return [self._fail_with_reply(reason, ReplyCode.HOST_UNREACHABLE)]
        return [self._connect_requested(raw.decode("ascii"), 5 + length, AddressType.DOMAIN)]

    def _connect_requested(
        self, host: str, port_offset: int, address_type: AddressType
    ) -> ConnectRequested:
        port = int.from_bytes(self._buffer[port_offset : port_offset + 2], "big")
        del self._buffer[: port_offset + 2]
        self._state = State.WAIT_REPLY
        return ConnectRequested(host, port, address_type)


def encode_reply(code: ReplyCode, bind_host: str = "0.0.0.0", bind_port: int = 0) -> bytes:
    """Encode a SOCKS5 reply; ``bind_host`` may be an IPv4/IPv6 literal or a domain name."""
    if not 0 <= bind_port <= 0xFFFF:
        raise ValueError(f"bind port {bind_port} is outside 0..65535")
    header = bytes([SOCKS_VERSION, ReplyCode(code), 0x00])
    return header + _encode_address(bind_host) + bind_port.to_bytes(2, "big")


def _encode_address(host: str) -> bytes:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if not host.isascii() or not 1 <= len(host) <= 255:
            raise ValueError(
                f"bind host {host!r} is neither an IP address nor a 1-255 byte ASCII name"
            ) from None
        return bytes([AddressType.DOMAIN, len(host)]) + host.encode("ascii")
    address_type = AddressType.IPV4 if address.version == 4 else AddressType.IPV6
    return bytes([address_type]) + address.packed


# --- .pq target naming -----------------------------------------------------------------------


PQ_SUFFIX: Final = ".pq"
MAX_NAME_LENGTH: Final = 253
_LABEL: Final = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


class TargetFailure(enum.Enum):
    """Why the daemon could not open a requested target; ``reply_for`` maps each to a reply."""

    NOT_A_PQ_NAME = enum.auto()
    INVALID_NAME = enum.auto()
    ADDRESS_LITERAL = enum.auto()
    UNKNOWN_PEER = enum.auto()
    PEER_UNREACHABLE = enum.auto()
    HANDSHAKE_FAILED = enum.auto()
    POLICY_DENIED = enum.auto()
    UNKNOWN_SERVICE = enum.auto()
    SERVICE_REFUSED = enum.auto()
    INTERNAL_ERROR = enum.auto()


_REPLY_FOR: Final[dict[TargetFailure, ReplyCode]] = {
    # Name problems read like DNS failures ("Host unreachable"), as Tor does for resolve errors.
    TargetFailure.NOT_A_PQ_NAME: ReplyCode.HOST_UNREACHABLE,
    TargetFailure.INVALID_NAME: ReplyCode.HOST_UNREACHABLE,
    TargetFailure.UNKNOWN_PEER: ReplyCode.HOST_UNREACHABLE,
    # Our targets are names; IP literals get the RFC's own answer.
    TargetFailure.ADDRESS_LITERAL: ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED,
    # A known peer we cannot reach differs from a mistyped one: "Network unreachable".
    TargetFailure.PEER_UNREACHABLE: ReplyCode.NETWORK_UNREACHABLE,
    TargetFailure.HANDSHAKE_FAILED: ReplyCode.GENERAL_FAILURE,
    TargetFailure.POLICY_DENIED: ReplyCode.NOT_ALLOWED,
    # The peer answered but nothing listens under that name or port: like a TCP RST.
    TargetFailure.UNKNOWN_SERVICE: ReplyCode.CONNECTION_REFUSED,
    TargetFailure.SERVICE_REFUSED: ReplyCode.CONNECTION_REFUSED,
    TargetFailure.INTERNAL_ERROR: ReplyCode.GENERAL_FAILURE,
}


def reply_for(failure: TargetFailure) -> ReplyCode:
    """The SOCKS5 reply the daemon sends for ``failure`` (the single source of truth)."""
    return _REPLY_FOR[failure]


class TargetNameError(ProtocolError):
    """The requested target cannot name a pqtunnel service; ``failure`` selects the reply."""

    failure: ClassVar[TargetFailure] = TargetFailure.INVALID_NAME


class NotAPqName(TargetNameError):
    """The name is not under ``.pq``: pqtunnel is not a general-purpose proxy."""

    failure = TargetFailure.NOT_A_PQ_NAME


class InvalidPqName(TargetNameError):
    """The name ends in ``.pq`` but is not ``SERVICE.PEER.pq`` or ``PEER.pq`` with valid labels."""

    failure = TargetFailure.INVALID_NAME


class AddressLiteralTarget(TargetNameError):
    """The client asked for an IPv4/IPv6 address; peers are only reachable by name."""

    failure = TargetFailure.ADDRESS_LITERAL


@dataclass(frozen=True)
class ServiceTarget:
    """``SERVICE.PEER.pq``: a named service on a peer; the SOCKS port is irrelevant."""

    peer: str
    service: str


@dataclass(frozen=True)
class PortTarget:
    """``PEER.pq``: a TCP port on the peer (subject to the peer's policy)."""

    peer: str
    port: int


def parse_pq_target(host: str, port: int) -> ServiceTarget | PortTarget:
    """Parse ``SERVICE.PEER.pq`` or ``PEER.pq`` (case-insensitive, one trailing dot allowed)."""
    name = host[:-1] if host.endswith(".") else host
    if not _has_pq_suffix(name):
        raise NotAPqName(f"{host!r} is not a .pq name; use SERVICE.PEER.pq or PEER.pq")
    if not name.isascii():  # checked before lower(): U+212A KELVIN SIGN lowers to ASCII 'k'
        raise InvalidPqName(f"{host!r} contains non-ASCII characters")
    name = name.lower()
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidPqName(
            f"{host!r} is {len(name)} characters long, over the {MAX_NAME_LENGTH} allowed"
        )
    labels = name[: -len(PQ_SUFFIX)].split(".")
    if len(labels) > 2:
        raise InvalidPqName(
            f"{host!r} has {len(labels)} labels before .pq; expected SERVICE.PEER.pq or PEER.pq"
        )
    for label in labels:
        _check_label(label, host)
    if len(labels) == 2:
        return ServiceTarget(peer=labels[1], service=labels[0])
    if not 1 <= port <= 0xFFFF:
        raise InvalidPqName(f"port {port} is not valid for {host!r}; use 1-65535")
    return PortTarget(peer=labels[0], port=port)


def target_for_request(request: ConnectRequested) -> ServiceTarget | PortTarget:
    """The target of a CONNECT; raises a ``TargetNameError`` whose ``failure`` gives the reply."""
    if request.address_type is not AddressType.DOMAIN:
        raise AddressLiteralTarget(
            f"{request.host} is an IP address; reach peers by name (SERVICE.PEER.pq or PEER.pq)"
        )
    return parse_pq_target(request.host, request.port)


def _has_pq_suffix(name: str) -> bool:
    tail = name[-len(PQ_SUFFIX) :]
    return tail.isascii() and tail.lower() == PQ_SUFFIX


def _check_label(label: str, host: str) -> None:
    if not label:
        raise InvalidPqName(f"{host!r} has an empty label")
    if not _LABEL.fullmatch(label):
        raise InvalidPqName(
            f"{host!r}: label {label!r} must be 1-63 letters, digits or '-',"
            " not starting or ending with '-'"
        )
