"""Who is this peer? The node's Policy decides (pins first, then the network CA; mDNS never
decides); this module adapts it to the handshake and loads the CA material."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Protocol

from pqtunnel.ca import CaVerifier
from pqtunnel.crypto import CryptographyBackend
from pqtunnel.crypto.suites import Suite
from pqtunnel.errors import CertificateError, ConfigError, UntrustedPeerError
from pqtunnel.identity import Identity, WireIdentity
from pqtunnel.handshake import HandshakeConfig
from pqtunnel.policy import RULE_CA, Decision, PeerRequest, Policy, RateLimit, SuiteRequest, suite_rank
from pqtunnel.stores import CaStore
from pqtunnel.trust import TrustStore

from .config import NodeConfig
from .stores import CaFiles

LOG = logging.getLogger("pqtunneld")
EXPIRY_WARNING_S = 7 * 24 * 3600


def admit_peer(policy: Policy, peer: WireIdentity, dialled: str | None, now: int, *,
               address: str | None = None, suite: str | None = None,
               record: Callable[[Decision], None] | None = None) -> str:
    """The handshake's authorize callback: the proven name of ``peer``, as ``policy`` decides.

    A refusal raises UntrustedPeerError saying why (CertificateError when the network CA
    decided). The decision itself (pins first, then the CA, then ``[policy]`` triggers) is
    ``pqtunnel.policy``'s; ``record`` is handed the decision either way.
    """
    decision = policy.decide(PeerRequest(fingerprint=peer.fingerprint, certificate=peer.certificate,
                                         dialled=dialled, now=now, address=address, suite=suite,
                                         transition=peer.transition))
    if record is not None:
        record(decision)
    if decision.allowed:
        if decision.name is None:  # fail closed: an admission must say under which name
            raise UntrustedPeerError(f"rule {decision.rule} admitted {peer.fingerprint} without a name")
        return decision.name
    raise (CertificateError if decision.rule == RULE_CA else UntrustedPeerError)(decision.reason)


class NegotiatesSuite(Protocol):
    """What the admission reads from its handshake: the suite being negotiated."""

    @property
    def suite(self) -> Suite | None: ...


class Admission:
    """The authorize callback of one connection's handshake, and what the policy decided.

    The decision stays with the session: its streams are judged with the groups of the
    peer's certificate, a legacy session is throttled by its ``rate_limit``, and a reload
    judges the session again with the same facts (``request``).
    """

    def __init__(self, policy: Callable[[], Policy], *, dialled: str | None, address: str | None,
                 clock: Callable[[], float] = time.time) -> None:
        self._policy = policy
        self._clock = clock
        self.dialled = dialled
        self.address = address
        self.handshake: NegotiatesSuite | None = None
        self.peer: WireIdentity | None = None
        self.decision: Decision | None = None

    def __call__(self, peer: WireIdentity) -> str:
        self.peer = peer
        return admit_peer(self._policy(), peer, self.dialled, int(self._clock()), address=self.address,
                          suite=self.suite, record=self._record)

    def _record(self, decision: Decision) -> None:
        self.decision = decision

    def readmitted(self, decision: Decision) -> None:
        """A later judgement of the same session (a rekey, a reload): its groups and rate limit
        follow the policy now in force; a denial is not recorded (the session is closing)."""
        if decision.allowed:
            self.decision = decision

    @property
    def suite(self) -> str | None:
        suite = self.handshake.suite if self.handshake is not None else None
        return suite.name if suite is not None else None

    @property
    def groups(self) -> tuple[str, ...]:
        return self.decision.groups if self.decision is not None and self.decision.allowed else ()

    @property
    def rate_limit(self) -> RateLimit | None:
        return self.decision.rate_limit if self.decision is not None and self.decision.allowed else None

    def request(self, now: int) -> PeerRequest | None:
        """The same question again (a reload): None before the peer proved who it is."""
        if self.peer is None:
            return None
        return PeerRequest(fingerprint=self.peer.fingerprint, certificate=self.peer.certificate,
                           dialled=self.dialled, now=now, address=self.address, suite=self.suite,
                           transition=self.peer.transition)


def handshake_config_for(policy: Policy, base: HandshakeConfig, host: str | None) -> tuple[HandshakeConfig, str]:
    """The suites a session with ``host`` may use, and a note naming the trigger that narrowed them.

    A ``[[policy.trigger]]`` covering ``host`` removes every suite below its ``min_suite``: a
    responder then answers a weaker proposal with a RETRY naming a stronger suite, an
    initiator proposes the stronger one itself, and a peer that cannot follow is refused
    (no common suite). Should no configured suite be strong enough, the strongest is kept
    and the admission refuses the session (fail closed).
    """
    floor = policy.decide(SuiteRequest(host))
    if floor.min_suite is None:
        return base, ""
    allowed = tuple(s for s in base.allowed_suites if s.rank >= suite_rank(floor.min_suite))
    if not allowed:
        allowed = (max(base.allowed_suites, key=lambda s: s.rank),)
    return dataclasses.replace(base, allowed_suites=allowed), f" ({floor.rule}: {floor.reason})"


def authorize_peer(trust: TrustStore, ca: CaVerifier | None, peer: WireIdentity, dialled: str | None, now: int) -> str:
    """``admit_peer`` with a Policy of just these pins and this CA (for callers without a Policy).

    A pin always wins: a CA certificate can never claim a name pinned to another key.
    """
    policy = Policy(pins=trust, verify_certificate=ca.verify if ca is not None else None)
    return admit_peer(policy, peer, dialled, now)


def load_ca_setup(config: NodeConfig, identity: Identity,
                  backend: CryptographyBackend) -> tuple[CaVerifier | None, bytes | None]:
    """The CA verifier (if configured) and this node's own certificate (if it has one)."""
    store = CaFiles(config.ca_public, config.certificate, config.revocation_list)
    return ca_verifier(store, backend), own_certificate(store, identity, config)


def ca_verifier(store: CaStore, backend: CryptographyBackend) -> CaVerifier | None:
    """Verifies with the node's backend; the store is asked for revocations on every certificate."""
    ca = store.ca_public()
    return CaVerifier(ca, backend, store.revoked) if ca is not None else None


def own_certificate(store: CaStore, identity: Identity, config: NodeConfig) -> bytes | None:
    """This node's certificate, refused if it is for another key; warns when it expires soon."""
    cert = store.own_certificate()
    if cert is None:
        return None
    if cert.fingerprint != identity.fingerprint:
        raise ConfigError(f"certificate {config.certificate} is for {cert.fingerprint}, not this node ({identity.fingerprint})")
    remaining = cert.not_after - time.time()
    if remaining <= 0:
        LOG.warning("this node's certificate %s has expired: CA peers will refuse it", config.certificate)
    elif remaining < EXPIRY_WARNING_S:
        LOG.warning("this node's certificate expires in %.1f days", remaining / 86400)
    return cert.encode()
