"""Multi-host labs in network namespaces for tests (the implementation is daemon/netlab.py)."""

from pqlab.netlab import (
    LISTEN_PORT,
    SOCKS_ADDRESS,
    Host,
    NamespacedDaemon,
    NetLab,
    NetLabError,
    cleanup_stale_labs,
    lab_namespaces,
    netns_unavailable_reason,
    pin_each_other,
    static_peer_args,
    wait_for,
)

__all__ = [
    "LISTEN_PORT",
    "SOCKS_ADDRESS",
    "Host",
    "NamespacedDaemon",
    "NetLab",
    "NetLabError",
    "cleanup_stale_labs",
    "lab_namespaces",
    "netns_unavailable_reason",
    "pin_each_other",
    "static_peer_args",
    "wait_for",
]
