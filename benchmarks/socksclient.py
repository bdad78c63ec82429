"""Minimal SOCKS5 + HTTP/1.1 client on raw sockets, so timings are not hidden by a library.

Host names are always sent to the proxy unresolved (SOCKS5 ATYP 3, as curl
``--socks5-hostname`` does) and IP literals as addresses, so pqtunnel's
``*.pq`` names and ``ssh -D`` can be driven identically.  ``socks`` is the TCP
port of a SOCKS5 proxy on ``socks_host`` (default 127.0.0.1), or ``None`` for
a direct connection.  Standard library only.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read exactly n bytes or raise; SOCKS replies may arrive in pieces."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"peer closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def socks5_request(host: str, port: int) -> bytes:
    """SOCKS5 CONNECT request: IP literals as addresses, names as ATYP 3 (remote DNS).

    Names are resolved by the proxy, as with curl --socks5-hostname, which is
    how pqtunnel's ``*.pq`` names reach the daemon.
    """
    try:
        ip = ipaddress.ip_address(host)
        addr = (b"\x01" if ip.version == 4 else b"\x04") + ip.packed
    except ValueError:
        name = host.encode("idna")
        addr = b"\x03" + bytes([len(name)]) + name
    return b"\x05\x01\x00" + addr + struct.pack(">H", port)


def _socks5_reply_len(head: bytes | bytearray) -> int | None:
    """Total length of a SOCKS5 reply given its first bytes, or None if more are needed."""
    if len(head) < 5:
        return None
    atyp = head[3]
    if atyp == 1:
        return 4 + 4 + 2
    if atyp == 4:
        return 4 + 16 + 2
    if atyp == 3:
        return 4 + 1 + head[4] + 2
    raise ConnectionError(f"SOCKS5 reply with unknown ATYP {atyp}")


def http_request(host: str, port: int, path: str) -> bytes:
    """A minimal HTTP/1.1 GET with Connection: close (one request per stream)."""
    h = f"[{host}]" if ":" in host else host
    hostport = h if port == 80 else f"{h}:{port}"
    return f"GET {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n".encode()


def _parse_http_head(head: bytes) -> int:
    """Check for status 200 and return Content-Length."""
    status = head.split(b"\r\n", 1)[0]
    parts = status.split()
    if len(parts) < 2 or parts[1] != b"200":
        raise ConnectionError(f"HTTP status line {status!r}")
    m = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    if not m:
        raise ConnectionError("response without Content-Length")
    return int(m.group(1))


def socks5_connect(
    socks: int | None,
    host: str,
    port: int,
    socks_host: str = "127.0.0.1",
    timeout: float = 30.0,
) -> socket.socket:
    """Open a TCP stream to host:port, through the SOCKS5 proxy if ``socks`` is set.

    Blocking, no-auth method only, one round trip per SOCKS step (what a
    normal client does).  TCP_NODELAY is set so our own Nagle never adds
    latency to the measurement.
    """
    if socks is None:
        s = socket.create_connection((host, port), timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s
    s = socket.create_connection((socks_host, socks), timeout=timeout)
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"\x05\x01\x00")
        if _recv_exact(s, 2) != b"\x05\x00":
            raise ConnectionError("SOCKS5 proxy refused the no-auth method")
        s.sendall(socks5_request(host, port))
        reply = _recv_exact(s, 5)
        if reply[0] != 5 or reply[1] != 0:
            raise ConnectionError(f"SOCKS5 CONNECT to {host}:{port} failed: reply code {reply[1]}")
        total = _socks5_reply_len(reply)
        assert total is not None
        _recv_exact(s, total - 5)
        return s
    except BaseException:
        s.close()
        raise


def http_get(
    sock: socket.socket, host: str, port: int, path: str, into: bytearray | None = None
) -> memoryview:
    """Send one GET on an open stream and read exactly Content-Length body bytes.

    Stops at the last body byte rather than waiting for EOF, so a tunnel's
    close handling is not part of the latency.  The body goes into ``into``
    (reused buffer, must be large enough) when given.  Returns a view of the body.
    """
    sock.sendall(http_request(host, port, path))
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"EOF before HTTP headers ({len(buf)} bytes read)")
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    n = _parse_http_head(head)
    if into is None:
        into = bytearray(n)
    if len(rest) > n:
        raise ConnectionError("more body bytes than Content-Length")
    into[: len(rest)] = rest
    view = memoryview(into)
    got = len(rest)
    while got < n:
        r = sock.recv_into(view[got:n])
        if r == 0:
            raise ConnectionError(f"EOF after {got} of {n} body bytes")
        got += r
    return view[:n]
