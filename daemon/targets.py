"""What ``pqtunnel connect`` and ``pqtunnel forward`` reach: a peer and a target on it.

The names mean the same as through SOCKS (``pqtunnel.socks.parse_pq_target``), so a
ProxyCommand (``connect %h %p``) and a SOCKS client agree on where ``web.bob.pq`` goes.
"""

from __future__ import annotations

from typing import Any

from pqtunnel.errors import ConfigError, UserError
from pqtunnel.names import validate_name
from pqtunnel.socks import PortTarget, TargetNameError, parse_pq_target

Target = tuple[str, dict[str, Any]]
"""(peer name, control-socket target: ``{"service": NAME}`` or ``{"port": N}``)."""


class TargetError(ConfigError):
    """A connect or forward target that names no peer service or port."""


def parse_target(text: str) -> Target:
    """``PEER/SERVICE`` or ``PEER:PORT`` (the peer may carry a ``.pq`` suffix)."""
    if "/" in text:
        peer, _, service = text.partition("/")
        return _peer(peer.removesuffix(".pq")), {"service": _name(service, "service name")}
    peer, sep, port = text.rpartition(":")
    if sep and port.isdigit() and 0 < int(port) < 65536:
        return _peer(peer.removesuffix(".pq")), {"port": int(port)}
    raise TargetError(f"target {text!r}: expected PEER/SERVICE or PEER:PORT")


def parse_host_port(host: str, port: str) -> Target:
    """The two-argument form ``HOST PORT`` of ProxyCommand-style callers (``GIT_PROXY_COMMAND``
    runs ``CMD HOST PORT``, ssh's ``ProxyCommand`` is written ``connect %h %p``).

    ``SERVICE.PEER.pq`` is the peer's named service (the port is ignored, as through SOCKS);
    ``PEER.pq`` and a bare ``PEER`` are the peer's ``127.0.0.1:PORT``.
    """
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise TargetError(f"port {port!r}: expected a number from 1 to 65535")
    number = int(port)
    if "." not in host.rstrip("."):
        return _peer(host), {"port": number}
    try:
        target = parse_pq_target(host, number)
    except TargetNameError as exc:
        raise TargetError(str(exc)) from None
    if isinstance(target, PortTarget):
        return target.peer, {"port": target.port}
    return target.peer, {"service": target.service}


def describe(peer: str, target: dict[str, Any]) -> str:
    """``bob/web`` or ``bob:8080``, as the user would write it."""
    return f"{peer}/{target['service']}" if "service" in target else f"{peer}:{target['port']}"


def _peer(text: str) -> str:
    return _name(text, "peer name")


def _name(text: str, what: str) -> str:
    try:
        return validate_name(text, what)
    except UserError as exc:
        raise TargetError(str(exc)) from None
