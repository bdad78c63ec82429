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
