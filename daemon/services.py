"""The serving side of streams: a peer asks for a named service or a port; we connect it.

Whether the peer may is the node's Policy's decision (``pqtunnel.policy``); this module
only carries it out. TCP services are spliced to a fresh connection; exec services (stdio,
e.g. an MCP tool server) get one process per stream, with stdin/stdout spliced to the
stream, stderr logged, and the process killed and reaped when the stream ends. Each
decision and each end is a structured event (``StreamAllowed``, ``StreamDenied``,
``StreamEnded``) on the node's event bus.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import socket
import subprocess
import time
from typing import Any, Protocol

import trio

from pqtunnel import events, mux
from pqtunnel.errors import PqtunnelError
from pqtunnel.limits import SlotLimit
from pqtunnel.policy import Decision, LocalPort, Policy, StreamRequest

from .config import Address, ExecService
from .eventlog import Emit
from .logs import LOG
from .splice import EXPECTED_ERRORS, Duplex, bridge
from .netio import connect_stream
from .netio import os_reason as _os_reason
from .resources import NodeResources
from .streams import TunnelStream



class ServiceHost(Protocol):
    """What serving a stream needs from the node: its Policy, its event bus and its limits."""

    policy: Policy
    emit: Emit
    resources: NodeResources

CONNECT_TIMEOUT = 10.0
KILL_GRACE = 2.0
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
DEFAULT_LANG = "C.UTF-8"
BACKEND_RULE = "backend"
"""The rule named in a StreamDenied when the policy allowed the stream but its backend failed."""
LIMITS_RULE = "limits"
"""The rule named in a StreamDenied when the policy allowed the stream but a ``[limits]`` cap is reached."""


class Refusal(PqtunnelError):
    """A stream this node will not serve. ``str`` is the full reason, for this node's log and
    audit; ``public`` is what the peer is told (no local paths or addresses)."""

    def __init__(self, code: mux.ErrorCode, reason: str, rule: str = BACKEND_RULE, *, public: str | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.rule = rule
        self.public = public if public is not None else reason


def service_summary(services: dict[str, Address | ExecService]) -> list[dict[str, str]]:
    """Names and kinds (``tcp``, ``exec``) for ``pqtunnel status``: never the commands,
    addresses or environments, which may hold secrets."""
    return [{"name": name, "kind": "exec" if isinstance(backend, ExecService) else "tcp"}
            for name, backend in sorted(services.items())]


def describe(target: dict[str, Any]) -> str:
    if "service" in target:
        return f"service {target['service']}"
    return f"port {target.get('port')}"


def stream_request(stream: TunnelStream) -> StreamRequest:
    """The policy question for an inbound stream, with the facts of the session carrying it."""
    result = stream.port.result
    return StreamRequest(
        peer=stream.peer,
        target=stream.target,
        fingerprint=result.peer.fingerprint if result is not None else None,
        groups=stream.port.groups,
        address=stream.port.peer_host,
        suite=result.suite.name if result is not None else None,
    )


def resolve(policy: Policy, request: StreamRequest) -> tuple[Decision, Address | ExecService]:
    """Ask the policy; return its decision and what to connect, or raise Refusal with its reason."""
    decision = policy.decide(request)
    if not decision.allowed:
        raise Refusal(decision.code if decision.code is not None else mux.ErrorCode.REFUSED,
                      decision.reason, decision.rule)
    backend = decision.backend
    if isinstance(backend, LocalPort):
        return decision, Address("127.0.0.1", backend.port)
    return decision, backend


class _StreamReport:
    """The events of one served stream: allowed or denied, then how it ended."""

    def __init__(self, stream: TunnelStream, request: StreamRequest, what: str, emit: Emit) -> None:
        self.stream = stream
        self.fingerprint = request.fingerprint or ""
        self.what = what
        self.emit = emit
        self.started = time.monotonic()
        self.facts = stream_facts(stream)

    def allowed(self, rule: str) -> None:
        self.emit(events.StreamAllowed(self.stream.peer, self.fingerprint, self.stream.stream_id, self.what, rule,
                                       **self.facts))

    def denied(self, rule: str, reason: str) -> None:
        self.emit(events.StreamDenied(self.stream.peer, self.fingerprint, self.stream.stream_id, self.what,
                                      rule, reason, **self.facts))

    def ended(self, reason: str) -> None:
        stream = self.stream
        self.emit(events.StreamEnded(stream.peer, self.fingerprint, stream.stream_id, self.what, stream.bytes_in,
                                     stream.bytes_out, round(time.monotonic() - self.started, 6), reason,
                                     **self.facts))


def stream_facts(stream: TunnelStream) -> dict[str, Any]:
    """The audit facts of a stream (``events.StreamFacts``): its target as a service or a port,
    and the address and algorithms of the session carrying it."""
    target = stream.target
    service, port = target.get("service"), target.get("port")
    facts: dict[str, Any] = {
        "service": service if isinstance(service, str) else None,
        "port": port if isinstance(port, int) and not isinstance(port, bool) else None,
        "addr": stream.port.remote,
    }
    result = stream.port.result
    if result is not None:
        facts.update(suite=result.suite.name, kem=result.suite.kem_label, signature=result.suite.signature_label,
                     aead=result.aead.label)
    return facts


async def serve_stream(node: ServiceHost, stream: TunnelStream) -> None:
    """Own one inbound stream from accept to close; never lets an error escape."""
    await serve(stream, node.policy, node.emit, node.resources.exec_slots)


async def serve(stream: TunnelStream, policy: Policy, emit: Emit, exec_slots: SlotLimit[str] | None = None) -> None:
    """Serve one inbound stream as ``policy`` decides, reporting through ``emit``; exec
    services run only while ``exec_slots`` has a slot for the peer and the node."""
    what = describe(stream.target)
    request = stream_request(stream)
    report = _StreamReport(stream, request, what, emit)
    try:
        decision, backend = resolve(policy, request)
        report.allowed(decision.rule)
        if isinstance(backend, ExecService):
            status = await _serve_exec_within(exec_slots, stream, backend, what)
            report.ended(f"exit status {status}")
        else:
            await _serve_tcp(stream, backend, what)
            report.ended("finished")
    except Refusal as refusal:
        report.denied(refusal.rule, str(refusal))
        stream.refuse(refusal.code, refusal.public)
    except (PqtunnelError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        cause = _os_error_of(exc)
        reason = _os_reason(cause) if cause is not None else str(exc)
        LOG.info("stream %d from %s to %s ended: %s", stream.stream_id, stream.peer, what, reason)
        report.ended(reason)
        if cause is not None:  # the service's side broke: tell the peer how (else it reads "closed")
            stream.reset(mux.ErrorCode.CANCELLED, f"{what}: {reason}")
        await stream.aclose()
    except Exception as exc:  # a bug costs one stream, never the session
        LOG.warning("stream %d from %s to %s failed: %s: %s", stream.stream_id, stream.peer, what, type(exc).__name__, exc)
        report.ended(f"failed: {type(exc).__name__}: {exc}")
        await stream.aclose()


def _os_error_of(exc: BaseException) -> OSError | None:
    """The OS error behind ``exc`` (trio wraps a reset socket in BrokenResourceError)."""
    if isinstance(exc, OSError):
        return exc
    cause = exc.__cause__
    return cause if isinstance(exc, trio.BrokenResourceError) and isinstance(cause, OSError) else None


async def _serve_tcp(stream: TunnelStream, address: Address, what: str) -> None:
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            target = await connect_tcp(address.host, address.port)
    except (OSError, trio.TooSlowError) as exc:
        reason = "timed out" if isinstance(exc, trio.TooSlowError) else _os_reason(exc)
        raise Refusal(mux.ErrorCode.REFUSED, f"{what} ({address}): {reason}",
                      public=f"{what} is unavailable: {reason}") from None
    async with target:
        stream.accept()
        LOG.debug("stream %d: %s -> %s (%s)", stream.stream_id, stream.peer, what, address)
        await bridge(stream, target)


async def connect_tcp(host: str, port: int) -> trio.SocketStream:
    """Connect; an IP literal (the usual service target) skips trio's resolver machinery."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return await trio.open_tcp_stream(host, port)
    return await connect_stream(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, (host, port))


def exec_environment(service: ExecService, parent: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of an exec service: PATH, LANG and HOME of the daemon's user, then the
    service's own ``env``. Never the daemon's whole environment: it may hold secrets (API keys,
    tokens) that a peer must not read through a process it starts."""
    parent = os.environ if parent is None else parent
    env = {"PATH": parent.get("PATH") or DEFAULT_PATH, "LANG": parent.get("LANG") or DEFAULT_LANG,
           "HOME": _user_home(parent)}
    env.update(service.env)
    return env


def _user_home(parent: dict[str, str]) -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:  # a uid without a passwd entry (some containers)
        return parent.get("HOME") or "/"


async def _serve_exec_within(slots: SlotLimit[str] | None, stream: TunnelStream, service: ExecService,
                             what: str) -> int | None:
    """Run the exec service if a process slot is free for this peer and the node; the slot is
    held until the process is reaped, so a peer cannot fork without bound."""
    if slots is None:
        return await _serve_exec(stream, service, what)
    refusal = slots.acquire(stream.peer)
    if refusal is not None:
        raise Refusal(mux.ErrorCode.REFUSED, f"{what}: {refusal}", LIMITS_RULE)
    try:
        return await _serve_exec(stream, service, what)
    finally:
        slots.release(stream.peer)


async def _serve_exec(stream: TunnelStream, service: ExecService, what: str) -> int | None:
    """Run the process for one stream; returns its exit status."""
    try:
        process = await trio.lowlevel.open_process(list(service.argv), stdin=subprocess.PIPE,
                                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                   env=exec_environment(service))
    except OSError as exc:
        reason = f"{what} failed to start {service.argv[0]!r}: {_os_reason(exc)}"  # logged and audited here
        raise Refusal(mux.ErrorCode.UNREACHABLE, reason, public=f"{what} failed to start") from None
    error: BaseException | None = None
    try:  # from here on, whatever happens, the process is killed and reaped
        stream.accept()
        LOG.info("stream %d: %s -> %s (pid %d)", stream.stream_id, stream.peer, what, process.pid)
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_log_stderr, process.stderr, what, process.pid)
            try:
                await bridge(stream, Duplex(process.stdout, process.stdin))
            except EXPECTED_ERRORS as exc:
                error = exc
            else:
                with trio.move_on_after(KILL_GRACE):  # both directions ended: let it exit by itself
                    await process.wait()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await _reap(process)
    if error is not None:
        raise error
    LOG.info("stream %d: %s -> %s closed, exit status %s", stream.stream_id, stream.peer, what, process.returncode)
    return process.returncode


async def _log_stderr(stderr: trio.abc.ReceiveStream, what: str, pid: int) -> None:
    buffer = b""
    while True:
        try:
            chunk = await stderr.receive_some(65536)
        except EXPECTED_ERRORS:
            chunk = b""
        if not chunk:
            break
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            LOG.info("%s[%d] stderr: %s", what, pid, line.decode(errors="replace")[:500])
        buffer = buffer[-4096:]
    if buffer:
        LOG.info("%s[%d] stderr: %s", what, pid, buffer.decode(errors="replace")[:500])


async def _reap(process: trio.Process) -> None:
    """Terminate, then kill, and always wait: no zombies, no orphans."""
    if process.returncode is None:
        process.terminate()
        with trio.move_on_after(KILL_GRACE):
            await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()
    for pipe in (process.stdin, process.stdout, process.stderr):
        if pipe is not None:
            await trio.aclose_forcefully(pipe)
