"""The local SOCKS5 endpoint: ``SERVICE.PEER.pq`` and ``PEER.pq:PORT`` through the tunnel."""

from __future__ import annotations

import ipaddress

from typing import Any, Protocol

import trio

from pqtunnel import mux, socks
from pqtunnel.errors import PqtunnelError, UserError
from pqtunnel.policy import Policy, SocksAccountRequest, SocksClientRequest

from .config import Address
from .links import PeerAuthenticationError, PeerUnreachableError, UnknownPeerError
from .logs import LOG
from .peercred import local_peer_uid
from .splice import bridge
from .streams import StreamError, StreamRefusedError, TunnelStream



class SocksHost(Protocol):
    """What the SOCKS endpoint needs from the node: its Policy (accounts) and streams to peers."""

    policy: Policy

    async def open_stream(self, peer: str, target: dict[str, Any]) -> TunnelStream: ...

NEGOTIATION_TIMEOUT = 10.0

_FAILURE_FOR_CODE = {
    mux.ErrorCode.UNKNOWN_SERVICE: socks.TargetFailure.UNKNOWN_SERVICE,
    mux.ErrorCode.NOT_ALLOWED: socks.TargetFailure.POLICY_DENIED,
    mux.ErrorCode.REFUSED: socks.TargetFailure.SERVICE_REFUSED,
    mux.ErrorCode.UNREACHABLE: socks.TargetFailure.SERVICE_REFUSED,
}


def target_dict(target: socks.ServiceTarget | socks.PortTarget) -> dict[str, Any]:
    if isinstance(target, socks.ServiceTarget):
        return {"service": target.service}
    return {"port": target.port}


def failure_for(exc: BaseException) -> socks.TargetFailure:
    """One mapping from why a stream could not open to the SOCKS reply (via socks.reply_for)."""

    if isinstance(exc, UnknownPeerError):
        return socks.TargetFailure.UNKNOWN_PEER
    if isinstance(exc, PeerAuthenticationError):
        return socks.TargetFailure.HANDSHAKE_FAILED
    if isinstance(exc, PeerUnreachableError):
        return socks.TargetFailure.PEER_UNREACHABLE
    if isinstance(exc, StreamRefusedError):
        return _FAILURE_FOR_CODE.get(exc.code, socks.TargetFailure.SERVICE_REFUSED)  # type: ignore[call-overload]
    if isinstance(exc, StreamError):
        return socks.TargetFailure.PEER_UNREACHABLE
    return socks.TargetFailure.INTERNAL_ERROR


def exposure_warning(address: Address, accounts: bool, anyone: bool) -> str | None:
    """Why a SOCKS endpoint reachable from other hosts is risky, or None when it is not.

    Clients from other hosts cannot be identified, so without RFC 1929 accounts they are all
    refused; with socks_allow_users = ["*"] nothing stops anyone who can reach the port."""
    try:
        loopback = ipaddress.ip_address(address.host).is_loopback
    except ValueError:
        loopback = address.host == "localhost"
    if loopback:
        return None
    if anyone:
        return (f"SOCKS listens on {address} (beyond loopback) and socks_allow_users = [\"*\"]: "
                "anyone who can reach it uses this node's identity")
    if not accounts:
        return (f"SOCKS listens on {address} (beyond loopback) without [socks_users] accounts: "
                "clients from other hosts are refused; add accounts or listen on 127.0.0.1")
    return None


async def open_socks_listener(address: Address) -> list[trio.SocketListener]:
    try:
        return await trio.open_tcp_listeners(address.port, host=address.host)
    except OSError as exc:
        raise UserError(f"cannot listen for SOCKS on {address}: {exc.strerror or exc}") from None


async def serve_socks_client(node: SocksHost, client: trio.SocketStream) -> None:
    """Negotiate, open the tunnel stream, reply, then splice; one line of log per outcome.

    A client that vanishes at any point costs only its own connection.
    """
    try:
        await _serve(node, client)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    except Exception as exc:  # a bug costs one client, never the daemon
        LOG.warning("SOCKS client failed: %s: %s", type(exc).__name__, exc)


async def _serve(node: SocksHost, client: trio.SocketStream) -> None:
    async with client:
        who = node.policy.decide(SocksClientRequest(local_peer_uid(client.socket)))
        try:
            with trio.fail_after(NEGOTIATION_TIMEOUT):
                server, request = await _negotiate(node.policy, client)
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
        if request is None:
            return
        if not who.allowed:  # answered at CONNECT, so the client shows "not allowed by ruleset"
            LOG.info("SOCKS: refused %s:%d: %s", request.host, request.port, who.reason)
            server.reply(socks.ReplyCode.NOT_ALLOWED)
            await _send(client, server)
            return
        await _connect(node, client, server, request)


async def _negotiate(policy: Policy, client: trio.SocketStream) -> tuple[socks.Socks5Server, socks.ConnectRequested | None]:
    server = socks.Socks5Server(require_auth=policy.socks_login_required)
    while True:
        data = await client.receive_some(65536)
        events = server.receive_data(data)
        while events:
            event = events.pop(0)
            if isinstance(event, socks.AuthRequested):
                decision = policy.decide(SocksAccountRequest(event.username, event.password))
                if not decision.allowed:
                    LOG.info("SOCKS: %s", decision.reason)
                events.extend(server.accept_credentials(decision.allowed))
            elif isinstance(event, socks.ConnectRequested):
                await _send(client, server)
                return server, event
            elif isinstance(event, socks.SocksError):
                LOG.info("SOCKS client refused: %s", event.reason)
                await _send(client, server)
                return server, None
        await _send(client, server)
        if not data:
            return server, None


async def _send(client: trio.SocketStream, server: socks.Socks5Server) -> None:
    out = server.data_to_send()
    if out:
        await client.send_all(out)


async def _connect(node: SocksHost, client: trio.SocketStream, server: socks.Socks5Server,
                   request: socks.ConnectRequested) -> None:
    try:
        target = socks.target_for_request(request)
    except socks.TargetNameError as exc:
        LOG.info("SOCKS: refused %s:%d: %s", request.host, request.port, exc)
        server.reply(socks.reply_for(exc.failure))
        await _send(client, server)
        return
    label = f"{request.host}:{request.port}"
    try:
        stream = await node.open_stream(target.peer, target_dict(target))
    except (PqtunnelError, OSError) as exc:
        failure = failure_for(exc)
        LOG.info("SOCKS: %s refused (%s): %s", label, failure.name.lower().replace("_", " "), exc)
        server.reply(socks.reply_for(failure))
        await _send(client, server)
        return
    try:
        server.reply(socks.ReplyCode.SUCCEEDED)
        await _send(client, server)
        early = server.trailing_data()
        if early:
            await stream.send_all(early)
        await bridge(client, stream)
    except (PqtunnelError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        LOG.info("SOCKS: %s ended: %s", label, exc)
    finally:
        await stream.aclose()
