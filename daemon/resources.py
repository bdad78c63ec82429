"""The node's resource limits: ``[limits]`` from the config, fitted to the process's descriptors.

What a stranger or a peer may make this node hold at once, each counted by a pure rule of
the library before it is spent (docs/security.md, "Resource limits"):

* connections still in the handshake: ``peers.ConnectionGate``, node-wide and per source
  address, and never more than a quarter of the descriptor limit (``RLIMIT_NOFILE``), so
  strangers cannot take the descriptors that sessions, streams and the control socket need;
* streams a peer may open in one session: the tunnel's ``max_streams``;
* exec processes: ``limits.SlotLimit`` per peer and node-wide;
* stream bytes received but not read yet: ``limits.BufferBudget`` per session and node-wide.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass, field

import trio

from pqtunnel.limits import BufferBudget, SlotLimit, Throttle
from pqtunnel.peers import ConnectionGate
from pqtunnel.tunnel import TunnelLimits

from .config import ResourceLimits
from .logs import LOG
from .netio import monotonic_ms

HANDSHAKE_DESCRIPTOR_SHARE = 4
"""Connections in the handshake may hold at most 1/4 of the process's descriptors."""
REPORT_INTERVAL_MS = 5_000


def descriptor_limit() -> int:
    """The soft ``RLIMIT_NOFILE`` of this process (systemd's ``LimitNOFILE``)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def host_of(remote: str) -> str:
    """The address part of ``HOST:PORT`` as ``netio.remote_of`` writes it."""
    return remote.rpartition(":")[0]


@dataclass
class NodeResources:
    """Every counter the node asks before it spends a descriptor, a process or memory."""

    limits: ResourceLimits
    descriptors: int
    connections: ConnectionGate = field(init=False)
    exec_slots: SlotLimit[str] = field(init=False)
    buffers: BufferBudget = field(init=False)
    tunnel_limits: TunnelLimits = field(init=False)
    _refusals: Throttle = field(init=False)

    def __post_init__(self) -> None:
        limits = self.limits
        handshakes = max(1, min(limits.handshakes, self.descriptors // HANDSHAKE_DESCRIPTOR_SHARE))
        self.connections = ConnectionGate(handshakes, min(limits.handshakes_per_address, handshakes))
        self.exec_slots = SlotLimit(limits.exec_processes, limits.exec_processes_per_peer,
                                    what="processes", per="peer")
        self.buffers = BufferBudget(limits.buffered_bytes, limits.buffered_bytes_per_session)
        self.tunnel_limits = TunnelLimits(max_streams=limits.streams_per_session)
        self._refusals = Throttle(REPORT_INTERVAL_MS)

    async def admit_inbound(self, stream: trio.SocketStream, remote: str) -> bool:
        """Admit a new inbound connection to the handshake, or close it at once and say why
        (one log line every few seconds at most, however many are closed)."""
        reason = self.connections.admit(host_of(remote))
        if reason is None:
            return True
        held_back = self._refusals.allow(monotonic_ms())
        if held_back is not None:
            more = f" ({held_back} more closed since the last report)" if held_back else ""
            LOG.warning("closed a connection from %s at once: %s%s", remote, reason, more)
        await trio.aclose_forcefully(stream)
        return False

    def handshake_ended(self, remote: str) -> None:
        """An admitted connection's handshake finished, either way: it leaves the gate."""
        self.connections.release(host_of(remote))
