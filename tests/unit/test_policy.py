"""Spec for the one decision point (pqtunnel/policy.py): every default rule, sans-IO.

The CA verifier is injected, so most tests use a tiny fake ("NAME|GROUPS|FINGERPRINT"
certificates); one test plugs in the real ``CaVerifier.verify``. The handshake adapter
(``pqtunneld.trustpolicy``) is also covered end to end in tests/unit/test_ca.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pqtunnel import policy as policy_module
from pqtunnel.ca import CaVerifier, CertificateAuthority
from pqtunnel.crypto import CryptographyBackend
from pqtunnel.crypto.suites import HYBRID
from pqtunnel.errors import CertificateError, UntrustedPeerError
from pqtunnel.identity import Identity, WireIdentity
from pqtunnel.mux import ErrorCode
from pqtunnel.policy import (
    AdvertisementRequest,
    Decision,
    LocalPort,
    PeerRequest,
    Policy,
    SocksClientRequest,
    SocksAccountRequest,
    StreamRequest,
)
from pqtunnel.trust import TrustStore

NOW = 1_800_000_000
ALICE, BOB, CAROL = "pq1:alice", "pq1:bob", "pq1:carol"


@dataclass(frozen=True)
class FakeCert:
    name: str
    groups: tuple[str, ...]


def fake_cert(name: str, fingerprint: str, *groups: str, expires: int = NOW + 60) -> bytes:
    return f"{name}|{','.join(groups)}|{fingerprint}|{expires}".encode()


def fake_verify(data: bytes | None, fingerprint: str, now: int) -> FakeCert:
    """Stands in for CaVerifier.verify: same contract (the certificate or CertificateError)."""
    if data is None:
        raise CertificateError(f"peer {fingerprint} presented no certificate")
    name, groups, holder, expires = data.decode().split("|")
    if holder != fingerprint:
        raise CertificateError(f"certificate for {name} belongs to {holder}, not {fingerprint}")
    if now >= int(expires):
        raise CertificateError(f"certificate for {name} expired")
    return FakeCert(name, tuple(g for g in groups.split(",") if g))


def peer(fingerprint: str, dialled: str | None = None, certificate: bytes | None = None) -> PeerRequest:
    return PeerRequest(fingerprint=fingerprint, dialled=dialled, certificate=certificate, now=NOW)


def stream(target: dict, peer_name: str = "alice") -> StreamRequest:
    return StreamRequest(peer=peer_name, target=target, fingerprint=ALICE, address="10.0.0.1:40000", suite="hybrid")


# --- peers: pins first, then the CA, else refused --------------------------------------------------


def test_a_pinned_peer_is_admitted_by_its_pin_dialled_or_not() -> None:
    policy = Policy("me", pins={"bob": BOB})
    for dialled in ("bob", None):
        decision = policy.decide(peer(BOB, dialled))
        assert decision.allowed and decision.name == "bob" and decision.rule == "pin:bob"
        assert decision.trust == "pinned"


def test_a_dialled_pin_must_be_presented_exactly() -> None:
    decision = Policy("me", pins={"bob": BOB}).decide(peer(CAROL, "bob"))
    assert not decision.allowed and decision.rule == "pin:bob"
    assert decision.reason == f"bob presented {CAROL}, but {BOB} is pinned"


def test_an_unknown_peer_is_refused_without_a_ca() -> None:
    policy = Policy("me", pins={"bob": BOB})
    inbound = policy.decide(peer(CAROL))
    assert not inbound.allowed and inbound.rule == "default-deny"
    assert inbound.reason == f"peer {CAROL} is not pinned"
    dialled = policy.decide(peer(CAROL, "carol"))
    assert not dialled.allowed and dialled.reason == "no pinned fingerprint for carol"


def test_a_pinned_fingerprint_dialled_under_another_name_is_not_that_name() -> None:
    """bob's key answering where we dialled carol proves nothing about carol."""
    decision = Policy("me", pins={"bob": BOB}).decide(peer(BOB, "carol"))
    assert not decision.allowed and decision.reason == "no pinned fingerprint for carol"


def test_a_valid_certificate_admits_under_its_name_and_groups() -> None:
    policy = Policy("me", verify_certificate=fake_verify)
    decision = policy.decide(peer(CAROL, None, fake_cert("carol", CAROL, "ops", "web")))
    assert decision.allowed and decision.rule == "ca" and decision.trust == "ca"
    assert decision.name == "carol" and decision.groups == ("ops", "web")
    assert policy.decide(peer(CAROL, "carol", fake_cert("carol", CAROL))).allowed


@pytest.mark.parametrize("certificate, reason", [
    (None, f"peer {CAROL} presented no certificate"),
    (fake_cert("carol", BOB), f"certificate for carol belongs to {BOB}, not {CAROL}"),
    (fake_cert("carol", CAROL, expires=NOW), "certificate for carol expired"),
])
def test_a_failed_certificate_is_refused_with_the_verifiers_reason(certificate: bytes | None, reason: str) -> None:
    decision = Policy("me", verify_certificate=fake_verify).decide(peer(CAROL, None, certificate))
    assert not decision.allowed and decision.rule == "ca" and decision.reason == reason


def test_a_dialled_name_must_match_the_certificate() -> None:
    decision = Policy("me", verify_certificate=fake_verify).decide(peer(CAROL, "dave", fake_cert("carol", CAROL)))
    assert not decision.allowed and decision.rule == "ca"
    assert decision.reason == "certificate is for carol, not dave"


def test_pins_win_over_certificates() -> None:
    policy = Policy("me", pins={"bob": BOB}, verify_certificate=fake_verify)
    claim = policy.decide(peer(CAROL, None, fake_cert("bob", CAROL)))  # a valid certificate for a pinned name
    assert not claim.allowed and claim.rule == "ca"
    assert claim.reason == "certificate claims bob, which is pinned to another key"
    dialled = policy.decide(peer(CAROL, "bob", fake_cert("bob", CAROL)))
    assert not dialled.allowed and dialled.rule == "pin:bob"
    pinned = policy.decide(peer(BOB, "bob", b"not even a certificate"))  # never verified: the pin decided
    assert pinned.allowed and pinned.rule == "pin:bob"


def test_the_real_ca_verifier_plugs_in() -> None:
    backend = CryptographyBackend()
    ca = CertificateAuthority(Identity.generate("corp"), backend)
    node = Identity.generate("carol")
    cert = ca.sign("carol", node.fingerprint, groups=("ops",), not_before=NOW - 10, not_after=NOW + 60).encode()
    policy = Policy("me", verify_certificate=CaVerifier(ca.identity.public, backend).verify)
    decision = policy.decide(peer(node.fingerprint, None, cert))
    assert decision.allowed and decision.name == "carol" and decision.groups == ("ops",)
    late = policy.decide(PeerRequest(fingerprint=node.fingerprint, certificate=cert, now=NOW + 60))
    assert not late.allowed and late.reason == "certificate for carol expired"


def test_pins_are_read_live_from_the_trust_store() -> None:
    bob = Identity.generate("bob").fingerprint
    store = TrustStore()
    policy = Policy("me", pins=store)
    assert not policy.decide(peer(bob)).allowed
    store.pin("bob", bob)  # e.g. `pqtunnel trust` while the node runs
    assert policy.decide(peer(bob)).allowed


# --- streams: a named service, or an allowed port ------------------------------------------------------


def test_a_named_service_is_allowed_with_its_spec_as_backend() -> None:
    spec = object()
    decision = Policy("bob", services={"web": spec}).decide(stream({"service": "web"}))
    assert decision == Decision(True, "service:web", "service web is exported", backend=spec)


def test_an_unknown_service_is_refused_with_unknown_service() -> None:
    decision = Policy("bob", services={"web": "127.0.0.1:80"}).decide(stream({"service": "nosuch"}))
    assert not decision.allowed and decision.code is ErrorCode.UNKNOWN_SERVICE
    assert decision.rule == "unknown-service" and decision.reason == "bob has no service 'nosuch'"


def test_an_allowed_port_reaches_localhost_and_others_are_not_allowed() -> None:
    policy = Policy("bob", allowed_ports=[8080])
    allowed = policy.decide(stream({"port": 8080}))
    assert allowed.allowed and allowed.rule == "port:8080" and allowed.backend == LocalPort(8080)
    denied = policy.decide(stream({"port": 22}))
    assert not denied.allowed and denied.code is ErrorCode.NOT_ALLOWED and denied.rule == "default-deny"
    assert denied.reason == "port 22 on bob is not allowed"


@pytest.mark.parametrize("target", [{}, {"port": True}, {"port": "8080"}, {"service": 7}, {"host": "x"}])
def test_a_target_naming_neither_service_nor_port_is_a_protocol_error(target: dict) -> None:
    decision = Policy("bob", services={"7": "x"}, allowed_ports=[1]).decide(stream(target))
    assert not decision.allowed and decision.code is ErrorCode.PROTOCOL_ERROR
    assert decision.reason == "stream target names neither a service nor a port"


def test_a_service_name_wins_over_a_port_in_the_same_target() -> None:
    decision = Policy("bob", services={"web": "spec"}).decide(stream({"service": "web", "port": 22}))
    assert decision.allowed and decision.rule == "service:web"


# --- SOCKS accounts --------------------------------------------------------------------------------------


def test_socks_accounts_need_the_exact_password() -> None:
    policy = Policy("me", socks_accounts={"agent1": "s3cret"})
    assert policy.socks_login_required and not Policy("me").socks_login_required
    ok = policy.decide(SocksAccountRequest("agent1", "s3cret"))
    assert ok.allowed and ok.rule == "socks-account:agent1"
    for username, password in (("agent1", "wrong"), ("agent1", ""), ("agent1", "s3cret "), ("nobody", "s3cret"),
                               ("nobody", "")):
        decision = policy.decide(SocksAccountRequest(username, password))
        assert not decision.allowed and decision.rule == "default-deny"
        assert decision.reason == f"wrong credentials for user {username!r}"


def test_socks_passwords_are_compared_in_constant_time_even_for_unknown_users(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = policy_module.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(policy_module.hmac, "compare_digest", spy)
    policy = Policy("me", socks_accounts={"agent1": "s3cret"})
    for username, password in (("agent1", "s3cret"), ("agent1", "nope"), ("nobody", "nope")):
        policy.decide(SocksAccountRequest(username, password))
    assert [b for _, b in calls] == [b"s3cret", b"nope", b"nope"]  # one compare per login, whoever asks


def test_a_socks_password_is_not_in_the_request_repr() -> None:
    assert "s3cret" not in repr(SocksAccountRequest("agent1", "s3cret"))


# --- mDNS advertisements ---------------------------------------------------------------------------------


def test_an_advertisement_matching_the_pin_is_usable() -> None:
    decision = Policy("me", pins={"bob": BOB}).decide(AdvertisementRequest("bob", BOB))
    assert decision.allowed and decision.trust == "pinned" and decision.rule == "pin:bob"


def test_an_advertisement_contradicting_the_pin_is_untrusted_even_with_a_ca() -> None:
    decision = Policy("me", pins={"bob": BOB}, verify_certificate=fake_verify).decide(AdvertisementRequest("bob", CAROL))
    assert not decision.allowed and decision.trust == "untrusted"
    assert decision.reason == f"does not match the pinned {BOB} (possible spoofing)"


def test_an_unpinned_advertisement_is_usable_only_under_a_ca() -> None:
    assert Policy("me", verify_certificate=fake_verify).decide(AdvertisementRequest("carol", CAROL)).trust == "ca"
    decision = Policy("me").decide(AdvertisementRequest("carol", CAROL))
    assert not decision.allowed and decision.trust == "untrusted" and decision.rule == "default-deny"


def test_an_advertisement_of_our_own_name_is_untrusted() -> None:
    decision = Policy("me", verify_certificate=fake_verify).decide(AdvertisementRequest("me", CAROL))
    assert not decision.allowed and decision.rule == "own-name" and decision.trust == "untrusted"


# --- the shape: one entry point, rules that can be added -------------------------------------------------------


def test_decide_refuses_what_is_not_a_request() -> None:
    with pytest.raises(TypeError, match="not a policy request"):
        Policy("me").decide("bob")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unknown request types"):
        Policy("me", extra_rules={str: []})


def test_extra_rules_are_consulted_before_the_defaults() -> None:
    def no_ssh(request: StreamRequest) -> Decision | None:
        if request.target.get("port") == 22 and request.address and not request.address.startswith("10."):
            return Decision(False, "grant:ssh-from-lan", "port 22 only from 10.0.0.0/8", code=ErrorCode.NOT_ALLOWED)
        return None

    policy = Policy("bob", allowed_ports=[22], extra_rules={StreamRequest: [no_ssh]})
    assert policy.decide(stream({"port": 22})).allowed  # from 10.0.0.1: the default rule decides
    outside = policy.decide(StreamRequest(peer="alice", target={"port": 22}, address="192.0.2.1:5"))
    assert not outside.allowed and outside.rule == "grant:ssh-from-lan"


# --- adding a pin or a service for one name never allows anything else ----------------------------------------

NAMES = ["alice", "bob", "carol", "dave", "me"]
FINGERPRINTS = [ALICE, BOB, CAROL, "pq1:dave", "pq1:mallory"]
SERVICES = ["web", "ssh", "tools", "db"]

names = st.sampled_from(NAMES)
fingerprints = st.sampled_from(FINGERPRINTS)
pin_tables = st.dictionaries(names, fingerprints, max_size=4)
certificates = st.one_of(st.none(), st.builds(lambda n, f, e: fake_cert(n, f, expires=e), names, fingerprints,
                                               st.sampled_from([NOW - 1, NOW + 60])))
peer_requests = st.builds(lambda f, d, c: PeerRequest(fingerprint=f, dialled=d, certificate=c, now=NOW),
                          fingerprints, st.one_of(st.none(), names), certificates)
stream_requests = st.builds(stream, st.one_of(st.builds(lambda s: {"service": s}, st.sampled_from(SERVICES)),
                                              st.builds(lambda p: {"port": p}, st.sampled_from([22, 80, 8080]))))
advert_requests = st.builds(AdvertisementRequest, names, fingerprints)
requests = st.one_of(peer_requests, stream_requests, advert_requests)


def mentions(request: object, name: str | None = None, fingerprint: str | None = None, service: str | None = None) -> bool:
    """Whether ``request`` is about the name, fingerprint or service that was added."""
    if isinstance(request, PeerRequest):
        return request.fingerprint == fingerprint or request.dialled == name
    if isinstance(request, AdvertisementRequest):
        return request.name == name or request.fingerprint == fingerprint
    assert isinstance(request, StreamRequest)
    return request.target.get("service") == service


@settings(max_examples=400, deadline=None)
@given(pins=pin_tables, ca=st.booleans(), ports=st.sets(st.sampled_from([22, 80, 8080])),
       services=st.sets(st.sampled_from(SERVICES)), name=names, fingerprint=fingerprints, request=requests)
def test_adding_a_pin_never_allows_another_request(pins: dict, ca: bool, ports: set, services: set, name: str,
                                                   fingerprint: str, request: object) -> None:
    if name in pins:  # a pinned name is never re-pinned (TrustStore refuses); pinning a new one is the change
        return
    def build(table: dict) -> Policy:
        return Policy("me", pins=table, verify_certificate=fake_verify if ca else None,
                      services={s: s for s in services}, allowed_ports=ports)
    before, after = build(pins).decide(request), build({**pins, name: fingerprint}).decide(request)
    if not mentions(request, name=name, fingerprint=fingerprint):
        assert not (after.allowed and not before.allowed), (before, after)


@settings(max_examples=400, deadline=None)
@given(pins=pin_tables, ca=st.booleans(), ports=st.sets(st.sampled_from([22, 80, 8080])),
       services=st.sets(st.sampled_from(SERVICES)), added=st.sampled_from(SERVICES), request=requests)
def test_adding_a_service_never_allows_another_request(pins: dict, ca: bool, ports: set, services: set, added: str,
                                                       request: object) -> None:
    def build(table: set) -> Policy:
        return Policy("me", pins=pins, verify_certificate=fake_verify if ca else None,
                      services={s: s for s in table}, allowed_ports=ports)
    before, after = build(services).decide(request), build(services | {added}).decide(request)
    if not mentions(request, service=added):
        assert not (after.allowed and not before.allowed), (before, after)
        assert after == before


# --- the daemon's adapters ---------------------------------------------------------------------------------------


def _wire(identity: Identity, certificate: bytes | None = None) -> WireIdentity:
    w = WireIdentity.from_wire(identity.public.to_wire(HYBRID), HYBRID)
    return WireIdentity(w.claimed_name, w.ed25519, w.pq_key_hashes, w.pq_key, certificate)


def test_the_handshake_adapter_raises_the_deciding_rules_error() -> None:
    from pqtunneld.trustpolicy import admit_peer

    bob, carol = Identity.generate("bob"), Identity.generate("carol")
    policy = Policy("me", pins={"bob": bob.fingerprint}, verify_certificate=fake_verify)
    assert admit_peer(policy, _wire(bob), None, NOW) == "bob"
    with pytest.raises(UntrustedPeerError, match="but .* is pinned") as pinned:
        admit_peer(policy, _wire(carol), "bob", NOW)
    assert not isinstance(pinned.value, CertificateError)
    with pytest.raises(CertificateError, match="presented no certificate"):
        admit_peer(policy, _wire(carol), None, NOW)
    assert admit_peer(policy, _wire(carol, fake_cert("carol", carol.fingerprint)), "carol", NOW) == "carol"


def test_the_service_adapter_maps_a_port_to_localhost_and_refuses_with_the_code() -> None:
    from pqtunneld.config import Address
    from pqtunneld.services import Refusal, resolve

    policy = Policy("bob", services={"web": Address("127.0.0.1", 80)}, allowed_ports=[8080])
    assert resolve(policy, stream({"port": 8080}))[1] == Address("127.0.0.1", 8080)
    decision, backend = resolve(policy, stream({"service": "web"}))
    assert decision.rule == "service:web" and backend == Address("127.0.0.1", 80)
    with pytest.raises(Refusal, match="port 22 on bob is not allowed") as refused:
        resolve(policy, stream({"port": 22}))
    assert refused.value.code is ErrorCode.NOT_ALLOWED and refused.value.rule == "default-deny"


# --- [policy]: deny by default, grants are a union of allows ---------------------------------------------------

import ipaddress  # noqa: E402

from pqtunnel.policy import (  # noqa: E402
    AccessRules,
    Grant,
    LegacyRules,
    PolicyTest,
    RateLimit,
    SuiteRequest,
    Trigger,
    host_of,
    parse_subject,
    suite_rank,
)

OPS_CERT_HOLDER = "pq1:" + "c" * 32
SERVICE_TABLE = {"web": "web-spec", "db": "db-spec", "status": "status-spec", "tools": "tools-spec"}


def nets(*cidrs: str) -> tuple:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


def grant(src: list[str], dst: list[str], index: int = 1, min_suite: str | None = None,
          networks: tuple | None = None) -> Grant:
    return Grant(tuple(src), tuple(dst), min_suite=min_suite, networks=networks, index=index)


def governed(*grants: Grant, triggers: tuple = (), legacy: LegacyRules | None = None, ports=(8080,),
             pins: dict | None = None, **kwargs) -> Policy:
    access = AccessRules(grants=grants, triggers=triggers, legacy=legacy or LegacyRules())
    return Policy("bob", pins=pins or {}, services=SERVICE_TABLE, allowed_ports=ports, access=access, **kwargs)


def ask(policy: Policy, peer_name: str, dst: dict, *, fingerprint: str | None = None, groups: tuple = (),
        address: str | None = "10.0.0.1:40000", suite: str | None = "hybrid") -> Decision:
    return policy.decide(StreamRequest(peer=peer_name, target=dst, fingerprint=fingerprint, groups=groups,
                                       address=address, suite=suite))


def test_with_a_policy_section_nothing_is_reachable_without_a_grant() -> None:
    decision = ask(governed(), "alice", {"service": "web"})
    assert not decision.allowed and decision.rule == "default-deny" and decision.code is ErrorCode.NOT_ALLOWED
    assert decision.reason == "no grant lets alice reach service web"
    assert not ask(governed(), "alice", {"port": 8080}).allowed


def test_a_grant_by_name_allows_its_services_only() -> None:
    policy = governed(grant(["alice"], ["web"]))
    allowed = ask(policy, "alice", {"service": "web"})
    assert allowed.allowed and allowed.rule == "grant:1" and allowed.backend == "web-spec"
    assert allowed.reason == "grant:1 allows service web"
    assert not ask(policy, "alice", {"service": "db"}).allowed
    assert not ask(policy, "carol", {"service": "web"}).allowed


def test_a_grant_by_group_needs_that_group_from_the_peers_certificate() -> None:
    policy = governed(grant(["group:ops"], ["db"]))
    assert ask(policy, "carol", {"service": "db"}, groups=("web", "ops")).allowed
    denied = ask(policy, "carol", {"service": "db"}, groups=("web",))
    assert not denied.allowed and denied.reason == "no grant lets carol (groups web) reach service db"


def test_a_grant_by_fingerprint_matches_that_key_whatever_its_name() -> None:
    policy = governed(grant([OPS_CERT_HOLDER], ["tools"]))
    assert ask(policy, "carol", {"service": "tools"}, fingerprint=OPS_CERT_HOLDER).allowed
    assert not ask(policy, "carol", {"service": "tools"}, fingerprint=ALICE).allowed


def test_star_means_anyone_admitted_and_every_service_and_allowed_port() -> None:
    policy = governed(grant(["*"], ["*"]))
    assert ask(policy, "anyone", {"service": "db"}).allowed
    assert ask(policy, "anyone", {"port": 8080}).backend == LocalPort(8080)
    not_exported = ask(policy, "anyone", {"port": 22})
    assert not not_exported.allowed and not_exported.code is ErrorCode.NOT_ALLOWED


def test_a_port_grant_opens_that_port_even_if_it_is_not_in_allowed_ports() -> None:
    policy = governed(grant(["alice"], ["port:5432"]), ports=())
    decision = ask(policy, "alice", {"port": 5432})
    assert decision.allowed and decision.backend == LocalPort(5432) and decision.rule == "grant:1"
    assert not ask(policy, "alice", {"port": 5433}).allowed


def test_a_granted_service_must_still_exist() -> None:
    decision = ask(governed(grant(["*"], ["nosuch"])), "alice", {"service": "nosuch"})
    assert not decision.allowed and decision.code is ErrorCode.UNKNOWN_SERVICE


def test_an_ungranted_peer_learns_nothing_about_which_services_exist() -> None:
    policy = governed(grant(["alice"], ["web"]))
    assert ask(policy, "carol", {"service": "nosuch"}).code is ErrorCode.NOT_ALLOWED
    assert ask(policy, "carol", {"service": "web"}).code is ErrorCode.NOT_ALLOWED


def test_a_grant_with_min_suite_needs_that_suite_and_says_so() -> None:
    policy = governed(grant(["alice"], ["db"], min_suite="pq-strong"))
    assert ask(policy, "alice", {"service": "db"}, suite="pq-strong").allowed
    denied = ask(policy, "alice", {"service": "db"}, suite="hybrid")
    assert not denied.allowed
    assert denied.reason == "no grant lets alice reach service db (grant:1 would, but needs at least pq-strong, not hybrid)"


def test_a_grant_with_from_needs_a_source_address_in_its_networks() -> None:
    policy = governed(grant(["alice"], ["web"], networks=nets("10.0.0.0/8", "fd00::/8")))
    assert ask(policy, "alice", {"service": "web"}, address="10.1.2.3:5000").allowed
    assert ask(policy, "alice", {"service": "web"}, address="[fd00::7]:5000").allowed
    outside = ask(policy, "alice", {"service": "web"}, address="192.0.2.1:5000")
    assert not outside.allowed and "only from 10.0.0.0/8, fd00::/8, not 192.0.2.1" in outside.reason
    assert not ask(policy, "alice", {"service": "web"}, address=None).allowed  # unknown: fail closed


def test_the_first_grant_that_fully_matches_is_named() -> None:
    policy = governed(grant(["alice"], ["web"], 1, min_suite="pq-strong"), grant(["*"], ["web"], 2))
    assert ask(policy, "alice", {"service": "web"}, suite="hybrid").rule == "grant:2"
    assert ask(policy, "alice", {"service": "web"}, suite="pq-strong").rule == "grant:1"


def test_a_malformed_target_is_still_a_protocol_error() -> None:
    assert ask(governed(grant(["*"], ["*"])), "alice", {"host": "x"}).code is ErrorCode.PROTOCOL_ERROR


def test_without_a_policy_section_todays_rules_stand() -> None:
    policy = Policy("bob", services=SERVICE_TABLE, allowed_ports=[8080])
    assert ask(policy, "anyone", {"service": "db"}, suite="classical").allowed


# --- legacy sessions (below hybrid) -------------------------------------------------------------------------------


def test_a_legacy_session_reaches_only_the_legacy_services_that_a_grant_allows() -> None:
    policy = governed(grant(["*"], ["*"]), legacy=LegacyRules(services=("status",)))
    assert ask(policy, "old", {"service": "status"}, suite="classical").allowed
    denied = ask(policy, "old", {"service": "web"}, suite="classical")
    assert not denied.allowed and denied.rule == "legacy" and denied.code is ErrorCode.NOT_ALLOWED
    assert denied.reason == "old uses the classical suite (below hybrid): legacy sessions may reach only status"
    assert not ask(policy, "old", {"port": 8080}, suite="classical").allowed
    assert ask(policy, "new", {"service": "web"}, suite="hybrid").allowed
    ungranted = governed(grant(["alice"], ["web"]), legacy=LegacyRules(services=("status",)))
    assert not ask(ungranted, "old", {"service": "status"}, suite="classical").allowed


def test_a_legacy_session_is_admitted_with_the_legacy_rate_limit() -> None:
    limit = RateLimit(rate=262144, burst=131072)
    policy = governed(legacy=LegacyRules(services=("status",), limit=limit), pins={"old": BOB, "new": CAROL})
    old = policy.decide(PeerRequest(fingerprint=BOB, now=NOW, address="127.0.0.1", suite="classical"))
    assert old.allowed and old.rate_limit == limit and "legacy session limited to 262144 B/s" in old.reason
    new = policy.decide(PeerRequest(fingerprint=CAROL, now=NOW, address="127.0.0.1", suite="hybrid"))
    assert new.allowed and new.rate_limit is None


# --- triggers: a session from outside the listed networks must use at least a suite -------------------------------


def test_a_trigger_sets_the_minimum_suite_for_addresses_outside_its_networks() -> None:
    policy = governed(triggers=(Trigger(nets("10.0.0.0/8"), "pq-strong", 1),))
    outside = policy.decide(SuiteRequest("127.0.0.1"))
    assert outside.min_suite == "pq-strong" and outside.rule == "trigger:1"
    assert outside.reason == "sessions from 127.0.0.1 (outside 10.0.0.0/8) must use at least pq-strong"
    inside = policy.decide(SuiteRequest("10.9.8.7"))
    assert inside.min_suite is None and inside.rule == "no-trigger"
    assert policy.decide(SuiteRequest(None)).min_suite == "pq-strong"  # unknown: fail closed


def test_the_strongest_applicable_trigger_wins() -> None:
    policy = governed(triggers=(Trigger(nets("10.0.0.0/8"), "hybrid", 1), Trigger(nets("0.0.0.0/0"), "pq-strong", 2),
                                Trigger(nets("127.0.0.0/8"), "pq-strong", 3)))
    assert policy.decide(SuiteRequest("192.0.2.1")).rule == "trigger:3"
    assert policy.decide(SuiteRequest("127.0.0.1")).rule == "trigger:1"


def test_a_peer_below_the_triggered_suite_is_refused_naming_the_trigger() -> None:
    policy = governed(triggers=(Trigger(nets("10.0.0.0/8"), "pq-strong", 1),), pins={"alice": ALICE})
    refused = policy.decide(PeerRequest(fingerprint=ALICE, now=NOW, address="192.0.2.9", suite="hybrid"))
    assert not refused.allowed and refused.rule == "trigger:1" and refused.name == "alice"
    assert refused.reason == ("sessions from 192.0.2.9 must use at least pq-strong (trigger:1: outside 10.0.0.0/8), "
                              "not hybrid")
    assert policy.decide(PeerRequest(fingerprint=ALICE, now=NOW, address="192.0.2.9", suite="pq-strong")).allowed
    assert policy.decide(PeerRequest(fingerprint=ALICE, now=NOW, address="10.0.0.9", suite="hybrid")).allowed


def test_a_pinned_peer_keeps_the_groups_of_a_valid_certificate_for_the_same_name() -> None:
    policy = governed(grant(["group:ops"], ["db"]), pins={"carol": CAROL}, verify_certificate=fake_verify)
    own = policy.decide(PeerRequest(fingerprint=CAROL, now=NOW, certificate=fake_cert("carol", CAROL, "ops")))
    assert own.allowed and own.rule == "pin:carol" and own.groups == ("ops",)
    other = policy.decide(PeerRequest(fingerprint=CAROL, now=NOW, certificate=fake_cert("dave", CAROL, "ops")))
    assert other.allowed and other.groups == ()


# --- questions without a session: policy check and [[policy.test]] ---------------------------------------------------


def test_check_resolves_names_and_fingerprints_through_the_pins() -> None:
    policy = governed(grant([ALICE_FP], ["web"]), pins={"alice": ALICE_FP})
    result = policy.check("alice", "web", address="10.0.0.1")
    assert result.allowed and result.decision.rule == "grant:1" and result.subject.fingerprint == ALICE_FP
    assert policy.check(ALICE_FP, "web").subject.name == "alice"
    assert not policy.check("carol,group:ops", "web").allowed
    assert policy.check("alice", "port:8080").fields()["dst"] == {"port": 8080}


def test_check_imagines_the_suite_the_handshake_would_reach() -> None:
    policy = governed(grant(["*"], ["*"]), triggers=(Trigger(nets("10.0.0.0/8"), "pq-strong", 1),))
    assert policy.check("alice", "web", address="192.0.2.1").suite == "pq-strong"
    assert policy.check("alice", "web", address="10.0.0.1").suite == "hybrid"
    refused = policy.check("alice", "web", address="192.0.2.1", suite="hybrid")
    assert not refused.allowed and refused.decision.rule == "trigger:1"
    assert refused.decision.reason.endswith("not hybrid: the session is refused")


@pytest.mark.parametrize("src, dst", [("alice", "web:80"), ("alice", "port:0"), ("pq1:nope", "web"), ("-x", "web")])
def test_check_refuses_what_cannot_name_a_peer_or_a_target(src: str, dst: str) -> None:
    from pqtunnel.errors import ConfigError

    with pytest.raises(ConfigError):
        governed().check(src, dst)


def test_policy_tests_report_every_expectation_the_policy_misses() -> None:
    tests = (PolicyTest("alice", accept=("web",), deny=("db",), index=1),
             PolicyTest("carol", accept=("db",), index=2))
    policy = Policy("bob", services=SERVICE_TABLE, access=AccessRules(grants=(grant(["alice"], ["web"]),), tests=tests))
    (failure,) = policy.failed_tests()
    assert failure.test is tests[1]
    assert str(failure).startswith("policy test #2 (src 'carol'): carol -> db should be accepted, but is denied by default-deny")
    wrong = Policy("bob", services=SERVICE_TABLE, access=AccessRules(grants=(grant(["*"], ["*"]),), tests=tests[:1]))
    (failure,) = wrong.failed_tests()
    assert str(failure) == ("policy test #1 (src 'alice'): alice -> db should be denied, but is allowed by grant:1: "
                       "grant:1 allows service db")


def test_addresses_are_read_with_or_without_port_and_brackets() -> None:
    assert str(host_of("10.0.0.1:4000")) == "10.0.0.1" and str(host_of("[::1]:4000")) == "::1"
    assert str(host_of("::1")) == "::1" and str(host_of("10.0.0.1")) == "10.0.0.1"
    assert host_of("bob.example:7330") is None and host_of(None) is None
    assert suite_rank("classical") < suite_rank("hybrid") < suite_rank("pq-strong") and suite_rank(None) < 0
    assert parse_subject("carol,group:ops,group:web").groups == ("ops", "web")


# --- properties ------------------------------------------------------------------------------------------------------

ALICE_FP = "pq1:" + "a" * 32
PEERS = [("alice", ALICE_FP, ()), ("carol", "pq1:" + "b" * 32, ("ops",)), ("dave", "pq1:" + "d" * 32, ("web", "ops")),
         ("erin", "pq1:" + "e" * 32, ())]
SUITE_NAMES = ["classical", "hybrid", "pq-strong"]
NETWORKS = ["10.0.0.0/8", "127.0.0.0/8", "192.0.2.0/24", "::1/128"]
ADDRESSES = ["10.1.1.1:5", "127.0.0.1:5", "192.0.2.9:5", "[::1]:5", "198.51.100.1:5", None]

src_items = st.sampled_from(["*", "alice", "carol", "dave", "erin", "group:ops", "group:web", *(p[1] for p in PEERS)])
dst_items = st.sampled_from(["*", "web", "db", "status", "nosuch", "port:8080", "port:22"])
network_sets = st.one_of(st.none(), st.lists(st.sampled_from(NETWORKS), min_size=1, max_size=2).map(lambda c: nets(*c)))
grants_st = st.builds(lambda s, d, m, n: Grant(tuple(s), tuple(d), min_suite=m, networks=n),
                      st.lists(src_items, min_size=1, max_size=3), st.lists(dst_items, min_size=1, max_size=3),
                      st.one_of(st.none(), st.sampled_from(SUITE_NAMES)), network_sets)
triggers_st = st.builds(lambda n, m: Trigger(nets(*n), m), st.lists(st.sampled_from(NETWORKS), min_size=1, max_size=2),
                        st.sampled_from(SUITE_NAMES))
legacy_st = st.builds(lambda s: LegacyRules(services=tuple(s)), st.lists(st.sampled_from(["status", "web"]), max_size=2))
asks = st.builds(lambda p, d, a, s: (p, d, a, s), st.sampled_from(PEERS),
                 st.sampled_from([{"service": "web"}, {"service": "db"}, {"service": "status"}, {"service": "nosuch"},
                                  {"port": 8080}, {"port": 22}]),
                 st.sampled_from(ADDRESSES), st.sampled_from(SUITE_NAMES))


def _numbered(grants: list[Grant]) -> tuple[Grant, ...]:
    return tuple(Grant(g.src, g.dst, g.min_suite, g.networks, i) for i, g in enumerate(grants, 1))


def _decide(grants: list[Grant], legacy: LegacyRules, question: tuple, triggers: tuple = ()) -> Decision:
    (name, fingerprint, groups), target, address, suite = question
    policy = governed(*_numbered(grants), legacy=legacy, triggers=triggers)
    return ask(policy, name, target, fingerprint=fingerprint, groups=groups, address=address, suite=suite)


def _about_someone_else(g: Grant, peer: tuple) -> bool:
    """A grant whose every source names a peer other than ``peer`` (never ``*`` or a shared group)."""
    name, fingerprint, groups = peer
    return all(item not in ("*", name, fingerprint) and not (item.startswith("group:") and item[6:] in groups)
               for item in g.src)


@settings(max_examples=400, deadline=None)
@given(grants=st.lists(grants_st, max_size=4), extra=grants_st, legacy=legacy_st, question=asks)
def test_a_grant_for_another_peer_never_turns_a_deny_into_an_allow(grants: list, extra: Grant, legacy: LegacyRules,
                                                                   question: tuple) -> None:
    if not _about_someone_else(extra, question[0]):
        return
    before, after = _decide(grants, legacy, question), _decide([*grants, extra], legacy, question)
    assert after.allowed == before.allowed, (before, after)


@settings(max_examples=400, deadline=None)
@given(first=st.lists(grants_st, max_size=3), second=st.lists(grants_st, max_size=3), legacy=legacy_st, question=asks)
def test_grants_are_a_union_of_allows(first: list, second: list, legacy: LegacyRules, question: tuple) -> None:
    union = _decide([*first, *second], legacy, question).allowed
    assert union == (_decide(first, legacy, question).allowed or _decide(second, legacy, question).allowed)


@settings(max_examples=400, deadline=None)
@given(triggers=st.lists(triggers_st, max_size=3), extra=triggers_st, address=st.sampled_from(ADDRESSES),
       suite=st.sampled_from(SUITE_NAMES))
def test_triggers_only_raise_the_suite(triggers: list, extra: Trigger, address: str | None, suite: str) -> None:
    def floor_and_admission(chain: list) -> tuple[int, bool]:
        policy = governed(triggers=tuple(Trigger(t.outside, t.min_suite, i) for i, t in enumerate(chain, 1)),
                          pins={"alice": ALICE_FP})
        floor = policy.decide(SuiteRequest(address)).min_suite
        admitted = policy.decide(PeerRequest(fingerprint=ALICE_FP, now=NOW, address=address, suite=suite)).allowed
        return suite_rank(floor) if floor else -1, admitted

    floor_before, admitted_before = floor_and_admission(triggers)
    floor_after, admitted_after = floor_and_admission([*triggers, extra])
    assert floor_after >= floor_before
    assert not (admitted_after and not admitted_before)


@settings(max_examples=200, deadline=None)
@given(grants=st.lists(grants_st, max_size=4), legacy=legacy_st, question=asks, triggers=st.lists(triggers_st, max_size=2))
def test_triggers_never_change_what_a_session_may_reach(grants: list, legacy: LegacyRules, question: tuple,
                                                        triggers: list) -> None:
    """Triggers decide whether the session exists, not which streams it may open."""
    assert _decide(grants, legacy, question).allowed == _decide(grants, legacy, question, tuple(triggers)).allowed


# --- who may use the SOCKS endpoint (hardening: local users) ------------------------------------

def test_only_the_allowed_local_users_may_use_socks() -> None:
    policy = Policy("alice", socks_allowed_uids={1000, 0})
    assert policy.decide(SocksClientRequest(1000)).allowed
    assert policy.decide(SocksClientRequest(0)).allowed
    denied = policy.decide(SocksClientRequest(65534))
    assert not denied.allowed and "uid 65534" in denied.reason


def test_a_client_not_on_this_host_must_log_in() -> None:
    assert not Policy(socks_allowed_uids={0}).decide(SocksClientRequest(None)).allowed
    with_accounts = Policy(socks_allowed_uids={0}, socks_accounts={"agent": "pw"})
    assert with_accounts.decide(SocksClientRequest(None)).allowed  # then RFC 1929 decides


def test_socks_open_to_anyone_only_when_asked() -> None:
    assert Policy(socks_allowed_uids=None).decide(SocksClientRequest(65534)).allowed
