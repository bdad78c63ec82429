"""Who is this peer? The node's Policy decides (pins first, then the network CA; mDNS never
decides); this module adapts it to the handshake and loads the CA material."""

from __future__ import annotations

import logging
import time

from pqtunnel.ca import CaVerifier
from pqtunnel.crypto import CryptographyBackend
from pqtunnel.errors import CertificateError, ConfigError, UntrustedPeerError
from pqtunnel.identity import Identity, WireIdentity
from pqtunnel.policy import RULE_CA, PeerRequest, Policy
from pqtunnel.stores import CaStore
from pqtunnel.trust import TrustStore

from .config import NodeConfig
from .stores import CaFiles

LOG = logging.getLogger("pqtunneld")
EXPIRY_WARNING_S = 7 * 24 * 3600


def admit_peer(policy: Policy, peer: WireIdentity, dialled: str | None, now: int, *,
               address: str | None = None, suite: str | None = None) -> str:
    """The handshake's authorize callback: the proven name of ``peer``, as ``policy`` decides.

    A refusal raises UntrustedPeerError saying why (CertificateError when the network CA
    decided). The decision itself (pins first, then the CA) is ``pqtunnel.policy``'s.
    """
    decision = policy.decide(PeerRequest(fingerprint=peer.fingerprint, certificate=peer.certificate,
                                         dialled=dialled, now=now, address=address, suite=suite))
    if decision.allowed:
        if decision.name is None:  # fail closed: an admission must say under which name
            raise UntrustedPeerError(f"rule {decision.rule} admitted {peer.fingerprint} without a name")
        return decision.name
    raise (CertificateError if decision.rule == RULE_CA else UntrustedPeerError)(decision.reason)


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
