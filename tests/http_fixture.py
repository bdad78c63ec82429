"""A small threaded HTTP server for tests: deterministic bodies, sizes on request."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

CHUNK = 64 * 1024


def body_bytes(size: int, seed: int = 0) -> Iterator[bytes]:
    """Deterministic pseudo-random content, generated in chunks so huge sizes cost no memory."""
    block = hashlib.sha256(f"pqtunnel-{seed}".encode()).digest() * (CHUNK // 32)
    remaining = size
    counter = 0
    while remaining > 0:
        chunk = bytes([counter & 0xFF]) + block[1:]
        yield chunk[: min(CHUNK, remaining)]
        remaining -= CHUNK
        counter += 1


def body_digest(size: int, seed: int = 0) -> str:
    digest = hashlib.sha256()
    for chunk in body_bytes(size, seed):
        digest.update(chunk)
    return digest.hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        parts = self.path.strip("/").split("/")
        if parts == [""]:
            self._reply(b"hello from bob\n")
        elif parts[0] == "bytes" and len(parts) in (2, 3):
            size, seed = int(parts[1]), int(parts[2]) if len(parts) == 3 else 0
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            try:
                for chunk in body_bytes(size, seed):
                    self.wfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
        else:
            self.send_error(404)

    def _reply(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # hundreds of parallel streams connect at once
    daemon_threads = True


class HttpServer:
    def __init__(self) -> None:
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HttpServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
