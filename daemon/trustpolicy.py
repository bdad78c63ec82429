"""Who is this peer? Pinned fingerprints first, then the network CA; mDNS never decides."""

from __future__ import annotations

import logging
import time

from pqtunnel.ca import CaVerifier
from pqtunnel.crypto import CryptographyBackend
from pqtunnel.errors import CertificateError, ConfigError, UntrustedPeerError
from pqtunnel.identity import Identity, WireIdentity
from pqtunnel.stores import CaStore
from pqtunnel.trust import TrustStore

from .config import NodeConfig
from .stores import CaFiles

LOG = logging.getLogger("pqtunneld")
EXPIRY_WARNING_S = 7 * 24 * 3600


def authorize_peer(trust: TrustStore, ca: CaVerifier | None, peer: WireIdentity, dialled: str | None, now: int) -> str:
    """Return the proven name of ``peer`` or raise UntrustedPeerError saying why.

    A pin always wins: a CA certificate can never claim a name pinned to another key.
    """
    fingerprint = peer.fingerprint
    if dialled is not None and trust.fingerprint_for(dialled) is not None:
        return trust.require(fingerprint, dialled)
    pinned_name = trust.name_for(fingerprint)
    if dialled is None and pinned_name is not None:
        return pinned_name
    if ca is None:
        expected = f"no pinned fingerprint for {dialled}" if dialled else f"peer {fingerprint} is not pinned"
        raise UntrustedPeerError(expected)
    cert = ca.verify(peer.certificate, fingerprint, now)
    if dialled is not None and cert.name != dialled:
        raise CertificateError(f"certificate is for {cert.name}, not {dialled}")
    pinned = trust.fingerprint_for(cert.name)
    if pinned is not None and pinned != fingerprint:
        raise CertificateError(f"certificate claims {cert.name}, which is pinned to another key")
    return cert.name


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
