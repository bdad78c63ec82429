"""Who is this peer? Pinned fingerprints first, then the network CA; mDNS never decides."""

from __future__ import annotations

import logging
import time

from pqtunnel.ca import CaVerifier, load_ca_public, load_revocations, read_certificate_file
from pqtunnel.errors import CertificateError, ConfigError, UntrustedPeerError
from pqtunnel.identity import Identity, WireIdentity
from pqtunnel.trust import TrustStore

from .config import NodeConfig

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


def load_ca_setup(config: NodeConfig, identity: Identity) -> tuple[CaVerifier | None, bytes | None]:
    """The CA verifier (if configured) and this node's own certificate (if it has one)."""
    verifier = None
    if config.ca_public is not None:
        ca = load_ca_public(config.ca_public)
        verifier = CaVerifier(ca, load_revocations(config.revocation_list), config.revocation_list)
    certificate = None
    if config.certificate is not None:
        cert = read_certificate_file(config.certificate)
        if cert.fingerprint != identity.fingerprint:
            raise ConfigError(f"certificate {config.certificate} is for {cert.fingerprint}, not this node ({identity.fingerprint})")
        remaining = cert.not_after - time.time()
        if remaining <= 0:
            LOG.warning("this node's certificate %s has expired: CA peers will refuse it", config.certificate)
        elif remaining < EXPIRY_WARNING_S:
            LOG.warning("this node's certificate expires in %.1f days", remaining / 86400)
        certificate = cert.encode()
    return verifier, certificate
