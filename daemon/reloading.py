"""``pqtunnel reload`` and SIGHUP: a new configuration, policy, pins and CA material, at once.

Everything is read and checked first (the config file, ``[policy]`` and its tests, the pin
file, the CA key, the revocation list, this node's certificate); a mistake anywhere refuses
the whole reload with the one-line error naming the file, line or policy test, and the
previous state stays in force. Only then is the new state swapped in, in one step with no
``await`` in between, so no handshake or stream ever sees half of it. Afterwards every live
session is judged again by the new policy (``readmit``: its peer must still be admitted, its
suite must still satisfy the triggers) and every stream a peer opened to us is judged again;
what the new policy denies is closed with the policy's reason, everything else runs on.

Settings that belong to sockets already open (``listen``, ``socks``, mDNS, the crypto
backend, ``[limits]``, ``[audit]``) take effect at the next start; the reload reports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from pqtunnel import events, mux
from pqtunnel.ca import CaVerifier
from pqtunnel.errors import UserError
from pqtunnel.handshake import HandshakeConfig
from pqtunnel.identity import Identity
from pqtunnel.crypto import CryptographyBackend
from pqtunnel.policy import AccessRules, Policy, Rule
from pqtunnel.trust import TrustStore

from .config import NodeConfig
from .connection import Connection
from .decisions import build_policy
from .migration import own_transition
from .links import PeerLink
from .services import stream_request
from .stores import load_trust
from .streams import StreamError
from .trustpolicy import load_ca_setup

RESTART_SETTINGS = ("listen", "socks", "mdns", "mdns_interfaces", "crypto_backend", "limits", "audit")
"""Settings a reload reads but cannot apply to what is already running."""


class ReloadRefusedError(UserError):
    """The new configuration cannot be used; the previous one stays in force."""


@dataclass(frozen=True)
class NodeState:
    """Everything a reload replaces, read and checked before any of it is used."""

    config: NodeConfig
    trust: TrustStore
    ca: CaVerifier | None
    certificate: bytes | None
    policy: Policy
    transition: bytes | None = None
    """This node's transition record (HOME/transition.rec, docs/migration.md)."""


class ReloadHost(Protocol):
    """What a reload reads and replaces in the node."""

    config: NodeConfig
    identity: Identity
    backend: CryptographyBackend
    trust: TrustStore
    ca: CaVerifier | None
    certificate: bytes | None
    transition: bytes | None
    policy: Policy
    policy_gate: Rule | None
    handshake_config: HandshakeConfig
    links: dict[str, PeerLink]
    load_config: Callable[[], NodeConfig]
    emit: Callable[[events.Event], None]

    def live_connections(self) -> list[Connection]: ...

    def readmit(self, conn: Connection, why: str = ...) -> bool: ...

    def start_link(self, link: PeerLink) -> None: ...

    def drop_link(self, link: PeerLink) -> None: ...


def read_state(node: ReloadHost) -> NodeState:
    """Read and check everything; raises a UserError (one line) and changes nothing."""
    config = node.load_config()
    trust = load_trust(config.home)
    ca, certificate = load_ca_setup(config, node.identity, node.backend)
    policy = build_policy(config, node.identity.name, trust, ca, gate=node.policy_gate)
    return NodeState(config, trust, ca, certificate, policy, own_transition(config.home, node.identity))


def reload_node(node: ReloadHost) -> dict[str, Any]:
    """Reload ``node``; returns what happened, or raises ReloadRefusedError (after the event)."""
    try:
        state = read_state(node)
    except UserError as exc:
        node.emit(events.ConfigReloaded(False, str(exc), path=_config_path(node.config)))
        raise ReloadRefusedError(f"reload refused, the previous configuration stays in force: {exc}") from None
    previous = node.config
    install(node, state)
    restart = [name for name in RESTART_SETTINGS if getattr(previous, name) != getattr(state.config, name)]
    _update_links(node, previous, state.config)
    closed_sessions, closed_streams = enforce(node)
    summary = describe_policy(state.config.policy)
    node.emit(events.ConfigReloaded(True, "reloaded", path=_config_path(state.config), policy=summary,
                                    closed_sessions=closed_sessions, closed_streams=closed_streams))
    return {"policy": summary, "closed_sessions": closed_sessions, "closed_streams": closed_streams,
            "restart_needed": restart}


def install(node: ReloadHost, state: NodeState) -> None:
    """Swap the new state in: plain assignments, no await, so nothing sees half of it."""
    node.config = state.config
    node.trust = state.trust
    node.ca, node.certificate, node.transition = state.ca, state.certificate, state.transition
    node.handshake_config = HandshakeConfig(allowed_suites=state.config.suites, aeads=state.config.aeads,
                                            replay_window_ms=node.handshake_config.replay_window_ms)
    node.policy = state.policy


def enforce(node: ReloadHost) -> tuple[int, int]:
    """Judge every live session and every stream served to a peer again; close what is denied."""
    closed_sessions = closed_streams = 0
    for conn in node.live_connections():
        if not node.readmit(conn, "denied by the reloaded policy"):
            closed_sessions += 1
            continue
        closed_streams += _enforce_streams(node.policy, conn)
    return closed_sessions, closed_streams


def _enforce_streams(policy: Policy, conn: Connection) -> int:
    """Reset the peer's streams into this node that the policy no longer allows."""
    closed = 0
    for stream in [s for s in conn.streams.values() if s.inbound]:
        decision = policy.decide(stream_request(stream))
        if decision.allowed:
            continue
        reason = f"closed by the reloaded policy: {decision.reason}"
        stream.reset(decision.code if decision.code is not None else mux.ErrorCode.NOT_ALLOWED, reason)
        stream.fail(StreamError(reason))
        closed += 1
    return closed


def _update_links(node: ReloadHost, old: NodeConfig, new: NodeConfig) -> None:
    """Static peers: dial the new ones, stop dialling removed or moved ones (live sessions stay)."""
    for name, addresses in old.peers.items():
        link = node.links.get(name)
        if link is not None and link.source == "static" and new.peers.get(name) != addresses:
            node.drop_link(link)
    for name, addresses in new.peers.items():
        if name not in node.links:
            node.start_link(PeerLink(name, *addresses))


def describe_policy(rules: AccessRules | None) -> str:
    """One phrase for logs and the reload answer: what the ``[policy]`` in force contains."""
    if rules is None:
        return "none (every admitted peer reaches every service and allowed port)"
    parts = [f"{len(rules.grants)} grant(s)", f"{len(rules.triggers)} trigger(s)", f"{len(rules.tests)} test(s)"]
    if rules.legacy.services or rules.legacy.limit:
        parts.append("legacy limits")
    return ", ".join(parts)


def _config_path(config: NodeConfig) -> str:
    return config.policy.source if config.policy is not None and config.policy.source else str(config.home / "config.toml")
