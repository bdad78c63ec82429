"""Reusable benchmark harness: compare SOCKS5 tunnels in one run on one machine.

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

The HTTP server (its own process), the private sshd and the ssh client are
started as context managers that kill and reap their processes and delete
their temp dirs.  Typical use for one tunnel::

    with bulk_http_server(1 << 30) as srv, peak_rss_mb([client_pid, server_pid]) as rss:
        url_for = srv.url_for                      # or http_url_for("http://web.bob.pq")
        bulk = bulk_throughput(socks_port, url_for, expected_size=1 << 30)
        lat = new_stream_latency(socks_port, url_for)
        conc = concurrent_streams(socks_port, url_for)
    print(rss.peak_mb_by_root[server_pid])

Only the standard library is used, so the harness runs before pqtunnel's own
dependencies are installed.  Linux only (reads /proc); the private sshd needs
root (it drops privileges per connection the way a system sshd does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import ipaddress
import math
import os
import random
import re
import resource
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

MB = 1_000_000  # throughput is reported in decimal MB/s, like curl's speed_download
MIB = 1 << 20

UrlFor = Callable[[str], str]

# --------------------------------------------------------------------------
# Payload: deterministic bytes, so any client can verify a body without
# talking to the server process (the server may sit behind a remote daemon).
# --------------------------------------------------------------------------

_PATTERN_SEED = 0x5051_7475
# Odd length: the repetition never lines up with MiB or page boundaries, so a
# tunnel that drops, duplicates or swaps whole chunks still fails the check.
_BLOCK_LEN = MIB + 4093


@functools.cache
def _pattern_block() -> bytes:
    """Random (incompressible) block the payload repeats; generated once."""
    return random.Random(_PATTERN_SEED).randbytes(_BLOCK_LEN)


def expected_body(n: int) -> bytes:
    """The exact bytes the benchmark server returns for a body of length n.

    Every resource is a prefix of the same pattern, so verifying a body needs
    only its length.  Meant for small-to-medium n (it materialises the body).
    """
    block = _pattern_block()
    if n <= _BLOCK_LEN:
        return block[:n]
    return (block * (n // _BLOCK_LEN + 1))[:n]


def _write_pattern_file(path: Path, size: int) -> None:
    """Write the first ``size`` pattern bytes to ``path`` in block-sized chunks."""
    block = _pattern_block()
    with open(path, "wb") as f:
        left = size
        while left > 0:
            chunk = block[: min(left, _BLOCK_LEN)]
            f.write(chunk)
            left -= len(chunk)


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is currently free on ``host``.

    The port is only reserved until this returns, so callers that hand it to
    another program retry on a bind failure (see private_sshd/ssh_socks_proxy).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def http_url_for(base: str) -> UrlFor:
    """Build a ``url_for`` from a base URL, e.g. ``http_url_for("http://web.bob.pq")``."""
    base = base.rstrip("/")
    return lambda path: base + (path if path.startswith("/") else "/" + path)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read exactly n bytes or raise; SOCKS replies may arrive in pieces."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"peer closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _split_url(url: str) -> tuple[str, int, str]:
    """Split an http:// URL into (host, port, path); no TLS, no userinfo."""
    m = re.fullmatch(r"http://(\[[^\]]+\]|[^/:]+)(?::(\d+))?(/.*)?", url)
    if not m:
        raise ValueError(f"unsupported URL {url!r} (only http://host[:port]/path)")
    host = m.group(1).strip("[]")
    return host, int(m.group(2) or 80), m.group(3) or "/"


def _env_without_proxies() -> dict[str, str]:
    """Environment for curl with *_proxy removed so only our proxy is used."""
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


# --------------------------------------------------------------------------
# HTTP server
# --------------------------------------------------------------------------


class HttpServer(NamedTuple):
    """Where the benchmark HTTP server listens; ``path`` is the bulk file."""

    host: str
    port: int
    path: Path

    def url_for(self, resource: str) -> str:
        """Direct URL of a resource (what an ssh -D client asks for)."""
        return http_url_for(f"http://{self.host}:{self.port}")(resource)


_SMALL_BODY = 64 * 1024  # bodies up to this size are sent with the headers in one write


class _BulkHandler:
    """One thread per connection: HTTP/1.1 GET with keep-alive, bodies via sendfile.

    sendfile keeps the payload in the kernel, so a Python server still pushes
    several GB/s and does not become the bottleneck behind a tunnel.
    """

    def __init__(self, fd: int, file_size: int, bulk_size: int) -> None:
        self.fd = fd
        self.file_size = file_size
        self.bulk_size = bulk_size

    def body_len(self, path: str) -> int | None:
        """Map a request path to a body length; None means 404."""
        path = path.split("?", 1)[0]
        if path == "/1":
            return 1
        if path == "/mib":
            return MIB
        if path == "/bulk":
            return self.bulk_size
        m = re.fullmatch(r"/bytes/(\d+)", path)
        if m and int(m.group(1)) <= self.file_size:
            return int(m.group(1))
        return None

    def serve(self, conn: socket.socket) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                    if len(buf) > 65536:
                        return
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                parts = lines[0].split()
                if len(parts) != 3:
                    return
                method, target, version = parts
                headers = {}
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip().lower()
                close = headers.get("connection") == "close" or (
                    version == "HTTP/1.0" and headers.get("connection") != "keep-alive"
                )
                n = self.body_len(target) if method in ("GET", "HEAD") else None
                if n is None:
                    conn.sendall(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n"
                        + (b"Connection: close\r\n" if close else b"")
                        + b"\r\n"
                    )
                else:
                    hdr = (
                        f"HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n"
                        "Content-Type: application/octet-stream\r\n"
                        + ("Connection: close\r\n" if close else "")
                        + "\r\n"
                    ).encode()
                    if method == "HEAD":
                        conn.sendall(hdr)
                    elif n <= _SMALL_BODY:
                        conn.sendall(hdr + os.pread(self.fd, n, 0))
                    else:
                        conn.sendall(hdr)
                        off = 0
                        while off < n:
                            sent = os.sendfile(conn.fileno(), self.fd, off, n - off)
                            if sent == 0:
                                return
                            off += sent
                if close:
                    return
        except OSError:
            return
        finally:
            conn.close()


@contextlib.contextmanager
def http_server_threads(size_bytes: int, host: str = "127.0.0.1") -> Iterator[HttpServer]:
    """The HTTP server itself, running in threads of the calling process.

    Used by ``bulk_http_server`` inside a child process; call directly only
    when a separate process is impossible (it then shares the GIL with the
    measuring client).
    """
    tmp = Path(tempfile.mkdtemp(prefix="pqbench-http-"))
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    conns: set[socket.socket] = set()
    lock = threading.Lock()
    fd = -1
    try:
        data = tmp / "payload.bin"
        file_size = max(size_bytes, MIB)
        _write_pattern_file(data, file_size)
        fd = os.open(data, os.O_RDONLY)
        handler = _BulkHandler(fd, file_size, size_bytes)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, 0))
        listener.listen(4096)

        def run_conn(conn: socket.socket) -> None:
            try:
                handler.serve(conn)
            finally:
                with lock:
                    conns.discard(conn)

        def accept_loop() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return  # listener shut down
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with lock:
                    conns.add(conn)
                threading.Thread(target=run_conn, args=(conn,), daemon=True).start()

        acceptor = threading.Thread(target=accept_loop, name="bench-http-accept", daemon=True)
        acceptor.start()
        yield HttpServer(host, listener.getsockname()[1], data)
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        listener.close()
        with lock:
            for c in list(conns):
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
        if fd >= 0:
            os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def bulk_http_server(size_bytes: int, host: str = "127.0.0.1") -> Iterator[HttpServer]:
    """Run the benchmark HTTP/1.1 server in its own process; yield (host, port, path).

    Resources: ``/1`` (1 byte, latency probe), ``/mib`` (1 MiB), ``/bulk``
    (``size_bytes``, throughput), ``/bytes/N`` (any N up to max(size_bytes,
    1 MiB), used by the concurrency test).  All bodies are prefixes of
    ``expected_body``; ``path`` is the backing file.  Thread per connection
    (keep-alive, 4096 backlog), bodies via sendfile: measured ~2-3 GB/s to
    curl directly with ~0 s of Python CPU, the rest is the kernel's loopback
    TCP cost that any server pays.  A separate process keeps the server's
    200+ threads off the GIL of the measuring client.  Also runnable by hand:
    ``python3 benchmarks/harness.py serve SIZE [HOST]``.
    """
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "serve", str(size_bytes), host],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    data: Path | None = None
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        if len(line) != 3 or line[0] != "READY":
            raise RuntimeError(f"benchmark HTTP server failed to start (exit {proc.wait()}): {line!r}")
        data = Path(line[2])
        yield HttpServer(host, int(line[1]), data)
    finally:
        _stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()
        if data is not None:  # normally removed by the child; not if it had to be killed
            shutil.rmtree(data.parent, ignore_errors=True)


def _serve_main(size_bytes: int, host: str) -> None:
    """Child-process entry of ``bulk_http_server``: serve until SIGTERM."""

    def on_term(_sig: int, _frame: object) -> None:
        raise SystemExit(0)  # unwinds the context manager, removing the temp dir

    signal.signal(signal.SIGTERM, on_term)
    with http_server_threads(size_bytes, host) as srv:
        print(f"READY {srv.port} {srv.path}", flush=True)
        while True:
            signal.pause()


# --------------------------------------------------------------------------
# Process management
# --------------------------------------------------------------------------


def _ppid_map() -> dict[int, int]:
    """pid -> parent pid for every process (no /proc/PID/task/*/children here)."""
    out: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # comm may contain spaces/parens: fields after the last ')' are fixed.
        fields = stat[stat.rfind(b")") + 2 :].split()
        out[int(name)] = int(fields[1])
    return out


def _children_map() -> dict[int, list[int]]:
    """parent pid -> child pids, from one scan of /proc."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _ppid_map().items():
        children.setdefault(ppid, []).append(pid)
    return children


def _subtree(root: int, children: Mapping[int, list[int]]) -> list[int]:
    """root and all its descendants in ``children``."""
    out: list[int] = []
    stack = [root]
    while stack:
        p = stack.pop()
        if p not in out:
            out.append(p)
            stack.extend(children.get(p, []))
    return out


def process_tree(pids: Iterable[int]) -> list[int]:
    """The given pids plus all their live descendants (e.g. sshd per-connection children)."""
    children = _children_map()
    out: list[int] = []
    for root in pids:
        out += [p for p in _subtree(root, children) if p not in out]
    return out


def _stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; always reaps."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for_log(proc: subprocess.Popen[bytes], log: Path, patterns: Sequence[str], timeout: float) -> str:
    """Poll a log file until every regex in ``patterns`` matched; raise with the log otherwise."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if all(re.search(p, text, re.MULTILINE) for p in patterns):
            return text
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    raise RuntimeError(
        f"{proc.args!r} not ready (exit={proc.poll()}), waiting for {patterns!r}; log:\n{text[-4000:]}"
    )


def ensure_tools() -> None:
    """Install missing tools non-interactively (Debian): sshd, ssh, curl.

    Only installs what is absent; a private sshd is started per run, so the
    package's own service is never needed.
    """
    wanted = {
        "/usr/sbin/sshd": "openssh-server",
        "/usr/bin/ssh": "openssh-client",
        "/usr/bin/ssh-keygen": "openssh-client",
        "/usr/bin/curl": "curl",
        "/usr/bin/unshare": "util-linux",
    }
    missing = sorted({pkg for path, pkg in wanted.items() if not os.path.exists(path)})
    if not missing:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


# --------------------------------------------------------------------------
# Private sshd and ssh -D
# --------------------------------------------------------------------------


class SshdHandle(NamedTuple):
    """A running private sshd: its port, listener pid and a client key it accepts."""

    port: int
    pid: int
    identity_file: Path


_SSHD_CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {dir}/host_ed25519
PidFile {dir}/sshd.pid
AuthorizedKeysFile {dir}/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
AllowTcpForwarding yes
# The temp dir lives under /tmp (mode 1777), which StrictModes rejects.
StrictModes no
LogLevel INFO
"""


def _namespace_init_pid(unshare_proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int:
    """Host pid of the program ``unshare --fork`` started (its only child)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = [p for p, pp in _ppid_map().items() if pp == unshare_proc.pid]
        if kids:
            return kids[0]
        if unshare_proc.poll() is not None:
            break
        time.sleep(0.01)
    raise RuntimeError(f"no child under unshare pid {unshare_proc.pid}")


def _stop_namespace(unshare_proc: subprocess.Popen[bytes], init_pid: int | None) -> None:
    """Stop a PID namespace started by ``unshare --fork --pid --kill-child``.

    SIGTERM to the namespace init (sshd) lets it exit cleanly; when a PID
    namespace's init exits the kernel SIGKILLs and reaps everything else in
    it, so no per-connection sshd can survive or become a zombie.  unshare
    itself blocks SIGTERM, hence SIGKILL as the fallback (--kill-child then
    kills the init).
    """
    if unshare_proc.poll() is None and init_pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(init_pid, signal.SIGTERM)
        try:
            unshare_proc.wait(5)
            return
        except subprocess.TimeoutExpired:
            pass
    if unshare_proc.poll() is None:
        unshare_proc.kill()
    unshare_proc.wait()


@contextlib.contextmanager
def private_sshd(sshd_binary: str = "/usr/sbin/sshd") -> Iterator[SshdHandle]:
    """Start an isolated sshd on 127.0.0.1 with its own host key and config.

    It runs under ``unshare --mount --pid --fork`` with a tmpfs on /run, so
    its privilege-separation dir /run/sshd exists without touching the host
    (mount propagation is private, nothing leaks out).  sshd is init of its
    PID namespace: it reaps orphaned privsep children (no zombies), and
    stopping it takes every per-connection child down with it.  OpenSSH's
    default algorithms are left alone: the point is to measure what users
    get.  Yields a ``SshdHandle`` whose pid is the sshd listener (root of the
    per-connection children, for RSS); on exit everything is killed and
    reaped and the temp dir is removed.
    """
    if os.geteuid() != 0:
        raise PermissionError("private_sshd needs root (unshare, sshd privilege separation)")
    tmp = Path(tempfile.mkdtemp(prefix="pqbench-sshd-"))
    proc: subprocess.Popen[bytes] | None = None
    init_pid: int | None = None
    try:
        for key in ("host_ed25519", "client_ed25519"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key, "-f", str(tmp / key)],
                check=True,
            )
        shutil.copy(tmp / "client_ed25519.pub", tmp / "authorized_keys")
        last_err: Exception | None = None
        for _attempt in range(3):  # free_port() can race with other programs
            port = free_port()
            (tmp / "sshd_config").write_text(_SSHD_CONFIG.format(port=port, dir=tmp))
            log = tmp / "sshd.log"
            inner = (
                "mount -t tmpfs -o mode=755 tmpfs /run && mkdir -p /run/sshd && "
                f"exec {sshd_binary} -D -e -f {tmp}/sshd_config"
            )
            cmd = ["unshare", "--mount", "--propagation", "private", "--pid", "--kill-child",
                   "sh", "-c", inner]  # fmt: skip
            with open(log, "wb") as logf:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
            try:
                _wait_for_log(proc, log, [rf"Server listening on 127\.0\.0\.1 port {port}\."], 10)
                init_pid = _namespace_init_pid(proc)
            except RuntimeError as e:
                last_err = e
                _stop_namespace(proc, None)
                proc = None
                continue
            yield SshdHandle(port, init_pid, tmp / "client_ed25519")
            break
        else:
            raise RuntimeError(f"private sshd failed to start: {last_err}")
    finally:
        if proc is not None:
            _stop_namespace(proc, init_pid)
        shutil.rmtree(tmp, ignore_errors=True)


class SshProxy(NamedTuple):
    """A running ``ssh -N -D``: SOCKS port, ssh client pid, negotiated kex algorithm."""

    socks_port: int
    pid: int
    negotiated_kex: str


@contextlib.contextmanager
def ssh_socks_proxy(sshd_port: int, cipher: str, identity_file: Path) -> Iterator[SshProxy]:
    """Run ``ssh -N -D 127.0.0.1:PORT -c CIPHER`` against a private sshd.

    The kex is left at OpenSSH's default (sntrup761x25519 on 9.x) and read
    back from ``ssh -v`` so the table states what was actually negotiated;
    the negotiated cipher is checked against ``cipher`` in both directions.
    ``-F none`` keeps the user's and system ssh_config out of the benchmark.
    """
    tmp = Path(tempfile.mkdtemp(prefix="pqbench-ssh-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        last_err: Exception | None = None
        for _attempt in range(3):
            socks_port = free_port()
            log = tmp / f"ssh-{socks_port}.log"
            cmd = [
                "ssh", "-F", "none", "-v", "-N",
                "-D", f"127.0.0.1:{socks_port}",
                "-c", cipher,
                "-i", str(identity_file),
                "-p", str(sshd_port),
                "-o", "IdentitiesOnly=yes",
                "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes",
                "-o", "ExitOnForwardFailure=yes",
                "-o", "ControlPath=none",
                "root@127.0.0.1",
            ]  # fmt: skip
            with open(log, "wb") as logf:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=logf)
            try:
                text = _wait_for_log(
                    proc,
                    log,
                    [
                        r"^debug1: kex: algorithm: (\S+)",
                        r"^Authenticated to ",
                        rf"Local forwarding listening on 127\.0\.0\.1 port {socks_port}\.",
                    ],
                    15,
                )
            except RuntimeError as e:
                last_err = e
                _stop_process(proc)
                proc = None
                continue
            kex = re.search(r"^debug1: kex: algorithm: (\S+)", text, re.MULTILINE)
            assert kex is not None
            for direction in ("server->client", "client->server"):
                m = re.search(rf"^debug1: kex: {direction} cipher: (\S+)", text, re.MULTILINE)
                if not m or m.group(1) != cipher:
                    raise RuntimeError(f"asked for {cipher}, {direction} got {m and m.group(1)}")
            yield SshProxy(socks_port, proc.pid, kex.group(1))
            break
        else:
            raise RuntimeError(f"ssh -D failed to start: {last_err}")
    finally:
        if proc is not None:
            _stop_process(proc)
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------
# Minimal SOCKS5 + HTTP client (raw sockets, so timings are not hidden by a library)
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------


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
    host, port, path = _split_url(url_for(resource))
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
    host, port, path = _split_url(url_for(f"/bytes/{size}"))
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


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already included in user/nice
    return total - idle, total


def cpu_busy_fraction(interval_s: float = 1.0) -> float:
    """Fraction of all CPUs busy during ``interval_s`` (0..1), e.g. before a run.

    Benchmarks on a 2-core box are only comparable when nothing else runs;
    callers print this so a contaminated table is recognisable as such.
    """
    b0, t0 = _cpu_times()
    time.sleep(interval_s)
    b1, t1 = _cpu_times()
    return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


def report_idle_cpu() -> float:
    """Print how busy other processes keep the CPU before a run, warning when it is not idle."""
    busy = cpu_busy_fraction()
    print(f"CPU busy before the run (other processes): {busy:.0%}", flush=True)
    if busy > 0.10:
        print("WARNING: the machine is not idle; numbers will be low and noisy", flush=True)
    return busy


class ForeignCpu:
    """Share of the machine's CPU used by processes other than this one and its children.

    Busy time from /proc/stat minus our own and our reaped children's CPU
    time (getrusage), over the life of the object.  Stop it only after every
    process the benchmark started has been reaped, or their time counts as
    foreign.  Loopback softirq work is not always charged to a task, so an
    idle machine reads a few percent, not exactly 0.
    """

    def __init__(self) -> None:
        self._busy0, self._total0 = _cpu_times()
        self._own0 = self._own_cpu_s()

    @staticmethod
    def _own_cpu_s() -> float:
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def fraction(self) -> float:
        """Foreign CPU since construction, as a fraction of all CPUs (0..1)."""
        hz = os.sysconf("SC_CLK_TCK")
        busy, total = _cpu_times()
        if total <= self._total0:
            return 0.0
        foreign_s = (busy - self._busy0) / hz - (self._own_cpu_s() - self._own0)
        return max(0.0, foreign_s / ((total - self._total0) / hz))


def _read_status_kb(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in kB from /proc/PID/status, or None if gone/kernel thread."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return None
    rss = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    hwm = re.search(r"^VmHWM:\s+(\d+) kB", text, re.MULTILINE)
    if not rss or not hwm:
        return None
    return int(rss.group(1)), int(hwm.group(1))


class RssSampler:
    """Background sampler of the summed RSS of process trees.

    ``peak_mb``: highest sum of VmRSS over all given trees seen in one sample
    (what the processes really held at once).  ``peak_mb_by_root[pid]``: the
    same for one given pid and its descendants (e.g. ssh client vs sshd), from
    one shared sampling thread.  ``hwm_mb``: sum of each process's VmHWM, an
    upper bound that also catches spikes between samples.  Children are
    re-scanned every sample because sshd forks per connection.  MB = 2^20 bytes.
    The 50 ms default interval resolves a peak that lasts ~1 s while costing
    only ~1 ms of Python per sample, so it barely competes with the tunnel.
    """

    def __init__(self, pids: Iterable[int], interval_s: float = 0.05, children: bool = True) -> None:
        self.pids = list(pids)
        self.interval_s = interval_s
        self.children = children
        self.peak_mb = 0.0
        self.peak_mb_by_root: dict[int, float] = {p: 0.0 for p in self.pids}
        self.samples = 0
        self._hwm_kb: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    @property
    def hwm_mb(self) -> float:
        return sum(self._hwm_kb.values()) / 1024

    def _trees(self) -> dict[int, list[int]]:
        if not self.children:
            return {p: [p] for p in self.pids}
        children = _children_map()
        return {root: _subtree(root, children) for root in self.pids}

    def sample(self) -> None:
        """Take one reading now (also called by the thread)."""
        rss_kb: dict[int, int] = {}
        trees = self._trees()
        for tree in trees.values():
            for pid in tree:
                if pid in rss_kb:
                    continue
                st = _read_status_kb(pid)
                if st is None:
                    continue
                rss_kb[pid] = st[0]
                self._hwm_kb[pid] = max(self._hwm_kb.get(pid, 0), st[1])
        for root, tree in trees.items():
            mb = sum(rss_kb.get(p, 0) for p in tree) / 1024
            self.peak_mb_by_root[root] = max(self.peak_mb_by_root[root], mb)
        self.peak_mb = max(self.peak_mb, sum(rss_kb.values()) / 1024)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


@contextlib.contextmanager
def peak_rss_mb(pids: Iterable[int], interval_s: float = 0.05, children: bool = True) -> Iterator[RssSampler]:
    """Sample the RSS of ``pids`` (and their descendants) while the block runs.

    ``with peak_rss_mb([client_pid, server_pid]) as rss: ...`` then read
    ``rss.peak_mb``, ``rss.peak_mb_by_root[server_pid]`` or ``rss.hwm_mb``
    after the block.  Sampling happens in a thread so the
    measurement code itself stays unchanged.
    """
    sampler = RssSampler(pids, interval_s, children).start()
    try:
        yield sampler
    finally:
        sampler.stop()


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """One configuration in the results table; ``values`` maps metric name -> number."""

    name: str
    values: Mapping[str, float | None]
    note: str = ""


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def print_table(rows: Sequence[Row], baseline_name: str, metrics: Sequence[str] | None = None) -> None:
    """Print a plain-text table; each metric gets a ``x<baseline>`` ratio column.

    Ratio = value / baseline value from the same run (so >1 is better for
    MB/s and worse for ms, s and MB).  Metric columns default to the union of
    keys in row order.  Notes (e.g. negotiated kex) are printed under the table.
    """
    base = next((r for r in rows if r.name == baseline_name), None)
    if base is None:
        raise ValueError(f"baseline {baseline_name!r} not among rows {[r.name for r in rows]}")
    if metrics is None:
        metrics = []
        for r in rows:
            metrics += [k for k in r.values if k not in metrics]
    header = ["config"]
    for m in metrics:
        header += [m, "ratio"]
    table = [header]
    for r in rows:
        line = [r.name]
        for m in metrics:
            v = r.values.get(m)
            b = base.values.get(m)
            line.append(_fmt(v))
            line.append(f"{v / b:.2f}x" if v is not None and b else "-")
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for j, row in enumerate(table):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        print("  ".join(cells))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    print(f"ratio = value / value of '{baseline_name}' in this run")
    for r in rows:
        if r.note:
            print(f"  {r.name}: {r.note}")


if __name__ == "__main__":
    if len(sys.argv) in (3, 4) and sys.argv[1] == "serve":
        _serve_main(int(sys.argv[2]), sys.argv[3] if len(sys.argv) == 4 else "127.0.0.1")
    else:
        sys.exit("usage: harness.py serve SIZE_BYTES [HOST]   (benchmark HTTP server; SIGTERM to stop)")
