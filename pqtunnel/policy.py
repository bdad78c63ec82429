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
  fingerprint; an undialled peer whose fingerprint is pinned gets that name); then a
  transition record a legacy anchor vouches for (``migrated:ssh``, ``migrated:x509``, for a
  name not pinned to another key; docs/migration.md); then the network CA (its certificate must verify, match the dialled name and not claim a name
  pinned to another key); anything else is refused (``default-deny``).
* streams: ``{"service": NAME}`` reaches the service table's entry NAME; ``{"port": N}``
  reaches ``127.0.0.1:N`` only if N is an allowed port; any other target is malformed.
* SOCKS accounts: the password must equal the account's (constant-time compare).
* advertisements: usable if the fingerprint matches the pin for the name, or, when the name
  is not pinned and is not our own, if a network CA is configured (the handshake may then
  prove it with a certificate); anything else is ``untrusted``.

The ``[policy]`` section of a node's configuration arrives as ``AccessRules`` (plain data:
grants, triggers, the legacy budget, the policy's own tests). Without it the defaults above
are the whole policy; with it, access is denied by default and:

* streams: a service or port is reachable only through a ``Grant`` matching the peer (its
  proven name, a group of its CA certificate, its fingerprint, or ``*``), the target, the
  session's suite (``min_suite``) and the peer's source network (``from``); grants are a
  union of allows. Sessions below hybrid (classical) may reach only the legacy services.
* peers: a ``Trigger`` makes every session from outside its networks use at least its
  suite (``SuiteRequest`` tells the handshake which suites a source address may use; a peer
  admitted with a weaker suite is refused); a legacy session is admitted with the legacy
  ``RateLimit``.

Further rules can be added to these chains (``extra_rules``, consulted first); callers do
not change.

Sans-IO: no files, clocks or sockets. Certificate verification stays in ``pqtunnel.ca``:
the policy is handed a verifier callable (``CaVerifier.verify``) and the time comes in the
request.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, Union

from .crypto.suites import HYBRID, SUITES
from .errors import CertificateError, ConfigError, IdentityError, UntrustedPeerError
from .identity import normalise_fingerprint
from .mux import ErrorCode
from .names import validate_name
from .transition import transition_kind
from .trust import TrustStore

# --- rule names ------------------------------------------------------------------------------

RULE_CA = "ca"
RULE_SOCKS_ANYONE = "socks-anyone"
RULE_SOCKS_LOGIN = "socks-login"
"""Decided by the network CA (a verified certificate, or why it failed)."""
RULE_MIGRATED_SSH = "migrated:ssh"
"""Decided by a transition record and a known_hosts anchor (docs/migration.md)."""
RULE_MIGRATED_X509 = "migrated:x509"
"""Decided by a transition record signed by a certificate's key that chains to a trusted X.509 CA."""
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
MIGRATED_SSH, MIGRATED_X509 = "migrated:ssh", "migrated:x509"


def pin_rule(name: str) -> str:
    return f"pin:{name}"


def service_rule(name: str) -> str:
    return f"service:{name}"


def port_rule(port: int) -> str:
    return f"port:{port}"


def socks_user_rule(uid: int) -> str:
    return f"socks-user:{uid}"


def socks_account_rule(username: str) -> str:
    return f"socks-account:{username}"


RULE_LEGACY = "legacy"
"""A session below hybrid asked for something outside ``[policy.legacy] services``."""
RULE_NO_TRIGGER = "no-trigger"
"""No trigger raises the minimum suite for this source address."""
ACCESS_RULE_PREFIXES = ("grant:", "trigger:", RULE_LEGACY)


def grant_rule(index: int) -> str:
    return f"grant:{index}"


def trigger_rule(index: int) -> str:
    return f"trigger:{index}"


def is_access_rule(rule: str) -> bool:
    """Whether ``rule`` comes from the ``[policy]`` section (not from pins, the CA or defaults)."""
    return rule.startswith(ACCESS_RULE_PREFIXES)


# --- the [policy] section as data --------------------------------------------------------------

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
IpAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
ANYONE = "*"
GROUP_PREFIX = "group:"
PORT_PREFIX = "port:"


def suite_rank(name: str | None) -> int:
    """``classical`` < ``hybrid`` < ``pq-strong``; an unknown or missing suite ranks below all."""
    suite = SUITES.get(name or "")
    return suite.rank if suite is not None else -1


def is_legacy(suite: str | None) -> bool:
    """Below hybrid: no post-quantum key exchange (an unknown suite counts as legacy: fail closed)."""
    return suite_rank(suite) < HYBRID.rank


def host_of(address: str | None) -> IpAddress | None:
    """The IP of ``"10.0.0.1:4000"``, ``"[::1]:4000"``, ``"10.0.0.1"`` or ``"::1"``; else None."""
    if not address:
        return None
    text = address.strip()
    candidates = [text]
    if text.startswith("["):
        candidates = [text[1:].partition("]")[0]]
    elif text.count(":") == 1:
        candidates = [text.partition(":")[0]]
    for candidate in candidates:
        try:
            return ipaddress.ip_address(candidate)
        except ValueError:
            pass
    return None


def _in_any(ip: IpAddress | None, networks: Iterable[Network]) -> bool:
    return ip is not None and any(ip.version == net.version and ip in net for net in networks)


def _networks_text(networks: Iterable[Network]) -> str:
    return ", ".join(str(n) for n in networks)


@dataclass(frozen=True)
class Subject:
    """Who asks, as far as grants can tell: proven name, fingerprint, CA certificate groups."""

    name: str | None = None
    fingerprint: str | None = None
    groups: tuple[str, ...] = ()

    def describe(self) -> str:
        who = self.name or self.fingerprint or "an unnamed peer"
        return f"{who} (groups {', '.join(self.groups)})" if self.groups else who


@dataclass(frozen=True)
class Target:
    """What a stream asks for: ``service`` NAME or ``port`` N."""

    kind: str
    value: str | int

    @classmethod
    def of(cls, target: Mapping[str, Any]) -> Target | None:
        """The target of a mux OPEN (a service name wins over a port), None if it names neither."""
        service = target.get("service")
        if isinstance(service, str):
            return cls("service", service)
        port = target.get("port")
        if isinstance(port, int) and not isinstance(port, bool):
            return cls("port", port)
        return None

    def describe(self) -> str:
        return f"{self.kind} {self.value}"


def parse_destination(text: str) -> dict[str, Any]:
    """``"web"`` -> ``{"service": "web"}``, ``"port:8080"`` -> ``{"port": 8080}`` (ConfigError if neither)."""
    value = text.strip().lower()
    if value.startswith(PORT_PREFIX):
        number = value.removeprefix(PORT_PREFIX)
        if not number.isdigit() or not 0 < int(number) < 65536:
            raise ConfigError(f"destination {text!r}: the port must be a number from 1 to 65535")
        return {"port": int(number)}
    return {"service": validate_name(value, "service name")}


def parse_subject(text: str, pins: TrustStore | None = None) -> Subject:
    """A peer described as ``NAME``, ``pq1:...``, ``group:NAME`` or several of them joined by
    commas (``carol,group:ops``); a pinned name brings its fingerprint and vice versa."""
    name = fingerprint = None
    groups: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if part.lower().startswith(GROUP_PREFIX):
            groups.append(validate_name(part[len(GROUP_PREFIX):], "group name"))
        elif part.lower().startswith("pq1:"):
            try:
                fingerprint = normalise_fingerprint(part)
            except IdentityError as exc:
                raise ConfigError(str(exc)) from None
        else:
            name = validate_name(part, "peer name")
    if pins is not None:
        if name is not None and fingerprint is None:
            fingerprint = pins.fingerprint_for(name)
        elif fingerprint is not None and name is None:
            name = pins.name_for(fingerprint)
    return Subject(name, fingerprint, tuple(groups))


@dataclass(frozen=True)
class Grant:
    """``[[policy.grant]]``: peers matching ``src`` may reach targets matching ``dst``.

    ``src``: proven names, ``group:NAME`` (a group of the peer's CA certificate), fingerprints
    ``pq1:...``, ``*`` (anyone admitted). ``dst``: service names, ``port:N``, ``*`` (every
    service and every allowed port). ``min_suite``: the session must use at least this suite.
    ``networks``: the peer's source address must be in one of them (None: from anywhere).
    """

    src: tuple[str, ...]
    dst: tuple[str, ...]
    min_suite: str | None = None
    networks: tuple[Network, ...] | None = None
    index: int = 1

    @property
    def rule(self) -> str:
        return grant_rule(self.index)

    def admits(self, subject: Subject) -> bool:
        for item in self.src:
            if item == ANYONE or item == subject.name or item == subject.fingerprint:
                return True
            if item.startswith(GROUP_PREFIX) and item[len(GROUP_PREFIX):] in subject.groups:
                return True
        return False

    def reaches(self, target: Target, allowed_ports: frozenset[int]) -> bool:
        """``*`` covers every service and every allowed port; ``port:N`` opens port N itself."""
        if target.kind == "service":
            return ANYONE in self.dst or target.value in self.dst
        return f"{PORT_PREFIX}{target.value}" in self.dst or (ANYONE in self.dst and target.value in allowed_ports)

    def names_port(self, port: int) -> bool:
        return f"{PORT_PREFIX}{port}" in self.dst

    def from_ok(self, ip: IpAddress | None) -> bool:
        return self.networks is None or _in_any(ip, self.networks)

    def suite_ok(self, suite: str | None) -> bool:
        return self.min_suite is None or suite_rank(suite) >= suite_rank(self.min_suite)


@dataclass(frozen=True)
class Trigger:
    """``[[policy.trigger]]``: a session from outside ``outside`` must use at least ``min_suite``."""

    outside: tuple[Network, ...]
    min_suite: str
    index: int = 1

    @property
    def rule(self) -> str:
        return trigger_rule(self.index)

    def applies(self, ip: IpAddress | None) -> bool:
        """An unknown source address is outside every network (fail closed)."""
        return not _in_any(ip, self.outside)


@dataclass(frozen=True)
class RateLimit:
    """A token bucket's budget: ``rate`` bytes per second, ``burst`` bytes at once."""

    rate: int
    burst: int


@dataclass(frozen=True)
class LegacyRules:
    """``[policy.legacy]``: what sessions below hybrid may reach, and how fast."""

    services: tuple[str, ...] = ()
    limit: RateLimit | None = None


@dataclass(frozen=True)
class PolicyTest:
    """``[[policy.test]]``: ``src`` must reach every ``accept`` and none of ``deny``.

    ``address`` and ``suite`` describe the session the test imagines (defaults: an unknown
    address, the node's preferred suite raised to what the triggers demand).
    """

    src: str
    accept: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    address: str | None = None
    suite: str | None = None
    index: int = 1

    @property
    def label(self) -> str:
        return f"policy test #{self.index} (src {self.src!r})"


@dataclass(frozen=True)
class PolicyTestFailure:
    """One ``[[policy.test]]`` expectation that does not hold, as one line."""

    test: PolicyTest
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class AccessRules:
    """The ``[policy]`` section: present means deny by default, grants add access."""

    grants: tuple[Grant, ...] = ()
    triggers: tuple[Trigger, ...] = ()
    legacy: LegacyRules = field(default_factory=LegacyRules)
    tests: tuple[PolicyTest, ...] = ()
    source: str = ""
    """Where the rules were read from (the config file), for messages."""


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
    transition: bytes | None = None


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
class SocksClientRequest:
    """A client connects to the local SOCKS endpoint. ``uid`` is the local user that owns the
    client's socket (from the kernel's socket table), None when it is not on this host or
    cannot be identified."""

    uid: int | None


@dataclass(frozen=True)
class AdvertisementRequest:
    """An mDNS advertisement claims ``name`` for ``fingerprint``: may we dial it for that name?"""

    name: str
    fingerprint: str


@dataclass(frozen=True)
class SuiteRequest:
    """A connection from (or to) ``address`` is starting: which suites may its session use?

    Answered with the ``min_suite`` the triggers demand (None: any suite the node allows).
    """

    address: str | None


Request = Union[PeerRequest, StreamRequest, SocksAccountRequest, SocksClientRequest, AdvertisementRequest,
                SuiteRequest]


# --- the answer ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalPort:
    """A stream's backend for a ``{"port": N}`` target: 127.0.0.1:N on the serving node."""

    port: int


@dataclass(frozen=True)
class Decision:
    """The answer to one request; ``rule`` names the rule that decided it.

    Kind-specific facts: ``name``, ``groups`` and ``trust`` ("pinned", "ca", "untrusted")
    for peers and advertisements, and ``rate_limit`` for an admitted legacy session;
    ``code`` (the mux error code to refuse with) and ``backend`` (the service table's
    value, or a ``LocalPort``) for streams; ``min_suite`` for a ``SuiteRequest``.
    """

    allowed: bool
    rule: str
    reason: str
    name: str | None = None
    groups: tuple[str, ...] = ()
    trust: str | None = None
    code: ErrorCode | None = None
    backend: Any = None
    min_suite: str | None = None
    rate_limit: RateLimit | None = None


@dataclass(frozen=True)
class Check:
    """The answer to ``Policy.check``: the imagined session, the trigger, and the decision."""

    subject: Subject
    target: Mapping[str, Any]
    address: str | None
    suite: str
    trigger: Decision
    decision: Decision

    @property
    def allowed(self) -> bool:
        return self.decision.allowed

    def fields(self) -> dict[str, Any]:
        """JSON-ready (``pqtunnel policy check --json``)."""
        return {
            "allowed": self.decision.allowed, "rule": self.decision.rule, "reason": self.decision.reason,
            "src": {"name": self.subject.name, "fingerprint": self.subject.fingerprint,
                    "groups": list(self.subject.groups)},
            "dst": dict(self.target), "from": self.address, "suite": self.suite,
            "trigger": {"rule": self.trigger.rule, "reason": self.trigger.reason, "min_suite": self.trigger.min_suite},
        }


class Certified(Protocol):
    """What a verified certificate tells the policy (``pqtunnel.ca.Certificate`` has it)."""

    @property
    def name(self) -> str: ...

    @property
    def groups(self) -> tuple[str, ...]: ...


CertificateVerifier = Callable[[Union[bytes, None], str, int], Certified]
"""``verify(certificate, presented_fingerprint, now)``: the certificate, or CertificateError."""


class Migrated(Protocol):
    """What a verified transition record tells the policy (``TransitionRecord`` has it)."""

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> str: ...


TransitionVerifier = Callable[[Union[bytes, None], str, int], Union[Migrated, None]]
"""``verify(record, presented_fingerprint, now)``: the record if a legacy anchor vouches for it,
UntrustedPeerError if it fails, None when no anchor of the record's kind is configured (no
opinion: the CA may still decide). ``pqtunnel.knownhosts.LegacyVerifier`` is one."""

Rule = Callable[[Any], Union[Decision, None]]
"""A rule gets a request and returns a Decision, or None to let the next rule decide."""


# --- the policy ------------------------------------------------------------------------------


class Policy:
    """Every "may this happen" of one node, answered by ``decide``.

    Built from plain data: ``node_name`` (our own name), ``pins`` (a ``TrustStore``, kept
    by reference so pins added while running count, or a name -> fingerprint mapping),
    ``verify_certificate`` (the CA verifier, None without a CA), ``services`` (name ->
    service spec, returned as the stream's backend untouched), ``allowed_ports`` and
    ``socks_accounts`` (username -> password). ``access`` is the ``[policy]`` section (None:
    today's defaults, every admitted peer reaches every service and allowed port).
    ``extra_rules`` maps a request type to rules consulted before the default ones.
    """

    def __init__(self, node_name: str = "", *,
                 pins: TrustStore | Mapping[str, str] | None = None,
                 verify_certificate: CertificateVerifier | None = None,
                 verify_transition: TransitionVerifier | None = None,
                 services: Mapping[str, Any] | None = None,
                 allowed_ports: Iterable[int] = (),
                 socks_accounts: Mapping[str, str] | None = None,
                 socks_allowed_uids: Iterable[int] | None = None,
                 access: AccessRules | None = None,
                 extra_rules: Mapping[type, Sequence[Rule]] | None = None) -> None:
        self.node_name = node_name
        self.pins = pins if isinstance(pins, TrustStore) else TrustStore(dict(pins or {}))
        self.verify_certificate = verify_certificate
        self.verify_transition = verify_transition
        self.services: Mapping[str, Any] = services if services is not None else {}
        self.allowed_ports = frozenset(allowed_ports)
        self.socks_accounts: Mapping[str, str] = socks_accounts if socks_accounts is not None else {}
        self.socks_allowed_uids = frozenset(socks_allowed_uids) if socks_allowed_uids is not None else None
        self.access = access
        stream_access: list[Rule] = [self._stream_access] if access is not None else []
        defaults: dict[type, list[Rule]] = {
            PeerRequest: [self._peer_pins, self._peer_migrated, self._peer_certificate, self._peer_default],
            StreamRequest: [*stream_access, self._stream_service, self._stream_port, self._stream_default],
            SocksAccountRequest: [self._socks_account],
            SocksClientRequest: [self._socks_client],
            AdvertisementRequest: [self._advert_pin, self._advert_own_name, self._advert_ca,
                                   self._advert_default],
            SuiteRequest: [self._suite_floor],
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
                if isinstance(request, PeerRequest) and decision.allowed and self.access is not None:
                    return self._peer_access(request, decision)
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

    def _peer_migrated(self, request: PeerRequest) -> Decision | None:
        """A transition record vouched for by a legacy anchor (known_hosts: ``migrated:ssh``, an
        X.509 CA: ``migrated:x509``), for a name nobody pinned.

        No opinion without anchors or without a record (the CA may still decide). A record
        that fails (forged, expired, another host's key, the window closed) is refused: a
        peer claiming classical trust it cannot prove is not handed to the CA silently.
        """
        if self.verify_transition is None or request.transition is None:
            return None
        fingerprint, dialled = request.fingerprint, request.dialled
        rule = f"migrated:{transition_kind(request.transition)}"
        try:
            record = self.verify_transition(request.transition, fingerprint, request.now)
        except UntrustedPeerError as exc:
            return Decision(False, rule, str(exc), name=dialled, trust=UNTRUSTED)
        if record is None:
            return None
        if dialled is not None and record.name != dialled:
            return Decision(False, rule, f"transition record is for {record.name}, not {dialled}",
                            name=dialled, trust=UNTRUSTED)
        pinned = self.pins.fingerprint_for(record.name)
        if pinned is not None and pinned != fingerprint:  # a hybrid pin always wins over a legacy anchor
            return Decision(False, rule, f"transition record claims {record.name}, which is pinned "
                            "to another key", name=record.name, trust=UNTRUSTED)
        if record.name == self.node_name:
            return Decision(False, rule, f"transition record claims our own name {record.name}",
                            name=record.name, trust=UNTRUSTED)
        return Decision(True, rule, f"a legacy anchor vouches for {record.name}'s transition record",
                        name=record.name, trust=rule)

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

    # --- [policy]: grants, the legacy cap, triggers ---------------------------------------------

    def _stream_access(self, request: StreamRequest) -> Decision | None:
        """Deny by default: a grant must match the peer, the target, the suite and the source."""
        assert self.access is not None
        target = Target.of(request.target)
        if target is None:
            return None  # malformed: the default rule says so
        subject = Subject(request.peer, request.fingerprint, tuple(request.groups))
        if is_legacy(request.suite) and not (target.kind == "service" and target.value in self.access.legacy.services):
            allowed = ", ".join(self.access.legacy.services) or "nothing"
            return Decision(False, RULE_LEGACY, f"{request.peer} uses the {request.suite or 'unknown'} suite (below "
                            f"hybrid): legacy sessions may reach only {allowed}", code=ErrorCode.NOT_ALLOWED)
        ip = host_of(request.address)
        candidates = [g for g in self.access.grants if g.admits(subject) and g.reaches(target, self.allowed_ports)]
        for grant in candidates:
            if grant.from_ok(ip) and grant.suite_ok(request.suite):
                return self._granted(grant, target)
        reason = f"no grant lets {subject.describe()} reach {target.describe()}"
        if candidates:
            reason += f" ({self._near_miss(candidates[0], ip, request.suite)})"
        return Decision(False, RULE_DEFAULT_DENY, reason, code=ErrorCode.NOT_ALLOWED)

    def _near_miss(self, grant: Grant, ip: IpAddress | None, suite: str | None) -> str:
        """Why the closest grant did not apply: the one-line hint an operator needs."""
        if not grant.from_ok(ip):
            networks = _networks_text(grant.networks or ())
            return f"{grant.rule} would, but only from {networks}, not {ip or 'an unknown address'}"
        return f"{grant.rule} would, but needs at least {grant.min_suite}, not {suite or 'an unknown suite'}"

    def _granted(self, grant: Grant, target: Target) -> Decision:
        """The grant allows it; the target must still exist on this node."""
        if target.kind == "service":
            backend = self.services.get(str(target.value))
            if backend is None:
                return Decision(False, RULE_UNKNOWN_SERVICE, f"{self.node_name} has no service {target.value!r}",
                                code=ErrorCode.UNKNOWN_SERVICE)
            return Decision(True, grant.rule, f"{grant.rule} allows service {target.value}", backend=backend)
        port = int(target.value)
        return Decision(True, grant.rule, f"{grant.rule} allows port {port}", backend=LocalPort(port))

    def _floor(self, ip: IpAddress | None) -> Trigger | None:
        """The trigger demanding the strongest suite from this address (the first of equals)."""
        best: Trigger | None = None
        for trigger in self.access.triggers if self.access is not None else ():
            if trigger.applies(ip) and (best is None or suite_rank(trigger.min_suite) > suite_rank(best.min_suite)):
                best = trigger
        return best

    def _suite_floor(self, request: SuiteRequest) -> Decision:
        ip = host_of(request.address)
        trigger = self._floor(ip)
        if trigger is None:
            return Decision(True, RULE_NO_TRIGGER, f"no trigger applies to {ip or 'an unknown address'}")
        return Decision(True, trigger.rule, f"sessions from {ip or 'an unknown address'} (outside "
                        f"{_networks_text(trigger.outside)}) must use at least {trigger.min_suite}",
                        min_suite=trigger.min_suite)

    def _peer_access(self, request: PeerRequest, admitted: Decision) -> Decision:
        """An admitted peer: its CA groups (also when a pin decided), the triggers, the legacy budget."""
        groups = admitted.groups or self._pinned_groups(request, admitted)
        trigger = self._floor(host_of(request.address))
        if trigger is not None and suite_rank(request.suite) < suite_rank(trigger.min_suite):
            return Decision(False, trigger.rule, f"sessions from {request.address or 'an unknown address'} must use at "
                            f"least {trigger.min_suite} ({trigger.rule}: outside {_networks_text(trigger.outside)}), "
                            f"not {request.suite or 'an unknown suite'}",
                            name=admitted.name, groups=groups, trust=UNTRUSTED)
        limit = self.access.legacy.limit if self.access is not None and is_legacy(request.suite) else None
        reason = admitted.reason + (f"; legacy session limited to {limit.rate} B/s" if limit else "")
        return Decision(True, admitted.rule, reason, name=admitted.name, groups=groups, trust=admitted.trust,
                        rate_limit=limit)

    def _pinned_groups(self, request: PeerRequest, admitted: Decision) -> tuple[str, ...]:
        """A pinned peer that also presents a valid certificate for the same name keeps its groups."""
        if admitted.trust != PINNED or request.certificate is None or self.verify_certificate is None:
            return ()
        try:
            cert = self.verify_certificate(request.certificate, request.fingerprint, request.now)
        except CertificateError:
            return ()
        return tuple(cert.groups) if cert.name == admitted.name else ()

    # --- questions asked without a session: `pqtunnel policy check`, [[policy.test]] ----------

    def check(self, src: str, dst: str, *, address: str | None = None, suite: str | None = None,
              preferred_suite: str = HYBRID.name) -> Check:
        """Would ``src`` (``NAME``, ``pq1:...``, ``group:G``, or several joined by commas) reach
        ``dst`` (a service or ``port:N``) from ``address`` with ``suite``?

        Without ``suite``, the session is imagined as the handshake would make it: the node's
        ``preferred_suite``, raised to what the triggers demand from that address.
        """
        subject = parse_subject(src, self.pins)
        target = parse_destination(dst)
        floor = self.decide(SuiteRequest(address))
        if suite is None:
            suite = max(preferred_suite, floor.min_suite or preferred_suite, key=suite_rank)
        if floor.min_suite is not None and suite_rank(suite) < suite_rank(floor.min_suite):
            session = Decision(False, floor.rule, f"{floor.reason}, not {suite}: the session is refused")
            return Check(subject, target, address, suite, floor, session)
        request = StreamRequest(peer=subject.name or subject.fingerprint or "?", target=target,
                                fingerprint=subject.fingerprint, groups=subject.groups, address=address, suite=suite)
        return Check(subject, target, address, suite, floor, self.decide(request))

    def failed_tests(self, preferred_suite: str = HYBRID.name) -> list[PolicyTestFailure]:
        """Every ``[[policy.test]]`` expectation the policy does not meet (empty: all pass)."""
        failures: list[PolicyTestFailure] = []
        for test in self.access.tests if self.access is not None else ():
            for dst, expected in [*((d, True) for d in test.accept), *((d, False) for d in test.deny)]:
                result = self.check(test.src, dst, address=test.address, suite=test.suite,
                                    preferred_suite=preferred_suite)
                if result.decision.allowed != expected:
                    verdict = "allowed by" if result.decision.allowed else "denied by"
                    failures.append(PolicyTestFailure(test, f"{test.label}: {test.src} -> {dst} should be "
                                                f"{'accepted' if expected else 'denied'}, but is {verdict} "
                                                f"{result.decision.rule}: {result.decision.reason}"))
        return failures

    # --- SOCKS accounts ------------------------------------------------------------------------

    def _socks_account(self, request: SocksAccountRequest) -> Decision:
        expected = self.socks_accounts.get(request.username)
        # Always one constant-time compare, also for an unknown user: the time taken tells
        # nothing about which passwords or users exist.
        same = hmac.compare_digest((expected or "").encode(), request.password.encode())
        if expected is not None and same:
            return Decision(True, socks_account_rule(request.username), f"user {request.username!r} logged in")
        return Decision(False, RULE_DEFAULT_DENY, f"wrong credentials for user {request.username!r}")

    def _socks_client(self, request: SocksClientRequest) -> Decision:
        """Who may use the node's identity through SOCKS: by default only its own user and root.

        ``socks_allowed_uids`` None means anyone who can connect. A client that is not on this
        host (or whose owner cannot be found) is let in only to log in with an RFC 1929 account.
        """
        allowed = self.socks_allowed_uids
        if allowed is None:
            return Decision(True, RULE_SOCKS_ANYONE, "SOCKS is open to every local user (socks_allow_users = [\"*\"])")
        if request.uid is not None and request.uid in allowed:
            return Decision(True, socks_user_rule(request.uid), f"local user uid {request.uid} may use SOCKS")
        if request.uid is None and self.socks_accounts:
            return Decision(True, RULE_SOCKS_LOGIN, "client not identified on this host: it must log in")
        if request.uid is None:
            return Decision(False, RULE_DEFAULT_DENY,
                            "SOCKS client is not a local user of this host and no SOCKS accounts are configured")
        return Decision(False, RULE_DEFAULT_DENY,
                        f"local user uid {request.uid} may not use this node's SOCKS endpoint (see socks_allow_users)")

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
