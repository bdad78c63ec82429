"""The node's one ``pqtunnel.policy.Policy``, built from its configuration, pins and CA.

Every part of the daemon that must answer "may this happen?" (the handshake, inbound
streams, SOCKS logins, mDNS advertisements) asks this Policy; none decides by itself. The
``[policy]`` section of ``config.toml`` (grants, minimum suites, source networks) will be
turned into extra rules here.
"""

from __future__ import annotations

from pqtunnel.ca import CaVerifier
from pqtunnel.policy import Policy
from pqtunnel.trust import TrustStore

from .config import NodeConfig


def build_policy(config: NodeConfig, node_name: str, trust: TrustStore | None, ca: CaVerifier | None) -> Policy:
    """The pins (kept by reference: pins added while running count), the CA verifier, the
    service table, the allowed ports and the SOCKS accounts, as one Policy."""
    return Policy(
        node_name,
        pins=trust,
        verify_certificate=ca.verify if ca is not None else None,
        services=config.services,
        allowed_ports=config.allowed_ports,
        socks_accounts=config.socks_users,
    )
