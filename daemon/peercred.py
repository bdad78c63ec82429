"""Who is on the other end of a local TCP connection: the owner uid from the kernel's socket table.

Unix sockets have SO_PEERCRED; TCP has no such option, but the kernel knows every TCP
socket's owner. We ask it for exactly one socket, the client's (its local end is the
connection's remote end and its remote end is ours), with one sock_diag netlink request
(what `ss` uses): constant time however many sockets the host has. If netlink is not
available, /proc/net/tcp and /proc/net/tcp6 are scanned instead (the identd approach;
linear in the number of sockets). Only meaningful for connections from this host
(loopback or one of its own addresses); anything else returns None.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
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


NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
_NLMSG = struct.Struct("=IHHII")
_REQUEST = struct.Struct("=BBBBI")  # family, protocol, extensions, pad, states
_SOCKID = struct.Struct(">HH16s16s")  # ports and addresses in network order
_SOCKID_TAIL = struct.Struct("=III")  # interface, cookie (two words)
NO_COOKIE = 0xFFFFFFFF
UID_OFFSET = _NLMSG.size + 4 + 48 + 12  # inet_diag_msg: 4 bytes, sockid, expires/rqueue/wqueue
INODE_OFFSET = UID_OFFSET + 4


def _diag_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    return address.packed.ljust(16, b"\0")


class DiagSocket:
    """One sock_diag netlink socket, kept open: a SOCKS client then costs one request and
    one answer, not a socket of its own (three system calls fewer on every new stream).

    Answers carry the request's sequence number; a late answer to an earlier request that
    timed out is skipped, never taken for this one's.
    """

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._sequence = 0

    def ask(self, message: bytes, sequence: int) -> bytes:
        sock = self._sock
        if sock is None:
            sock = self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
            sock.settimeout(1.0)
        try:
            sock.sendto(message, (0, 0))
            while True:
                answer = sock.recv(8192)
                if len(answer) < _NLMSG.size or _NLMSG.unpack_from(answer)[3] == sequence:
                    return answer
        except OSError:
            self.close()  # a broken or timed-out socket is replaced at the next request
            raise

    def next_sequence(self) -> int:
        self._sequence = self._sequence % 0xFFFF_FFFF + 1
        return self._sequence

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


DIAG = DiagSocket()


def lookup_message(family: int, client: tuple[str, int], server: tuple[str, int], sequence: int) -> bytes:
    """The sock_diag request for exactly one TCP socket, ``client`` -> ``server``."""
    body = _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)
    body += _SOCKID.pack(client[1], server[1], _diag_address(_normal(client[0])), _diag_address(_normal(server[0])))
    body += _SOCKID_TAIL.pack(0, NO_COOKIE, NO_COOKIE)
    return _NLMSG.pack(_NLMSG.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, sequence, 0) + body


def netlink_uid(family: int, client: tuple[str, int], server: tuple[str, int],
                diag: DiagSocket = DIAG) -> int | None:
    """Ask the kernel (sock_diag) for the owner of the TCP socket ``client`` -> ``server``."""
    sequence = diag.next_sequence()
    answer = diag.ask(lookup_message(family, client, server, sequence), sequence)
    if len(answer) < INODE_OFFSET + 4 or _NLMSG.unpack_from(answer)[1] == NLMSG_ERROR:
        return None
    uid, inode = struct.unpack_from("=II", answer, UID_OFFSET)
    return _owned(uid, inode)


def _owned(uid: int, inode: int) -> int | None:
    """``uid`` if a process still holds the socket (inode not 0), else None.

    A socket its owner closed stays in the table (TIME_WAIT, an orphan) with inode 0, and a
    TIME_WAIT entry reads as uid 0: another user who sends a whole SOCKS request and closes
    before the daemon looks would otherwise pass for root.
    """
    return uid if inode else None


def local_peer_uid(sock: socket.socket, tables: tuple[Path, ...] = TABLES) -> int | None:
    """The uid owning the client end of ``sock`` (an accepted TCP socket), or None if unknown."""
    try:
        client_host, client_port = sock.getpeername()[:2]
        server_host, server_port = sock.getsockname()[:2]
        client, server = _normal(client_host), _normal(server_host)
    except (OSError, ValueError):
        return None
    try:
        return netlink_uid(sock.family, (client_host, client_port), (server_host, server_port))
    except (OSError, ValueError, struct.error):
        return scan_tables(client, client_port, server, server_port, tables)


def scan_tables(client: ipaddress.IPv4Address | ipaddress.IPv6Address, client_port: int,
                server: ipaddress.IPv4Address | ipaddress.IPv6Address, server_port: int,
                tables: tuple[Path, ...] = TABLES) -> int | None:
    """The /proc fallback: find the client's socket line and read its uid column."""
    for table in tables:
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            try:
                local, remote = _proc_address(fields[1]), _proc_address(fields[2])
            except ValueError:
                continue
            if local == (client, client_port) and remote == (server, server_port):
                return _owned(int(fields[7]), int(fields[9]))
    return None
