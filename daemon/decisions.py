"""The node's one ``pqtunnel.policy.Policy``, built from its configuration, pins and CA.

Every part of the daemon that must answer "may this happen?" (the handshake, inbound
streams, SOCKS logins, mDNS advertisements) asks this Policy; none decides by itself. The
``[policy]`` section of ``config.toml`` (grants, triggers, the legacy budget) comes in as
``config.policy``; its ``[[policy.test]]`` entries are run here, every time a Policy is
built, so a policy that fails its own tests is never put in force.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

from pqtunnel.ca import CaVerifier
from pqtunnel.errors import ConfigError
from pqtunnel.policy import PeerRequest, Policy, Rule, StreamRequest
from pqtunnel.trust import TrustStore

from .config import NodeConfig
from .migration import legacy_verifier
from .policyconfig import header_line


def socks_allowed_uids(users: tuple[str, ...] | list[str]) -> frozenset[int] | None:
    """The uids that may use the SOCKS endpoint: the daemon's own user and root, plus
    ``socks_allow_users`` (names or numbers); None when it lists "*" (anyone)."""
    if "*" in users:
        return None
    uids = {os.getuid(), 0}
    for user in users:
        if user.isdigit():
            uids.add(int(user))
            continue
        try:
            uids.add(pwd.getpwnam(user).pw_uid)
        except KeyError:
            raise ConfigError(f"node.socks_allow_users: no local user named {user!r}") from None
    return frozenset(uids)


class PolicyTestFailedError(ConfigError):
    """A ``[[policy.test]]`` expectation does not hold: the policy is not put in force."""


def build_policy(config: NodeConfig, node_name: str, trust: TrustStore | None, ca: CaVerifier | None, *,
                 gate: Rule | None = None) -> Policy:
    """The pins (kept by reference: pins added while running count), the CA verifier, the
    legacy anchors (HOME/legacy_known_hosts, read again on every build, so a reload picks up
    new imports), the service table, the allowed ports and the SOCKS accounts, as one Policy.

    ``gate`` is asked before every other rule about sessions and streams (the node's
    ``audit-required`` rule: nothing new while a required audit cannot be written); a
    rebuilt Policy (reload) must be given the same gate. ``[policy]`` comes from
    ``config.policy``; PolicyTestFailedError names the first failing ``[[policy.test]]``.
    """
    legacy = legacy_verifier(config.home, config.migration_accept_until)

    def build(extra_rules: dict | None = None) -> Policy:
        return Policy(
            node_name,
            pins=trust,
            verify_certificate=ca.verify if ca is not None else None,
            verify_transition=legacy.verify if legacy is not None else None,
            services=config.services,
            allowed_ports=config.allowed_ports,
            socks_accounts=config.socks_users,
            socks_allowed_uids=socks_allowed_uids(config.socks_allow_users),
            access=config.policy,
            extra_rules=extra_rules,
        )

    policy = build({PeerRequest: [gate], StreamRequest: [gate]} if gate is not None else None)
    # The tests judge the policy as written, not the node's passing state (e.g. the audit gate).
    failures = (build() if gate is not None else policy).failed_tests(preferred_suite(config))
    if failures:
        source = config.policy.source if config.policy is not None else "config"
        line = header_line(Path(source), "[[policy.test]]", failures[0].test.index)
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise PolicyTestFailedError(f"{source}{f':{line}' if line else ''}: {failures[0]}{more}")
    return policy


def preferred_suite(config: NodeConfig) -> str:
    """The suite this node proposes first: what a session gets unless a trigger raises it."""
    return config.suites[0].name
