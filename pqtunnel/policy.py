"""The one decision point: every "may this happen?" is a request to ``Policy.decide``.

The daemon asks four kinds of question, each as a plain request object:

* ``PeerRequest``: may this authenticated peer hold a session, and under which name?
  (the handshake's authorize callback)
* ``StreamRequest``: may this peer open a stream to this target, and to what backend?
  (an inbound mux OPEN)
* ``SocksAccountRequest``: are these RFC 1929 credentials one of the SOCKS accounts?
* ``AdvertisementRequest``: may an mDNS advertisement be used as a dial candidate for a
  name? (a hint only: the handshake still proves the name)

``Policy.decide(request)`` answers every one with a ``Decision``: ``allowed``, the ``rule``
that decided (``"pin:bob"``, ``"ca"``, ``"service:web"``, ``"port:8080"``,
``"socks-account:agent1"``, ``"default-deny"``, ...) and a one-line ``reason`` for the log
and the peer, plus the facts the caller needs (the proven ``name`` of a peer, the mux
``code`` of a stream refusal, the ``backend`` a stream connects to).

Each request kind is answered by an ordered chain of rules; a rule returns a Decision or
``None`` (no opinion: ask the next rule). The default chains below are today's behaviour:

* peers: a pin always wins (a dialled name that is pinned must present exactly that
  fingerprint; an undialled peer whose fingerprint is pinned gets that name); then the
  network CA (its certificate must verify, match the dialled name and not claim a name
  pinned to another key); anything else is refused (``default-deny``).
* streams: ``{"service": NAME}`` reaches the service table's entry NAME; ``{"port": N}``
  reaches ``127.0.0.1:N`` only if N is an allowed port; any other target is malformed.
* SOCKS accounts: the password must equal the account's (constant-time compare).
* advertisements: usable if the fingerprint matches the pin for the name, or, when the name
  is not pinned and is not our own, if a network CA is configured (the handshake may then
  prove it with a certificate); anything else is ``untrusted``.

Rules added later (grants by name, group or fingerprint, minimum suites, source networks,
rate budgets) are more rules in these chains (``extra_rules``, consulted first); callers do
not change. The requests already carry what such rules need (fingerprint, suite, source
address, certificate groups).

Sans-IO: no files, clocks or sockets. Certificate verification stays in ``pqtunnel.ca``:
the policy is handed a verifier callable (``CaVerifier.verify``) and the time comes in the
request.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, Union

from .errors import CertificateError
from .mux import ErrorCode
from .trust import TrustStore

# --- rule names ------------------------------------------------------------------------------

RULE_CA = "ca"
"""Decided by the network CA (a verified certificate, or why it failed)."""
RULE_DEFAULT_DENY = "default-deny"
"""No rule allowed the request."""
RULE_OWN_NAME = "own-name"
"""An advertisement claims this node's own name."""
RULE_UNKNOWN_SERVICE = "unknown-service"
"""A stream names a service this node does not have."""
RULE_BAD_TARGET = "bad-target"
"""A stream target names neither a service nor a port."""

# Advertisement / admission trust labels (``pqtunnel peers`` shows them).
PINNED, CA, UNTRUSTED = "pinned", "ca", "untrusted"


def pin_rule(name: str) -> str:
    return f"pin:{name}"


def service_rule(name: str) -> str:
    return f"service:{name}"


def port_rule(port: int) -> str:
    return f"port:{port}"


def socks_account_rule(username: str) -> str:
    return f"socks-account:{username}"


# --- requests --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class PeerRequest:
    """An authenticated peer asks to hold a session.

    ``certificate`` is the network-CA certificate it presented (verified only if no pin
    decides first), ``now`` the wall-clock time in seconds for its validity, ``dialled``
    the name we dialled (None for an inbound handshake).
    """

    fingerprint: str
    now: int
    certificate: bytes | None = None
    dialled: str | None = None
    address: str | None = None
    suite: str | None = None


@dataclass(frozen=True, kw_only=True)
class StreamRequest:
    """A peer (already admitted under ``peer``) asks to open a stream to ``target``."""

    peer: str
    target: Mapping[str, Any]
    fingerprint: str | None = None
    groups: tuple[str, ...] = ()
    address: str | None = None
    suite: str | None = None


@dataclass(frozen=True)
class SocksAccountRequest:
    """A local SOCKS client logs in with RFC 1929 username/password."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class AdvertisementRequest:
    """An mDNS advertisement claims ``name`` for ``fingerprint``: may we dial it for that name?"""

    name: str
    fingerprint: str


Request = Union[PeerRequest, StreamRequest, SocksAccountRequest, AdvertisementRequest]


# --- the answer ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalPort:
    """A stream's backend for a ``{"port": N}`` target: 127.0.0.1:N on the serving node."""

    port: int


@dataclass(frozen=True)
class Decision:
    """The answer to one request; ``rule`` names the rule that decided it.

    Kind-specific facts: ``name``, ``groups`` and ``trust`` ("pinned", "ca", "untrusted")
    for peers and advertisements; ``code`` (the mux error code to refuse with) and
    ``backend`` (the service table's value, or a ``LocalPort``) for streams.
    """

    allowed: bool
    rule: str
    reason: str
    name: str | None = None
    groups: tuple[str, ...] = ()
    trust: str | None = None
    code: ErrorCode | None = None
    backend: Any = None


class Certified(Protocol):
    """What a verified certificate tells the policy (``pqtunnel.ca.Certificate`` has it)."""

    @property
    def name(self) -> str: ...

    @property
    def groups(self) -> tuple[str, ...]: ...


CertificateVerifier = Callable[[Union[bytes, None], str, int], Certified]
"""``verify(certificate, presented_fingerprint, now)``: the certificate, or CertificateError."""

Rule = Callable[[Any], Union[Decision, None]]
"""A rule gets a request and returns a Decision, or None to let the next rule decide."""


# --- the policy ------------------------------------------------------------------------------


class Policy:
    """Every "may this happen" of one node, answered by ``decide``.

    Built from plain data: ``node_name`` (our own name), ``pins`` (a ``TrustStore``, kept
    by reference so pins added while running count, or a name -> fingerprint mapping),
    ``verify_certificate`` (the CA verifier, None without a CA), ``services`` (name ->
    service spec, returned as the stream's backend untouched), ``allowed_ports`` and
    ``socks_accounts`` (username -> password). ``extra_rules`` maps a request type to rules
    consulted before the default ones.
    """

    def __init__(self, node_name: str = "", *,
                 pins: TrustStore | Mapping[str, str] | None = None,
                 verify_certificate: CertificateVerifier | None = None,
                 services: Mapping[str, Any] | None = None,
                 allowed_ports: Iterable[int] = (),
                 socks_accounts: Mapping[str, str] | None = None,
                 extra_rules: Mapping[type, Sequence[Rule]] | None = None) -> None:
        self.node_name = node_name
        self.pins = pins if isinstance(pins, TrustStore) else TrustStore(dict(pins or {}))
        self.verify_certificate = verify_certificate
        self.services: Mapping[str, Any] = services if services is not None else {}
        self.allowed_ports = frozenset(allowed_ports)
        self.socks_accounts: Mapping[str, str] = socks_accounts if socks_accounts is not None else {}
        defaults: dict[type, list[Rule]] = {
            PeerRequest: [self._peer_pins, self._peer_certificate, self._peer_default],
            StreamRequest: [self._stream_service, self._stream_port, self._stream_default],
            SocksAccountRequest: [self._socks_account],
            AdvertisementRequest: [self._advert_pin, self._advert_own_name, self._advert_ca,
                                   self._advert_default],
        }
        extra = extra_rules or {}
        unknown = set(extra) - set(defaults)
        if unknown:
            raise TypeError(f"rules for unknown request types: {sorted(t.__name__ for t in unknown)}")
        self._rules: dict[type, tuple[Rule, ...]] = {
            kind: (*extra.get(kind, ()), *chain) for kind, chain in defaults.items()
        }

    @property
    def socks_login_required(self) -> bool:
        """SOCKS clients must log in (RFC 1929) when any account is configured."""
        return bool(self.socks_accounts)

    def decide(self, request: Request) -> Decision:
        """The one entry point: run the request's rule chain; the first rule that decides wins."""
        try:
            chain = self._rules[type(request)]
        except KeyError:
            raise TypeError(f"not a policy request: {type(request).__name__}") from None
        for rule in chain:
            decision = rule(request)
            if decision is not None:
                return decision
        raise AssertionError("the default rules always decide")  # pragma: no cover

    # --- peers: pins first, then the CA ------------------------------------------------------

    def _peer_pins(self, request: PeerRequest) -> Decision | None:
        fingerprint, dialled = request.fingerprint, request.dialled
        if dialled is not None:
            pinned = self.pins.fingerprint_for(dialled)
            if pinned is not None:
                if pinned != fingerprint:
                    return Decision(False, pin_rule(dialled), f"{dialled} presented {fingerprint}, but {pinned} is pinned",
                                    name=dialled, trust=UNTRUSTED)
                return Decision(True, pin_rule(dialled), f"{dialled} presented its pinned fingerprint",
                                name=dialled, trust=PINNED)
            return None
        name = self.pins.name_for(fingerprint)
        if name is not None:
            return Decision(True, pin_rule(name), f"{fingerprint} is pinned as {name}", name=name, trust=PINNED)
        return None

    def _peer_certificate(self, request: PeerRequest) -> Decision | None:
        if self.verify_certificate is None:
            return None
        fingerprint, dialled = request.fingerprint, request.dialled
        try:
            cert = self.verify_certificate(request.certificate, fingerprint, request.now)
        except CertificateError as exc:
            return Decision(False, RULE_CA, str(exc), name=dialled, trust=UNTRUSTED)
        if dialled is not None and cert.name != dialled:
            return Decision(False, RULE_CA, f"certificate is for {cert.name}, not {dialled}",
                            name=dialled, groups=tuple(cert.groups), trust=UNTRUSTED)
        pinned = self.pins.fingerprint_for(cert.name)
        if pinned is not None and pinned != fingerprint:  # a pin always wins over a certificate
            return Decision(False, RULE_CA, f"certificate claims {cert.name}, which is pinned to another key",
                            name=cert.name, groups=tuple(cert.groups), trust=UNTRUSTED)
        return Decision(True, RULE_CA, f"certificate for {cert.name} verified", name=cert.name,
                        groups=tuple(cert.groups), trust=CA)

    def _peer_default(self, request: PeerRequest) -> Decision:
        dialled = request.dialled
        reason = f"no pinned fingerprint for {dialled}" if dialled else f"peer {request.fingerprint} is not pinned"
        return Decision(False, RULE_DEFAULT_DENY, reason, name=dialled, trust=UNTRUSTED)

    # --- streams: a named service, or an allowed local port ------------------------------------

    def _stream_service(self, request: StreamRequest) -> Decision | None:
        service = request.target.get("service")
        if not isinstance(service, str):
            return None
        backend = self.services.get(service)
        if backend is None:
            return Decision(False, RULE_UNKNOWN_SERVICE, f"{self.node_name} has no service {service!r}",
                            code=ErrorCode.UNKNOWN_SERVICE)
        return Decision(True, service_rule(service), f"service {service} is exported", backend=backend)

    def _stream_port(self, request: StreamRequest) -> Decision | None:
        port = request.target.get("port")
        if not isinstance(port, int) or isinstance(port, bool):
            return None
        if port not in self.allowed_ports:
            return Decision(False, RULE_DEFAULT_DENY, f"port {port} on {self.node_name} is not allowed",
                            code=ErrorCode.NOT_ALLOWED)
        return Decision(True, port_rule(port), f"port {port} is an allowed port", backend=LocalPort(port))

    def _stream_default(self, request: StreamRequest) -> Decision:
        return Decision(False, RULE_BAD_TARGET, "stream target names neither a service nor a port",
                        code=ErrorCode.PROTOCOL_ERROR)

    # --- SOCKS accounts ------------------------------------------------------------------------

    def _socks_account(self, request: SocksAccountRequest) -> Decision:
        expected = self.socks_accounts.get(request.username)
        # Always one constant-time compare, also for an unknown user: the time taken tells
        # nothing about which passwords or users exist.
        same = hmac.compare_digest((expected or "").encode(), request.password.encode())
        if expected is not None and same:
            return Decision(True, socks_account_rule(request.username), f"user {request.username!r} logged in")
        return Decision(False, RULE_DEFAULT_DENY, f"wrong credentials for user {request.username!r}")

    # --- mDNS advertisements: hints, used only if the handshake can prove them ----------------

    def _advert_pin(self, request: AdvertisementRequest) -> Decision | None:
        pinned = self.pins.fingerprint_for(request.name)
        if pinned is None:
            return None
        if pinned == request.fingerprint:
            return Decision(True, pin_rule(request.name), f"matches the pin for {request.name}",
                            name=request.name, trust=PINNED)
        return Decision(False, pin_rule(request.name), f"does not match the pinned {pinned} (possible spoofing)",
                        name=request.name, trust=UNTRUSTED)

    def _advert_own_name(self, request: AdvertisementRequest) -> Decision | None:
        if request.name != self.node_name:
            return None
        return Decision(False, RULE_OWN_NAME, "claims this node's own name", name=request.name, trust=UNTRUSTED)

    def _advert_ca(self, request: AdvertisementRequest) -> Decision | None:
        if self.verify_certificate is None:
            return None
        return Decision(True, RULE_CA, f"a CA certificate may prove {request.name} in the handshake",
                        name=request.name, trust=CA)

    def _advert_default(self, request: AdvertisementRequest) -> Decision:
        return Decision(False, RULE_DEFAULT_DENY, "is neither pinned nor under a CA", name=request.name,
                        trust=UNTRUSTED)
