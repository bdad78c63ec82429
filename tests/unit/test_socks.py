"""Spec for the sans-IO SOCKS5 server and ``.pq`` target naming (pqtunnel/socks.py).

Byte strings are written out in full so each test doubles as a wire example of RFC 1928
(SOCKS5) and RFC 1929 (username/password).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from pqtunnel.errors import PqtunnelError, ProtocolError
from pqtunnel.socks import (
    HTTP_HINT_RESPONSE,
    MAX_BUFFERED,
    SOCKS4_REJECT,
    AddressLiteralTarget,
    AddressType,
    AuthRequested,
    ConnectRequested,
    Event,
    InvalidPqName,
    NotAPqName,
    PortTarget,
    ReplyCode,
    ServiceTarget,
    Socks5Server,
    SocksError,
    SocksUsageError,
    State,
    TargetFailure,
    TargetNameError,
    encode_reply,
    parse_pq_target,
    reply_for,
    target_for_request,
)

GREETING_NO_AUTH = b"\x05\x01\x00"  # VER=5, NMETHODS=1, METHODS=[no auth]
GREETING_USERPASS = b"\x05\x01\x02"  # VER=5, NMETHODS=1, METHODS=[username/password]
CHOSE_NO_AUTH = b"\x05\x00"
CHOSE_USERPASS = b"\x05\x02"
NO_ACCEPTABLE = b"\x05\xff"
AUTH_OK = b"\x01\x00"
AUTH_FAILED = b"\x01\x01"
FAILURE_REPLY_TAIL = b"\x00\x01\x00\x00\x00\x00\x00\x00"  # RSV, ATYP=IPv4, 0.0.0.0, port 0


def credentials(username: bytes, password: bytes) -> bytes:
    """RFC 1929: VER=1, ULEN, UNAME, PLEN, PASSWD."""
    return b"\x01" + bytes([len(username)]) + username + bytes([len(password)]) + password


def connect(host: bytes, port: int, command: int = 0x01) -> bytes:
    """RFC 1928 request with a domain-name address (ATYP=3)."""
    return b"\x05" + bytes([command]) + b"\x00\x03" + bytes([len(host)]) + host + port.to_bytes(2, "big")


def one_byte_chunks(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def failure_reply(code: ReplyCode) -> bytes:
    return b"\x05" + bytes([code]) + FAILURE_REPLY_TAIL


@dataclass
class Transcript:
    """Everything observable from one negotiation, for equivalence checks."""

    events: list[Event] = field(default_factory=list)
    sent: bytes = b""
    state: State = State.WAIT_GREETING
    trailing: bytes = b""


def drive(
    chunks: Iterable[bytes],
    *,
    require_auth: bool = False,
    accept: bool = True,
    reply: ReplyCode | None = None,
) -> Transcript:
    """Feed ``chunks`` like an I/O shell would, answering credentials (``accept``) at once.

    The CONNECT is answered (with ``reply``) only after all chunks are in, as a daemon that
    is still dialling the peer while the client sends early data.
    """
    server = Socks5Server(require_auth=require_auth)
    transcript = Transcript()
    for chunk in chunks:
        pending = server.receive_data(chunk)
        while pending:
            event = pending.pop(0)
            transcript.events.append(event)
            if isinstance(event, AuthRequested):
                pending += server.accept_credentials(accept)
    if reply is not None and server.state is State.WAIT_REPLY:
        server.reply(reply)
    transcript.sent = server.data_to_send()
    transcript.state = server.state
    transcript.trailing = server.trailing_data()
    return transcript


def only_error(transcript: Transcript) -> SocksError:
    errors = [event for event in transcript.events if isinstance(event, SocksError)]
    assert len(errors) == 1, transcript.events
    assert transcript.state is State.CLOSED
    return errors[0]


# --- happy paths ---------------------------------------------------------------------------


def test_connect_without_auth() -> None:
    server = Socks5Server()

    assert server.receive_data(GREETING_NO_AUTH) == []
    assert server.data_to_send() == CHOSE_NO_AUTH

    events = server.receive_data(connect(b"web.bob.pq", 80))
    assert events == [ConnectRequested("web.bob.pq", 80, AddressType.DOMAIN)]
    assert server.state is State.WAIT_REPLY

    server.reply(ReplyCode.SUCCEEDED)
    assert server.data_to_send() == b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    assert server.state is State.ESTABLISHED
    assert server.trailing_data() == b""


def test_connect_with_username_password() -> None:
    server = Socks5Server(require_auth=True)

    assert server.receive_data(b"\x05\x02\x00\x02") == []  # client offers no-auth and user/pass
    assert server.data_to_send() == CHOSE_USERPASS

    assert server.receive_data(credentials(b"alice", b"s3cret")) == [AuthRequested("alice", "s3cret")]
    assert server.state is State.WAIT_AUTH_DECISION
    assert server.accept_credentials(True) == []
    assert server.data_to_send() == AUTH_OK

    events = server.receive_data(connect(b"bob.pq", 22))
    assert events == [ConnectRequested("bob.pq", 22, AddressType.DOMAIN)]
    server.reply(ReplyCode.SUCCEEDED, "10.0.0.1", 4242)
    assert server.data_to_send() == b"\x05\x00\x00\x01\x0a\x00\x00\x01\x10\x92"


def test_request_pipelined_behind_credentials_is_returned_by_accept_credentials() -> None:
    server = Socks5Server(require_auth=True)
    events = server.receive_data(GREETING_USERPASS + credentials(b"u", b"p") + connect(b"bob.pq", 8080))

    assert events == [AuthRequested("u", "p")]  # the request waits for the decision
    assert server.accept_credentials(True) == [ConnectRequested("bob.pq", 8080, AddressType.DOMAIN)]
    assert server.data_to_send() == CHOSE_USERPASS + AUTH_OK


def test_password_is_kept_out_of_repr() -> None:
    assert "hunter2" not in repr(AuthRequested("alice", "hunter2"))


def test_empty_credentials_are_left_to_the_caller() -> None:
    transcript = drive([GREETING_USERPASS + credentials(b"", b"")], require_auth=True, accept=False)
    assert transcript.events == [AuthRequested("", "")]
    assert transcript.sent == CHOSE_USERPASS + AUTH_FAILED


@pytest.mark.parametrize("require_auth", [False, True])
def test_byte_at_a_time_matches_one_chunk(require_auth: bool) -> None:
    greeting = GREETING_USERPASS + credentials(b"alice", b"pw") if require_auth else GREETING_NO_AUTH
    stream = greeting + connect(b"web.bob.pq", 443) + b"early bytes"

    whole = drive([stream], require_auth=require_auth, reply=ReplyCode.SUCCEEDED)
    bytewise = drive(one_byte_chunks(stream), require_auth=require_auth, reply=ReplyCode.SUCCEEDED)

    assert bytewise == whole
    assert whole.events[-1] == ConnectRequested("web.bob.pq", 443, AddressType.DOMAIN)
    assert whole.trailing == b"early bytes"


@pytest.mark.parametrize(
    ("bind_host", "bind_port", "expected"),
    [
        ("0.0.0.0", 0, b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"),
        ("::1", 1080, b"\x05\x00\x00\x04" + b"\x00" * 15 + b"\x01\x04\x38"),
        ("proxy.local", 1, b"\x05\x00\x00\x03\x0bproxy.local\x00\x01"),
    ],
)
def test_reply_encodes_the_bind_address(bind_host: str, bind_port: int, expected: bytes) -> None:
    assert encode_reply(ReplyCode.SUCCEEDED, bind_host, bind_port) == expected


@pytest.mark.parametrize(
    ("bind_host", "bind_port"), [("0.0.0.0", 65536), ("0.0.0.0", -1), ("", 0), ("é.local", 0)]
)
def test_reply_rejects_an_unencodable_bind_address(bind_host: str, bind_port: int) -> None:
    with pytest.raises(ValueError):
        encode_reply(ReplyCode.SUCCEEDED, bind_host, bind_port)


# --- refusals: each gets its documented bytes and reply code ---------------------------------


REFUSALS = [
    # (case, require_auth, client bytes, bytes sent before closing, SocksError.reply_code)
    ("greeting lists zero methods", False, b"\x05\x00", NO_ACCEPTABLE, None),
    ("client offers only user/pass", False, GREETING_USERPASS, NO_ACCEPTABLE, None),
    ("client offers only no-auth but auth required", True, GREETING_NO_AUTH, NO_ACCEPTABLE, None),
    ("client offers only GSSAPI", False, b"\x05\x01\x01", NO_ACCEPTABLE, None),
    ("bad RFC 1929 version", True, GREETING_USERPASS + b"\x05\x01u\x01p",
     CHOSE_USERPASS + AUTH_FAILED, None),
    ("credentials not UTF-8", True, GREETING_USERPASS + credentials(b"\xff", b"p"),
     CHOSE_USERPASS + AUTH_FAILED, None),
    ("BIND", False, GREETING_NO_AUTH + connect(b"bob.pq", 80, command=0x02),
     CHOSE_NO_AUTH + failure_reply(ReplyCode.COMMAND_NOT_SUPPORTED), ReplyCode.COMMAND_NOT_SUPPORTED),
    ("UDP ASSOCIATE", False, GREETING_NO_AUTH + connect(b"bob.pq", 80, command=0x03),
     CHOSE_NO_AUTH + failure_reply(ReplyCode.COMMAND_NOT_SUPPORTED), ReplyCode.COMMAND_NOT_SUPPORTED),
    ("unknown command", False, GREETING_NO_AUTH + connect(b"bob.pq", 80, command=0x09),
     CHOSE_NO_AUTH + failure_reply(ReplyCode.COMMAND_NOT_SUPPORTED), ReplyCode.COMMAND_NOT_SUPPORTED),
    ("unknown address type", False, GREETING_NO_AUTH + b"\x05\x01\x00\x02",
     CHOSE_NO_AUTH + failure_reply(ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED),
     ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED),
    ("request with version 4", False, GREETING_NO_AUTH + b"\x04\x01\x00\x03",
     CHOSE_NO_AUTH + failure_reply(ReplyCode.GENERAL_FAILURE), ReplyCode.GENERAL_FAILURE),
    ("empty domain name", False, GREETING_NO_AUTH + connect(b"", 80),
     CHOSE_NO_AUTH + failure_reply(ReplyCode.HOST_UNREACHABLE), ReplyCode.HOST_UNREACHABLE),
    ("non-ASCII domain name", False, GREETING_NO_AUTH + connect("wéb.bob.pq".encode(), 80),
     CHOSE_NO_AUTH + failure_reply(ReplyCode.HOST_UNREACHABLE), ReplyCode.HOST_UNREACHABLE),
    ("control byte in domain name", False, GREETING_NO_AUTH + connect(b"web\x00.bob.pq", 80),
     CHOSE_NO_AUTH + failure_reply(ReplyCode.HOST_UNREACHABLE), ReplyCode.HOST_UNREACHABLE),
    ("space in domain name", False, GREETING_NO_AUTH + connect(b"web bob.pq", 80),
     CHOSE_NO_AUTH + failure_reply(ReplyCode.HOST_UNREACHABLE), ReplyCode.HOST_UNREACHABLE),
    ("SOCKS4 CONNECT", False, b"\x04\x01\x00\x50\x7f\x00\x00\x01alice\x00", SOCKS4_REJECT, None),
    ("SOCKS4a CONNECT", False, b"\x04\x01\x00\x50\x00\x00\x00\x01\x00web.bob.pq\x00",
     SOCKS4_REJECT, None),
    ("unknown version byte", False, b"\x06\x01\x00", b"", None),
    ("HTTP sent to the SOCKS port", False, b"GET / HTTP/1.1\r\n", HTTP_HINT_RESPONSE, None),
]


@pytest.mark.parametrize(
    ("require_auth", "data", "sent", "reply_code"),
    [case[1:] for case in REFUSALS],
    ids=[case[0] for case in REFUSALS],
)
def test_refusal(require_auth: bool, data: bytes, sent: bytes, reply_code: ReplyCode | None) -> None:
    for chunks in ([data], one_byte_chunks(data)):
        transcript = drive(chunks, require_auth=require_auth)
        error = only_error(transcript)
        assert error.reply_code == reply_code
        assert error.reason
        assert transcript.sent == sent


def test_socks4_reject_is_a_socks4_reply_with_code_0x5b() -> None:
    assert SOCKS4_REJECT[:2] == b"\x00\x5b" and len(SOCKS4_REJECT) == 8


def test_http_hint_is_a_complete_http_response() -> None:
    head, body = HTTP_HINT_RESPONSE.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 400 ")
    assert f"Content-Length: {len(body)}".encode() in head
    assert b"SOCKS5" in body


def test_wrong_credentials_get_rfc1929_failure_then_close() -> None:
    data = GREETING_USERPASS + credentials(b"alice", b"wrong")
    transcript = drive([data], require_auth=True, accept=False)
    assert transcript.events == [AuthRequested("alice", "wrong")]
    assert transcript.sent == CHOSE_USERPASS + AUTH_FAILED
    assert transcript.state is State.CLOSED


def test_incomplete_messages_wait_for_more_bytes() -> None:
    server = Socks5Server()
    assert server.receive_data(b"\x05") == []
    assert server.receive_data(b"\x02\x00") == []  # one of two methods
    assert server.state is State.WAIT_GREETING
    assert server.data_to_send() == b""


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", r"closed the connection before completing its greeting$"),
        (b"\x05\x02\x00", r"before completing its greeting \(3 bytes of it received\)"),
        (GREETING_NO_AUTH + b"\x05\x01\x00\x03\x0aweb", r"before completing its request \(8 bytes"),
    ],
)
def test_eof_before_the_request_is_complete_is_an_error(data: bytes, reason: str) -> None:
    transcript = drive([data, b""] if data else [b""])
    error = only_error(transcript)
    assert re.search(reason, error.reason)
    assert error.reply_code is None


def test_eof_after_the_request_is_recorded_not_refused() -> None:
    server = Socks5Server()
    server.receive_data(GREETING_NO_AUTH + connect(b"bob.pq", 25) + b"HELO")
    assert server.receive_data(b"") == []
    assert server.eof_received
    server.reply(ReplyCode.SUCCEEDED)
    assert server.trailing_data() == b"HELO"


# --- addresses -----------------------------------------------------------------------------


def test_255_byte_domain_name_is_parsed() -> None:
    name = b".".join([b"a" * 63] * 4)  # 255 bytes: the most a SOCKS5 length byte allows
    assert len(name) == 255
    transcript = drive([GREETING_NO_AUTH + connect(name, 80)])
    assert transcript.events == [ConnectRequested(name.decode(), 80, AddressType.DOMAIN)]


def test_ipv4_request_is_parsed_and_refused_with_address_type_not_supported() -> None:
    transcript = drive([GREETING_NO_AUTH + b"\x05\x01\x00\x01\xc0\xa8\x01\x02\x01\xbb"])
    (request,) = transcript.events
    assert request == ConnectRequested("192.168.1.2", 443, AddressType.IPV4)
    with pytest.raises(AddressLiteralTarget) as caught:
        target_for_request(request)
    assert reply_for(caught.value.failure) is ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED


def test_ipv6_request_is_parsed_and_refused_with_address_type_not_supported() -> None:
    address = bytes.fromhex("20010db8000000000000000000000001")
    transcript = drive([GREETING_NO_AUTH + b"\x05\x01\x00\x04" + address + b"\x00\x50"])
    (request,) = transcript.events
    assert request == ConnectRequested("2001:db8::1", 80, AddressType.IPV6)
    with pytest.raises(AddressLiteralTarget) as caught:
        target_for_request(request)
    assert reply_for(caught.value.failure) is ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED


# --- early data ----------------------------------------------------------------------------


def test_bytes_after_the_request_are_kept_as_early_data() -> None:
    server = Socks5Server()
    server.receive_data(GREETING_NO_AUTH + connect(b"web.bob.pq", 80) + b"GET / HTTP/1.1\r\n")
    assert server.receive_data(b"Host: web.bob.pq\r\n\r\n") == []  # still dialling the peer

    server.reply(ReplyCode.SUCCEEDED)
    assert server.trailing_data() == b"GET / HTTP/1.1\r\nHost: web.bob.pq\r\n\r\n"
    assert server.trailing_data() == b""  # handed over exactly once


def test_feeding_after_establishment_is_a_usage_error_not_data_loss() -> None:
    server = Socks5Server()
    server.receive_data(GREETING_NO_AUTH + connect(b"bob.pq", 80))
    server.reply(ReplyCode.SUCCEEDED)
    with pytest.raises(SocksUsageError):
        server.receive_data(b"late")


def test_early_data_is_bounded() -> None:
    server = Socks5Server()
    server.receive_data(GREETING_NO_AUTH + connect(b"bob.pq", 80))
    server.data_to_send()
    (error,) = server.receive_data(b"x" * (MAX_BUFFERED + 1))
    assert isinstance(error, SocksError) and error.reply_code is ReplyCode.GENERAL_FAILURE
    assert server.data_to_send() == failure_reply(ReplyCode.GENERAL_FAILURE)
    assert server.state is State.CLOSED


def test_pipelined_bytes_are_bounded_while_credentials_are_checked() -> None:
    server = Socks5Server(require_auth=True)
    server.receive_data(GREETING_USERPASS + credentials(b"u", b"p"))
    server.data_to_send()
    (error,) = server.receive_data(b"x" * (MAX_BUFFERED + 1))
    assert isinstance(error, SocksError) and error.reply_code is None
    assert server.data_to_send() == AUTH_FAILED
    with pytest.raises(SocksUsageError):  # the pending decision is moot once closed
        server.accept_credentials(True)


def test_failed_reply_closes_and_drops_early_data() -> None:
    server = Socks5Server()
    server.receive_data(GREETING_NO_AUTH + connect(b"web.carol.pq", 80) + b"GET /")
    server.reply(ReplyCode.HOST_UNREACHABLE)
    assert server.data_to_send() == CHOSE_NO_AUTH + failure_reply(ReplyCode.HOST_UNREACHABLE)
    assert server.state is State.CLOSED
    assert server.trailing_data() == b""
    assert server.receive_data(b"more") == []  # closed: later bytes are irrelevant


# --- API misuse ----------------------------------------------------------------------------


def test_reply_before_a_request_is_a_usage_error() -> None:
    with pytest.raises(SocksUsageError, match="reply called in state WAIT_GREETING"):
        Socks5Server().reply(ReplyCode.SUCCEEDED)


def test_accept_credentials_without_auth_request_is_a_usage_error() -> None:
    with pytest.raises(SocksUsageError):
        Socks5Server(require_auth=True).accept_credentials(True)


def test_usage_errors_are_pqtunnel_errors() -> None:
    assert issubclass(SocksUsageError, PqtunnelError)


# --- properties ----------------------------------------------------------------------------


def respond_everywhere(server: Socks5Server, events: list[Event], reply: ReplyCode) -> list[Event]:
    """Answer every decision point, returning all events seen (including pipelined ones)."""
    seen: list[Event] = []
    while events:
        event = events.pop(0)
        seen.append(event)
        if isinstance(event, AuthRequested):
            events += server.accept_credentials(event.username == "ok")
        elif isinstance(event, ConnectRequested):
            server.reply(reply)
    return seen


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(st.binary(max_size=64), max_size=12),
    require_auth=st.booleans(),
    reply=st.sampled_from(ReplyCode),
)
def test_arbitrary_bytes_only_ever_produce_events(
    chunks: list[bytes], require_auth: bool, reply: ReplyCode
) -> None:
    server = Socks5Server(require_auth=require_auth)
    for chunk in chunks:
        if server.state is State.ESTABLISHED:
            break
        events = respond_everywhere(server, server.receive_data(chunk), reply)
        assert all(isinstance(event, AuthRequested | ConnectRequested | SocksError) for event in events)
        assert isinstance(server.data_to_send(), bytes)


@st.composite
def client_streams(draw: st.DrawFn) -> tuple[bool, bytes]:
    """Mostly well-formed sessions with random corruption, plus pure noise."""
    require_auth = draw(st.booleans())
    methods = draw(st.lists(st.sampled_from([0, 1, 2, 0x80]), max_size=3))
    if draw(st.integers(0, 4)):  # usually offer the method the server wants
        methods.append(2 if require_auth else 0)
    parts = [b"\x05" + bytes([len(methods)]) + bytes(methods)]
    if require_auth:
        words = st.text(max_size=8).map(str.encode)
        parts.append(credentials(draw(words), draw(words)))
    host = draw(st.one_of(st.from_regex(rb"\A[a-z0-9.-]{0,40}\.pq\Z"), st.binary(max_size=20)))
    command = draw(st.sampled_from([1, 1, 1, 2, 3]))
    parts.append(connect(host, draw(st.integers(0, 0xFFFF)), command=command))
    parts.append(draw(st.binary(max_size=32)))  # early data
    stream = b"".join(parts)
    if draw(st.integers(0, 2)) == 0:
        at = draw(st.integers(0, len(stream) - 1))
        stream = stream[:at] + bytes([draw(st.integers(0, 255))]) + stream[at + 1 :]
    noise = draw(st.binary(max_size=100))
    return require_auth, draw(st.sampled_from([stream, stream, stream, noise]))


@settings(max_examples=300, deadline=None)
@given(session=client_streams(), cuts=st.lists(st.integers(0, 600), max_size=20), accept=st.booleans())
def test_chunking_never_changes_the_outcome(
    session: tuple[bool, bytes], cuts: list[int], accept: bool
) -> None:
    require_auth, stream = session
    bounds = sorted({0, len(stream), *(cut for cut in cuts if cut < len(stream))})
    chunks = [stream[start:end] for start, end in zip(bounds, bounds[1:])]

    run = partial(drive, require_auth=require_auth, accept=accept, reply=ReplyCode.SUCCEEDED)
    assert run(chunks) == run([stream] if stream else [])


# --- .pq target naming ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "target"),
    [
        ("web.bob.pq", 80, ServiceTarget(peer="bob", service="web")),
        ("web.bob.pq", 12345, ServiceTarget(peer="bob", service="web")),  # the port is irrelevant
        ("WEB.Bob.PQ", 443, ServiceTarget(peer="bob", service="web")),
        ("web.bob.pq.", 80, ServiceTarget(peer="bob", service="web")),  # fully qualified form
        ("bob.pq", 22, PortTarget(peer="bob", port=22)),
        ("BOB.Pq", 65535, PortTarget(peer="bob", port=65535)),
        ("x-1.node-7.pq", 80, ServiceTarget(peer="node-7", service="x-1")),
        (f"{'s' * 63}.{'p' * 63}.pq", 80, ServiceTarget(peer="p" * 63, service="s" * 63)),
    ],
)
def test_pq_names(host: str, port: int, target: ServiceTarget | PortTarget) -> None:
    assert parse_pq_target(host, port) == target


@pytest.mark.parametrize(
    "host", ["example.com", "bob", "pq", "bob.pqx", "bob.p", "10.0.0.1", "", "bob.pq.com", "bob.pq.."]
)
def test_names_outside_pq_are_not_pq_names(host: str) -> None:
    with pytest.raises(NotAPqName, match="not a .pq name"):
        parse_pq_target(host, 80)


@pytest.mark.parametrize(
    ("host", "port", "message"),
    [
        ("a.b.bob.pq", 80, "3 labels before .pq"),
        (".pq", 80, "empty label"),
        ("web..pq", 80, "empty label"),
        (".bob.pq", 80, "empty label"),
        ("-web.bob.pq", 80, "label '-web'"),
        ("web-.bob.pq", 80, "label 'web-'"),
        ("web.-bob.pq", 80, "label '-bob'"),
        ("we_b.bob.pq", 80, "label 'we_b'"),
        (f"{'s' * 64}.bob.pq", 80, "must be 1-63"),
        ("wéb.bob.pq", 80, "non-ASCII"),
        ("\u212aeys.bob.pq", 80, "non-ASCII"),  # Kelvin sign would lower() to an ASCII 'k'
        ("bob.pq", 0, "port 0"),
    ],
)
def test_malformed_pq_names(host: str, port: int, message: str) -> None:
    with pytest.raises(InvalidPqName, match=re.escape(message)):
        parse_pq_target(host, port)


def test_pq_names_over_253_characters_are_invalid() -> None:
    host = ".".join(["a" * 63] * 4)[:251] + ".pq"  # 254 characters, as a SOCKS5 name may be
    assert len(host) == 254
    with pytest.raises(InvalidPqName, match="254 characters long, over the 253 allowed"):
        parse_pq_target(host, 80)


def test_target_name_errors_share_a_base_and_are_protocol_errors() -> None:
    for error in (NotAPqName, InvalidPqName, AddressLiteralTarget):
        assert issubclass(error, TargetNameError)
    assert issubclass(TargetNameError, ProtocolError)


def test_target_for_request_parses_domain_requests() -> None:
    request = ConnectRequested("web.bob.pq", 80, AddressType.DOMAIN)
    assert target_for_request(request) == ServiceTarget(peer="bob", service="web")


# --- reply codes for daemon failures (one source of truth) -----------------------------------


REPLY_FOR = {
    TargetFailure.NOT_A_PQ_NAME: ReplyCode.HOST_UNREACHABLE,
    TargetFailure.INVALID_NAME: ReplyCode.HOST_UNREACHABLE,
    TargetFailure.ADDRESS_LITERAL: ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED,
    TargetFailure.UNKNOWN_PEER: ReplyCode.HOST_UNREACHABLE,
    TargetFailure.PEER_UNREACHABLE: ReplyCode.NETWORK_UNREACHABLE,
    TargetFailure.HANDSHAKE_FAILED: ReplyCode.GENERAL_FAILURE,
    TargetFailure.POLICY_DENIED: ReplyCode.NOT_ALLOWED,
    TargetFailure.UNKNOWN_SERVICE: ReplyCode.CONNECTION_REFUSED,
    TargetFailure.SERVICE_REFUSED: ReplyCode.CONNECTION_REFUSED,
    TargetFailure.INTERNAL_ERROR: ReplyCode.GENERAL_FAILURE,
}


def test_every_failure_has_its_documented_reply_code() -> None:
    assert {failure: reply_for(failure) for failure in TargetFailure} == REPLY_FOR


@pytest.mark.parametrize(
    ("host", "port", "reply"),
    [
        ("example.com", 443, ReplyCode.HOST_UNREACHABLE),
        ("a.b.bob.pq", 80, ReplyCode.HOST_UNREACHABLE),
        ("bob.pq", 0, ReplyCode.HOST_UNREACHABLE),
    ],
)
def test_name_errors_carry_their_reply(host: str, port: int, reply: ReplyCode) -> None:
    with pytest.raises(TargetNameError) as caught:
        parse_pq_target(host, port)
    assert reply_for(caught.value.failure) is reply


# --- a real client: curl through a minimal trio shell -----------------------------------------

CURL = shutil.which("curl")
PEERS = {"bob": {"web"}}  # the toy daemon knows one peer with one service
HTTP_OK = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 6\r\n\r\nhello\n"


def decide(request: ConnectRequested) -> ReplyCode:
    """What the daemon would do, minus the tunnel: resolve the name, map failures to replies."""
    try:
        target = target_for_request(request)
    except TargetNameError as error:
        return reply_for(error.failure)
    if target.peer not in PEERS:
        return reply_for(TargetFailure.UNKNOWN_PEER)
    if isinstance(target, ServiceTarget) and target.service not in PEERS[target.peer]:
        return reply_for(TargetFailure.UNKNOWN_SERVICE)
    return ReplyCode.SUCCEEDED


async def serve_socks(stream: trio.SocketStream, server: Socks5Server, seen: list[Event]) -> None:
    """The thin I/O shell: bytes to the state machine, its bytes back, then a fake service."""
    async with stream:
        while server.state not in (State.ESTABLISHED, State.CLOSED):
            pending = server.receive_data(await stream.receive_some(4096))
            while pending:
                event = pending.pop(0)
                seen.append(event)
                if isinstance(event, AuthRequested):
                    ok = (event.username, event.password) == ("alice", "s3cret")
                    pending += server.accept_credentials(ok)
                elif isinstance(event, ConnectRequested):
                    server.reply(decide(event))
            await stream.send_all(server.data_to_send())
        if server.state is State.ESTABLISHED:
            request = server.trailing_data()
            while b"\r\n\r\n" not in request:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                request += chunk
            await stream.send_all(HTTP_OK)


@dataclass
class CurlResult:
    returncode: int
    stdout: str
    stderr: str
    events: list[Event]


async def run_curl(
    url: str, *curl_args: str, require_auth: bool = False, proxy_option: str = "--socks5-hostname"
) -> CurlResult:
    """Run curl against a one-connection-per-client SOCKS shell on an ephemeral port."""
    assert CURL is not None
    seen: list[Event] = []

    async def handler(stream: trio.SocketStream) -> None:
        await serve_socks(stream, Socks5Server(require_auth=require_auth), seen)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(10):
            done = await trio.run_process(
                # -q: ignore ~/.curlrc; --noproxy "": NO_PROXY must not bypass our proxy
                [CURL, "-q", "-sS", "--max-time", "5", "--noproxy", "", proxy_option,
                 f"127.0.0.1:{port}", *curl_args, url],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        nursery.cancel_scope.cancel()
    return CurlResult(done.returncode, done.stdout.decode(), done.stderr.decode(), seen)


DOMAIN = AddressType.DOMAIN
CURLE_PROXY = 97  # curl >= 7.73: "proxy handshake error", used for every SOCKS refusal
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")


@needs_curl
async def test_curl_reaches_a_known_service() -> None:
    result = await run_curl("http://web.bob.pq/")
    assert result.events == [ConnectRequested("web.bob.pq", 80, DOMAIN)]
    assert (result.returncode, result.stdout) == (0, "hello\n")


@needs_curl
@pytest.mark.parametrize(
    ("url", "expected", "reply"),
    [
        ("http://web.carol.pq/", ConnectRequested("web.carol.pq", 80, DOMAIN), ReplyCode.HOST_UNREACHABLE),
        ("http://ssh.bob.pq:22/", ConnectRequested("ssh.bob.pq", 22, DOMAIN), ReplyCode.CONNECTION_REFUSED),
        ("http://example.com/", ConnectRequested("example.com", 80, DOMAIN), ReplyCode.HOST_UNREACHABLE),
        ("http://127.0.0.1:8080/", ConnectRequested("127.0.0.1", 8080, AddressType.IPV4),
         ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED),
    ],
    ids=["unknown-peer", "unknown-service", "not-pq", "ipv4-literal"],
)
async def test_curl_reports_the_refusal(url: str, expected: ConnectRequested, reply: ReplyCode) -> None:
    result = await run_curl(url)
    assert result.events == [expected]
    assert result.returncode == CURLE_PROXY
    # curl prints the reply code: "Can't complete SOCKS5 connection to HOST. (4)"
    assert re.search(rf"SOCKS5 connection to .*\({int(reply)}\)", result.stderr), result.stderr


@needs_curl
async def test_curl_with_credentials() -> None:
    result = await run_curl("http://web.bob.pq/", "--proxy-user", "alice:s3cret", require_auth=True)
    assert result.events == [AuthRequested("alice", "s3cret"), ConnectRequested("web.bob.pq", 80, DOMAIN)]
    assert (result.returncode, result.stdout) == (0, "hello\n")


@needs_curl
async def test_curl_with_wrong_credentials_is_rejected() -> None:
    result = await run_curl("http://web.bob.pq/", "--proxy-user", "alice:guess", require_auth=True)
    assert result.events == [AuthRequested("alice", "guess")]
    assert result.returncode == CURLE_PROXY
    assert "rejected" in result.stderr


@needs_curl
async def test_curl_without_credentials_when_they_are_required() -> None:
    result = await run_curl("http://web.bob.pq/", require_auth=True)
    assert [type(event) for event in result.events] == [SocksError]
    assert result.returncode == CURLE_PROXY
    assert "authentication method" in result.stderr.lower()


@needs_curl
async def test_curl_speaking_socks4a_gets_a_socks4_reject() -> None:
    result = await run_curl("http://web.bob.pq/", proxy_option="--socks4a")
    assert [type(event) for event in result.events] == [SocksError]
    assert result.returncode == CURLE_PROXY
    assert "request rejected or failed" in result.stderr


def test_a_socks_endpoint_beyond_loopback_is_warned_about() -> None:
    from pqtunneld.config import Address
    from pqtunneld.socks_server import exposure_warning

    assert exposure_warning(Address("127.0.0.1", 1080), accounts=False, anyone=False) is None
    assert exposure_warning(Address("::1", 1080), accounts=False, anyone=True) is None
    without_accounts = exposure_warning(Address("0.0.0.0", 1080), accounts=False, anyone=False)
    assert without_accounts is not None and "without [socks_users]" in without_accounts
    assert exposure_warning(Address("0.0.0.0", 1080), accounts=True, anyone=False) is None
    open_to_all = exposure_warning(Address("10.0.0.2", 1080), accounts=True, anyone=True)
    assert open_to_all is not None and "anyone who can reach it" in open_to_all
