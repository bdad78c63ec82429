"""Benchmark HTTP/1.1 server: fixed-size bodies via sendfile, in its own process.

``bulk_http_server(size)`` starts it as a child process (this file run as a
script) and yields where it listens; the context manager kills and reaps the
process and deletes its temp dir.  Resources and their bodies are described
in ``bulk_http_server``; every body is a prefix of ``payload.expected_body``.
Run by hand: ``python3 benchmarks/httpserver.py serve SIZE_BYTES [HOST]``.
Standard library only; Linux (sendfile).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from addresses import http_url_for
from payload import MIB, write_pattern_file
from processes import stop_process


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
        write_pattern_file(data, file_size)
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
    ``python3 benchmarks/httpserver.py serve SIZE [HOST]``.
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
        stop_process(proc)
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


if __name__ == "__main__":
    if len(sys.argv) in (3, 4) and sys.argv[1] == "serve":
        _serve_main(int(sys.argv[2]), sys.argv[3] if len(sys.argv) == 4 else "127.0.0.1")
    else:
        sys.exit("usage: httpserver.py serve SIZE_BYTES [HOST]   (benchmark HTTP server; SIGTERM to stop)")
