"""mDNS discovery wired into the node: advertisements become dial candidates, never proof.

A discovered node is dialled only if its advertised fingerprint matches the pin for that
name, or (with a network CA) if it may hold a certificate for the name; the handshake then
proves it. Advertisements that contradict a pin are listed as untrusted and never used.
"""

from __future__ import annotations

import time
from typing import Any, Final, Protocol

import trio

from pqtunnel.discovery import Peer, PeerAppeared, PeerChanged, PeerEvent, PeerLeft

from pqtunnel.identity import Identity
from pqtunnel.policy import AdvertisementRequest, Decision, Policy
from pqtunnel.trust import TrustStore

from .config import Address, NodeConfig
from .links import PeerLink, PeerUnreachableError, UnknownPeerError
from .logs import LOG
from .mdns import DiscoveryError, MdnsDiscovery

LOOKUP_TIMEOUT: Final = 8.0
"""How long a request for an expected name (pinned, or any name with a network CA) that has
no address yet waits for mDNS to find it, querying actively, before "unknown peer". A peer
daemon that is just starting needs 2-3 s before it listens and ~1 s more before it answers
mDNS (probing), so a request made as a fleet boots still finds its peers."""


SESSION_POLL: Final = 0.2


class DiscoveryHost(Protocol):
    """What discovery needs from the node: who we are, its Policy (whom we trust), and its links."""

    config: NodeConfig
    identity: Identity
    policy: Policy
    links: dict[str, PeerLink]
    listen_address: Address | None
    trust: TrustStore
    ca: Any
    """The network CA verifier, or None: with one, any name may be proven by a certificate."""

    @property
    def sessions(self) -> Any: ...

    def start_link(self, link: PeerLink) -> None: ...

    def drop_link(self, link: PeerLink) -> None: ...


class DiscoveryWiring:
    """Consumes PeerEvents and keeps the node's mDNS links in step with them."""

    def __init__(self, node: DiscoveryHost) -> None:
        self.node = node
        self.mdns: MdnsDiscovery | None = None
        self.peers: dict[str, Peer] = {}
        self.last_seen: dict[str, float] = {}
        self.state = "starting"
        """For ``pqtunnel status``: starting, running, or "failed: REASON"."""
        self._links_changed = trio.Event()
        self._created = trio.Event()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        node = self.node
        assert node.listen_address is not None
        send, receive = trio.open_memory_channel[PeerEvent](256)
        listen_host = node.listen_address.host
        specific = listen_host not in ("0.0.0.0", "::", "")
        self.mdns = MdnsDiscovery(node.identity.name, node.identity.fingerprint, node.listen_address.port,
                                  interfaces=node.config.mdns_interfaces, addresses=[listen_host] if specific else None)
        self._created.set()
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(self.mdns.run, send)
            except DiscoveryError as exc:
                LOG.warning("mDNS disabled: %s", exc)  # static peers and inbound sessions still work
                self.state = f"failed: {exc}"
                task_status.started()
                return
            self.state = "running"
            task_status.started()
            async for event in receive:
                self.apply(event)

    # --- events ---------------------------------------------------------------------------------

    def decide(self, peer: Peer) -> Decision:
        """The Policy's answer for one advertisement (an mDNS sighting is a hint, never proof)."""
        return self.node.policy.decide(AdvertisementRequest(peer.name, peer.fingerprint))

    def classify(self, peer: Peer) -> str:
        """pinned (fingerprint matches the pin), ca (a certificate may prove it), or untrusted."""
        decision = self.decide(peer)
        return decision.trust if decision.allowed and decision.trust else "untrusted"

    def apply(self, event: PeerEvent) -> None:
        peer = event.peer
        if isinstance(event, PeerLeft):
            self.peers.pop(peer.instance, None)
            self.last_seen.pop(peer.instance, None)
        else:
            self.peers[peer.instance] = peer
            self.last_seen[peer.instance] = time.time()
            if isinstance(event, PeerAppeared) or (isinstance(event, PeerChanged) and "fingerprint" in event.changes):
                self._warn_if_untrusted(peer)
        self._sync(peer.name)

    def _warn_if_untrusted(self, peer: Peer) -> None:
        decision = self.decide(peer)
        if decision.allowed or peer.fingerprint == self.node.identity.fingerprint:
            return
        LOG.warning("mDNS: %r advertised by %s at %s %s; not used", peer.name, peer.fingerprint,
                    ", ".join(peer.addresses), decision.reason)

    def _sync(self, name: str) -> None:
        """Create, update or drop the mDNS link for ``name`` from its usable advertisements."""
        node = self.node
        if name == node.identity.name:
            return
        link = node.links.get(name)
        if link is not None and link.source == "static":
            return  # configuration wins over discovery
        usable = [p for p in self.peers.values() if p.name == name and p.compatible and self.classify(p) != "untrusted"]
        if not usable:
            if link is not None:
                node.drop_link(link)
            return
        addresses = [Address(address, p.port) for p in usable for address in p.addresses]
        if link is None:

            link = PeerLink(name, addresses[0], source="mdns")
            link.set_candidates(addresses)
            node.start_link(link)
            self._links_changed.set()  # wakes requests waiting in find()
            self._links_changed = trio.Event()
        else:
            link.set_candidates(addresses)
            link.wake.set()  # e.g. it came back at a new address: dial now, not after the backoff

    def resync(self) -> None:
        """Pins or the policy changed: judge every advertisement seen again (a name pinned
        just now is dialled at once, one unpinned is dropped)."""
        for name in {peer.name for peer in self.peers.values()}:
            self._sync(name)

    # --- queries -----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """mDNS for ``pqtunnel status``: state, the name we advertise, the interfaces, what we see."""
        mdns = self.mdns
        return {"state": self.state, "advertised_as": mdns.instance_name if mdns is not None else None,
                "interfaces": self.node.config.mdns_interfaces or "all", "advertisements_seen": len(self.peers)}

    def expects(self, name: str) -> bool:
        """Whether a request for ``name`` may wait for mDNS: the name is pinned, or a network
        CA could prove it. Any other name could never be used, so it is refused at once."""
        if name == self.node.identity.name:
            return False
        return self.node.trust.fingerprint_for(name) is not None or self.node.ca is not None

    async def find(self, name: str, timeout: float = LOOKUP_TIMEOUT) -> PeerLink | None:
        """The link for ``name``, once mDNS finds a usable node for it: queries the link
        actively and waits at most ``timeout`` seconds. None if the peer dialled us meanwhile
        (its session is up). Raises the reason the name cannot be used."""
        if not self.expects(name) or self.state.startswith("failed"):
            raise self.why_unknown(name)
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._query, name, timeout)
                while (link := self.node.links.get(name)) is None and name not in self.node.sessions:
                    with trio.move_on_after(SESSION_POLL):  # an inbound session does not touch links
                        await self._links_changed.wait()
                nursery.cancel_scope.cancel()
                return link
        error = self.why_unknown(name)
        if isinstance(error, UnknownPeerError):
            error = UnknownPeerError(f"unknown peer {name!r}: expected ({self._expected_as(name)}), "
                                     f"but no node answered mDNS for it within {timeout:g} s and it has no static address")
        raise error

    async def _query(self, name: str, timeout: float) -> None:
        await self._created.wait()  # a request in the instant between the control socket and mDNS
        assert self.mdns is not None
        await self.mdns.query(name, timeout)

    def _expected_as(self, name: str) -> str:
        return "pinned" if self.node.trust.fingerprint_for(name) is not None else "a network CA may prove it"

    def why_unknown(self, name: str) -> Exception:

        claims = sorted({p.fingerprint for p in self.peers.values() if p.name == name})
        if claims:
            return PeerUnreachableError(f"{name} is advertised only by untrusted nodes ({', '.join(claims)})")
        return UnknownPeerError(f"unknown peer {name!r}: not discovered by mDNS and no static address")

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for peer in self.peers.values():
            conn = self.node.sessions.get(peer.name)
            same = conn is not None and conn.result is not None and conn.result.peer.fingerprint == peer.fingerprint
            rows.append({
                "name": peer.name,
                "fingerprint": peer.fingerprint,
                "addresses": [str(Address(a, peer.port)) for a in peer.addresses],
                "trust": self.classify(peer),
                "source": "mdns",
                "session": "up" if same else "down",
                "last_seen": self.last_seen.get(peer.instance),
                "conflict": peer.conflict,
                "compatible": peer.compatible,
                "last_error": "",
            })
        return rows
