"""Who is on the other end of a local TCP connection: the owner uid from the kernel's socket table.

Unix sockets have SO_PEERCRED; TCP has no such option, but Linux lists every TCP socket with
its owner in /proc/net/tcp and /proc/net/tcp6 (the identd approach). The client's socket is
the one whose local address is the connection's remote end and whose remote address is
our listening end. Only meaningful for connections from this host (loopback or one of its
own addresses); anything else returns None.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))


def _proc_address(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """Decode /proc/net/tcp's ``HEXADDR:HEXPORT`` (address words in host byte order)."""
    address_hex, port_hex = text.split(":")
    raw = bytes.fromhex(address_hex)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1]), int(port_hex, 16)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    address = ipaddress.IPv6Address(words)
    return (address.ipv4_mapped or address), int(port_hex, 16)


def _normal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def local_peer_uid(sock: socket.socket, tables: tuple[Path, ...] = TABLES) -> int | None:
    """The uid owning the client end of ``sock`` (an accepted TCP socket), or None if unknown."""
    try:
        client_host, client_port = sock.getpeername()[:2]
        server_host, server_port = sock.getsockname()[:2]
        client, server = _normal(client_host), _normal(server_host)
    except (OSError, ValueError):
        return None
    for table in tables:
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 8:
                continue
            try:
                local, remote = _proc_address(fields[1]), _proc_address(fields[2])
            except ValueError:
                continue
            if local == (client, client_port) and remote == (server, server_port):
                return int(fields[7])
    return None
