"""Where benchmark endpoints listen and how clients name their resources.

``url_for(path)`` maps a resource path on the benchmark HTTP server (``"/1"``,
``"/mib"``, ``"/bulk"``, ``"/bytes/N"``) to the URL a client asks the proxy
for.  For ssh that is ``http://127.0.0.1:HTTPPORT/bulk``; for pqtunnel it is
e.g. ``http://web.bob.pq/bulk`` (``http_url_for("http://web.bob.pq")``).
``free_port`` picks a loopback port for programs that need one on the command
line.  Standard library only.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable

UrlFor = Callable[[str], str]


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


def split_url(url: str) -> tuple[str, int, str]:
    """Split an http:// URL into (host, port, path); no TLS, no userinfo."""
    m = re.fullmatch(r"http://(\[[^\]]+\]|[^/:]+)(?::(\d+))?(/.*)?", url)
    if not m:
        raise ValueError(f"unsupported URL {url!r} (only http://host[:port]/path)")
    host = m.group(1).strip("[]")
    return host, int(m.group(2) or 80), m.group(3) or "/"
