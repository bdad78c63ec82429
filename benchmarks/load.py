"""Load generators: single-stream bulk (curl), new-stream latency, concurrent streams.

Everything here is generic over "a SOCKS5 endpoint at host:port plus a way to
name the target" so pqtunnel and ``ssh -N -D`` are measured by the same code:

* ``socks`` is the TCP port of a SOCKS5 proxy on ``socks_host`` (default
  127.0.0.1), or ``None`` for a direct connection (the "no proxy" context row).
* ``url_for(path)`` maps a resource path on the benchmark HTTP server
  (``"/1"``, ``"/mib"``, ``"/bulk"``, ``"/bytes/N"``) to the URL a client asks
  the proxy for.  For ssh that is ``http://127.0.0.1:HTTPPORT/bulk``; for
  pqtunnel it is e.g. ``http://web.bob.pq/bulk``.  Host names are always sent
  to the proxy unresolved (curl ``--socks5-hostname``, SOCKS5 ATYP 3) and IP
  literals as addresses, so both kinds of tunnel can be driven identically.

Typical use for one tunnel, with the server from ``httpserver.py`` and the
RSS sampler from ``processes.py``::

    with bulk_http_server(1 << 30) as srv, peak_rss_mb([client_pid, server_pid]) as rss:
        url_for = srv.url_for                      # or http_url_for("http://web.bob.pq")
        bulk = bulk_throughput(socks_port, url_for, expected_size=1 << 30)
        lat = new_stream_latency(socks_port, url_for)
        conc = concurrent_streams(socks_port, url_for)
    print(rss.peak_mb_by_root[server_pid])

Standard library only (plus curl for ``bulk_throughput``).
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import resource
import selectors
import socket
import subprocess
import time
from collections.abc import Sequence

from addresses import UrlFor, split_url
from payload import MIB, expected_body
from socksclient import (
    _parse_http_head,
    _socks5_reply_len,
    http_get,
    http_request,
    socks5_connect,
    socks5_request,
)

MB = 1_000_000  # throughput is reported in decimal MB/s, like curl's speed_download


def _env_without_proxies() -> dict[str, str]:
    """Environment for curl with *_proxy removed so only our proxy is used."""
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


@dataclasses.dataclass(frozen=True)
class BulkResult:
    """Best and all curl download rates in MB/s (1 MB = 10^6 bytes)."""

    best_mb_s: float
    runs_mb_s: tuple[float, ...]


def bulk_throughput(
    socks: int | None,
    url_for: UrlFor,
    runs: int = 3,
    expected_size: int | None = None,
    socks_host: str = "127.0.0.1",
    resource: str = "/bulk",
    timeout_s: float = 300.0,
) -> BulkResult:
    """Download ``url_for(resource)`` with real curl to /dev/null; best of ``runs``.

    curl is what people use through a SOCKS proxy and is fast enough in C
    (several GB/s direct) that the tunnel, not the client, is measured.
    Each run checks HTTP 200 and, if given, the downloaded size.
    """
    url = url_for(resource)
    cmd = ["curl", "-s", "-S", "-o", "/dev/null", "--max-time", str(timeout_s),
           "-w", "%{http_code} %{size_download} %{speed_download}"]  # fmt: skip
    if socks is None:
        cmd += ["--noproxy", "*"]
    else:
        cmd += ["--socks5-hostname", f"{socks_host}:{socks}"]
    rates: list[float] = []
    for _ in range(runs):
        out = subprocess.run(
            [*cmd, url], check=False, capture_output=True, text=True, env=_env_without_proxies()
        )
        if out.returncode != 0:
            raise RuntimeError(f"curl {url} failed ({out.returncode}): {out.stderr.strip()}")
        code, size, speed = out.stdout.split()
        if code != "200":
            raise RuntimeError(f"curl {url}: HTTP {code}")
        if expected_size is not None and int(float(size)) != expected_size:
            raise RuntimeError(f"curl {url}: got {size} bytes, expected {expected_size}")
        rates.append(float(speed) / MB)
    return BulkResult(max(rates), tuple(rates))


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values (p in 0..100)."""
    if not sorted_values:
        raise ValueError("no samples")
    k = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[k - 1]


@dataclasses.dataclass(frozen=True)
class LatencyResult:
    """New-stream latency in ms: connect + SOCKS5 handshake + GET /1 to last byte."""

    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    samples: int


def new_stream_latency(
    socks: int | None,
    url_for: UrlFor,
    n: int = 500,
    warmup: int = 20,
    socks_host: str = "127.0.0.1",
    resource: str = "/1",
) -> LatencyResult:
    """Time ``n`` sequential fresh streams, each fetching a 1-byte resource.

    Every sample opens a NEW TCP connection to the proxy and does the full
    SOCKS5 handshake, so this is the cost an agent pays per new connection
    (stream setup inside the tunnel), not raw tunnel RTT.  Timing runs from
    before connect() to the last body byte; close is outside the timing.
    """
    host, port, path = split_url(url_for(resource))
    samples: list[float] = []
    for i in range(warmup + n):
        t0 = time.perf_counter_ns()
        s = socks5_connect(socks, host, port, socks_host=socks_host)
        try:
            body = http_get(s, host, port, path)
            t1 = time.perf_counter_ns()
        finally:
            s.close()
        if body != expected_body(len(body)):
            raise RuntimeError(f"latency probe: wrong body from {url_for(resource)}")
        if i >= warmup:
            samples.append((t1 - t0) / 1e6)
    samples.sort()
    return LatencyResult(
        p50_ms=percentile(samples, 50),
        p99_ms=percentile(samples, 99),
        mean_ms=sum(samples) / len(samples),
        max_ms=samples[-1],
        samples=len(samples),
    )


@dataclasses.dataclass(frozen=True)
class ConcurrentResult:
    """Wall time for ``streams`` parallel downloads of ``size`` bytes each, all verified."""

    seconds: float
    streams: int
    size: int
    # connect + SOCKS5 handshake of the slowest stream; ~1000 ms means a SYN
    # was dropped because the proxy's listen backlog overflowed.
    slowest_connect_ms: float


class _Stream:
    """State of one stream in ``concurrent_streams``' event loop."""

    CONNECTING, GREETING, REPLY, HEAD, BODY = range(5)

    __slots__ = ("body", "got", "hs", "need", "sock", "state", "t_end", "t_ready", "view")

    def __init__(self, sock: socket.socket, size: int) -> None:
        self.sock = sock
        self.state = _Stream.CONNECTING
        self.hs = bytearray()  # handshake / header bytes
        # Filled (not calloc'ed) so its pages are faulted in before the clock starts.
        self.body = bytearray(b"\xff") * size
        self.view = memoryview(self.body)
        self.got = 0
        self.need = -1
        self.t_ready = 0.0
        self.t_end = 0.0


def _raise_nofile(n: int) -> None:
    """Lift the soft fd limit towards the hard one so n streams (2 fds each with a local server) fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n * 3 + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard)
        )


def concurrent_streams(
    socks: int | None,
    url_for: UrlFor,
    n: int = 200,
    size: int = MIB,
    socks_host: str = "127.0.0.1",
    timeout_s: float = 120.0,
) -> ConcurrentResult:
    """Open ``n`` streams at once, each fetching ``/bytes/size``; time until the last byte.

    One thread drives all streams with non-blocking sockets and epoll, so
    the proxy sees a burst of simultaneous stream opens (an agent fanning
    out) and the client costs little CPU: a thread per stream measured ~2x
    slower than ``curl -Z`` (200 x 1 MiB direct), this loop matches it.  Every
    body is compared byte for byte with ``expected_body(size)``, so a tunnel
    that mixes, drops or truncates streams fails instead of looking fast.
    """
    host, port, path = split_url(url_for(f"/bytes/{size}"))
    expected = expected_body(size)
    request = http_request(host, port, path)
    connect_req = socks5_request(host, port)
    target = (socks_host, socks) if socks is not None else (host, port)
    family, _, _, _, addr = socket.getaddrinfo(*target, type=socket.SOCK_STREAM)[0]
    _raise_nofile(n)
    sel = selectors.DefaultSelector()
    streams: list[_Stream] = []
    try:
        for _ in range(n):
            streams.append(_Stream(socket.socket(family, socket.SOCK_STREAM), size))
        start = time.perf_counter()
        for st in streams:
            st.sock.setblocking(False)
            st.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = st.sock.connect_ex(addr)
            if err not in (0, errno.EINPROGRESS):
                raise ConnectionError(f"connect to {target}: {os.strerror(err)}")
            sel.register(st.sock, selectors.EVENT_WRITE, st)
        deadline = start + timeout_s
        done = 0
        while done < n:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError(
                    f"concurrent_streams: {n - done}/{n} streams unfinished after {timeout_s}s"
                )
            for key, _events in sel.select(left):
                st = key.data
                if _advance(st, socks is not None, connect_req, request, sel):
                    st.t_end = time.perf_counter()
                    sel.unregister(st.sock)
                    st.sock.close()
                    # bytearray == bytes is a memcmp; memoryview == bytes is ~50x slower.
                    if st.need != size or st.body != expected:
                        raise ConnectionError(f"stream body corrupted ({st.need} bytes, expected {size})")
                    st.view.release()
                    st.body = bytearray()
                    done += 1
    finally:
        sel.close()
        for st in streams:
            st.sock.close()
    return ConcurrentResult(
        seconds=max(st.t_end for st in streams) - start,
        streams=n,
        size=size,
        slowest_connect_ms=(max(st.t_ready for st in streams) - start) * 1000,
    )


def _advance(
    st: _Stream, via_socks: bool, connect_req: bytes, request: bytes, sel: selectors.BaseSelector
) -> bool:
    """Move one stream forward on a readiness event; True when its body is complete.

    The small writes (greeting, CONNECT, GET) go to fresh sockets with empty
    send buffers, so a single send() always takes them whole.
    """
    s = st.sock
    if st.state == _Stream.CONNECTING:
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise ConnectionError(f"connect failed: {os.strerror(err)}")
        sel.modify(s, selectors.EVENT_READ, st)
        if via_socks:
            s.send(b"\x05\x01\x00")
            st.state = _Stream.GREETING
        else:
            st.t_ready = time.perf_counter()
            s.send(request)
            st.state = _Stream.HEAD
        return False
    if st.state == _Stream.BODY:
        try:
            r = s.recv_into(st.view[st.got : st.need])
        except BlockingIOError:
            return False
        if r == 0:
            raise ConnectionError(f"EOF after {st.got} of {st.need} body bytes")
        st.got += r
        return st.got == st.need
    try:
        data = s.recv(65536)
    except BlockingIOError:
        return False
    if not data:
        raise ConnectionError(f"EOF during {('connect', 'greeting', 'SOCKS reply', 'HTTP head')[st.state]}")
    st.hs += data
    if st.state == _Stream.GREETING and len(st.hs) >= 2:
        if st.hs[:2] != b"\x05\x00":
            raise ConnectionError("SOCKS5 proxy refused the no-auth method")
        del st.hs[:2]
        s.send(connect_req)
        st.state = _Stream.REPLY
    elif st.state == _Stream.REPLY:
        total = _socks5_reply_len(st.hs)
        if total is not None and len(st.hs) >= total:
            if st.hs[0] != 5 or st.hs[1] != 0:
                raise ConnectionError(f"SOCKS5 CONNECT failed: reply code {st.hs[1]}")
            del st.hs[:total]
            st.t_ready = time.perf_counter()
            s.send(request)
            st.state = _Stream.HEAD
    elif st.state == _Stream.HEAD and b"\r\n\r\n" in st.hs:
        head, rest = bytes(st.hs).split(b"\r\n\r\n", 1)
        st.need = _parse_http_head(head)
        if st.need > len(st.body) or len(rest) > st.need:
            raise ConnectionError(f"unexpected Content-Length {st.need}")
        st.body[: len(rest)] = rest
        st.got = len(rest)
        st.hs = bytearray()
        st.state = _Stream.BODY
        return st.got == st.need
    return False
