"""Handshake benchmark: latency on loopback (p50/p99), CPU per side, bytes per message, per suite.

Run: ``.venv/bin/python benchmarks/handshake.py [--rounds N]``. The responder is a real
``pqtunnel up`` daemon process; the initiator is the library over a real TCP socket. The
baseline, measured in the same run, is the ``classical`` suite (X25519 + Ed25519), i.e.
what the post-quantum protection costs on top of a classical Noise XX handshake.

The daemon rations handshakes (``pqtunnel.admission``: ``node_per_s`` a second after a
burst, ``source_per_s`` per address), so the rounds are paced below the node's rate and
come from 200 loopback source addresses in turn, as an honest initiator's would: each
handshake meets an idle, unthrottled responder (about 200 rounds per 10 s).

The ``resumed`` row is a 1-RTT resumption with a ticket (docs/PROTOCOL.md 4.10) against the
same daemon: first one ticket per round is taken from a full hybrid session (the daemon
grants it in a TICKET record; untimed, tickets are single-use), then each resumption is
timed on a new connection, paced and sourced like the full rows.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Awaitable, Callable, Protocol, TypeVar

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pqlab.process import Daemon, init_node, pq  # noqa: E402
from pqtunnel.admission import AdmissionLimits  # noqa: E402
from pqtunnel.crypto.suites import SUITES, Suite  # noqa: E402
from pqtunnel.handshake import HandshakeConfig, HandshakeStep, InitiatorHandshake, ResponderHandshake  # noqa: E402
from pqtunnel.identity import Identity  # noqa: E402
from pqtunnel.session import Session, TicketGranted  # noqa: E402
from pqtunnel.tickets import (  # noqa: E402
    ClientTicket,
    ResumeInitiator,
    ResumeResponder,
    accept_ticket_grant,
    issue_ticket,
)
from pqtunnel.wire import Frame, FrameDecoder, Kind  # noqa: E402
from pqtunneld.stores import load_identity  # noqa: E402

T = TypeVar("T")
BASELINE = "classical"
SOURCES = [f"127.0.1.{i}" for i in range(1, 201)]
PACE_S = 1 / (0.9 * AdmissionLimits().node_per_s)  # below the node's refill: it never has to refuse
TICKET_TIMEOUT_S = 5.0
"""How long a full session may take to deliver its TICKET record before the run fails."""


def cpu_per_side(suite: Suite, rounds: int) -> tuple[float, float, list[int]]:
    """Median CPU milliseconds per handshake for each role, in process, no I/O."""
    alice, bob = Identity.generate("alice"), Identity.generate("bob")
    config = HandshakeConfig(allowed_suites=(suite,))
    initiator_cpu, responder_cpu, sizes = [], [], []
    for _ in range(rounds):
        now = int(time.time() * 1000)
        initiator = InitiatorHandshake(alice, lambda p: "bob", config=config)
        responder = ResponderHandshake(bob, lambda p: "alice", peer_address="127.0.0.1", config=config)
        decoder = FrameDecoder()
        t0 = time.process_time()
        hello = initiator.start(now)
        t1 = time.process_time()
        response = responder.receive(decoder.feed(hello)[0], now).to_send
        t2 = time.process_time()
        finish = initiator.receive(decoder.feed(response)[0], now).to_send
        t3 = time.process_time()
        responder.receive(decoder.feed(finish)[0], now)
        t4 = time.process_time()
        initiator_cpu.append((t1 - t0 + t3 - t2) * 1000)
        responder_cpu.append((t2 - t1 + t4 - t3) * 1000)
        sizes = [len(hello), len(response), len(finish)]
    return statistics.median(initiator_cpu), statistics.median(responder_cpu), sizes


def _wall_ms() -> int:
    return int(time.time() * 1000)


def _monotonic_ms() -> int:
    return int(time.monotonic() * 1000)


async def _connect(port: int, source: str) -> trio.SocketStream:
    """A TCP connection to the daemon from ``source``, so admission sees that address."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


def _p50_p99(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def _paced(rounds: int, one_round: Callable[[int, str], Awaitable[T]]) -> list[T]:
    """Run ``one_round(i, source)`` at PACE_S intervals, each from the next source address."""
    results: list[T] = []
    start = trio.current_time()
    for i in range(rounds):
        await trio.sleep_until(start + i * PACE_S)
        results.append(await one_round(i, SOURCES[i % len(SOURCES)]))
    return results


class _Initiator(Protocol):
    """What a timed round drives: a full handshake's or a resumption's initiator."""

    @property
    def done(self) -> bool: ...

    def start(self, now_ms: int, /) -> bytes: ...

    def receive(self, frame: Frame, now_ms: int, /) -> HandshakeStep: ...


async def _timed_round(initiator: _Initiator, port: int, source: str) -> float:
    """Connect, run ``initiator`` up to the daemon's first record after it is done: milliseconds."""
    started = time.perf_counter()
    stream = await _connect(port, source)
    async with stream:
        await stream.send_all(initiator.start(_wall_ms()))
        decoder = FrameDecoder()
        while True:
            data = await stream.receive_some(65536)
            if not data:
                raise RuntimeError("responder closed the connection")
            for frame in decoder.feed(data):
                if frame.kind is Kind.RECORD and initiator.done:  # key confirmation, or the first record after ACCEPT
                    return (time.perf_counter() - started) * 1000
                step = initiator.receive(frame, _wall_ms())  # an ALERT (e.g. ticket refused) raises here
                if step.to_send:
                    await stream.send_all(step.to_send)


async def _timed_rounds(port: int, rounds: int, initiator_for: Callable[[int], _Initiator]) -> list[float]:
    """Milliseconds of each paced round; ``initiator_for(i)`` is built before round i's clock starts."""
    return await _paced(rounds, lambda i, source: _timed_round(initiator_for(i), port, source))


def latency(identity: Identity, port: int, suite: Suite, rounds: int) -> tuple[float, float]:
    """p50/p99 of full handshakes in ``suite``."""
    config = HandshakeConfig(allowed_suites=(suite,))

    def initiator_for(i: int) -> InitiatorHandshake:
        return InitiatorHandshake(identity, lambda p: "bob", config=config)

    return _p50_p99(trio.run(_timed_rounds, port, rounds, initiator_for))


async def _obtain_ticket(identity: Identity, port: int, source: str) -> ClientTicket:
    """A full hybrid session kept open until the daemon's TICKET record arrives (untimed)."""
    config = HandshakeConfig(allowed_suites=(SUITES["hybrid"],))
    session = Session(InitiatorHandshake(identity, lambda p: "bob", config=config), now_ms=_monotonic_ms())
    session.start(_monotonic_ms(), _wall_ms())
    with trio.fail_after(TICKET_TIMEOUT_S):
        async with await _connect(port, source) as stream:
            while True:
                await stream.send_all(session.data_to_send())  # HELLO, FINISH, PONG
                data = await stream.receive_some(65536)
                if not data:
                    raise RuntimeError("daemon closed the session before granting a ticket")
                for event in session.receive_data(data, _monotonic_ms(), _wall_ms()):
                    if isinstance(event, TicketGranted):
                        assert session.result is not None
                        return accept_ticket_grant(session.result, event.body, _wall_ms())


def resumed_latency(identity: Identity, port: int, rounds: int) -> tuple[float, float]:
    """p50/p99 of resumptions, each with its own ticket taken beforehand (tickets are single-use)."""
    async def run() -> list[float]:
        tickets = await _paced(rounds, lambda i, source: _obtain_ticket(identity, port, source))
        await trio.sleep(PACE_S)
        return await _timed_rounds(port, rounds, lambda i: ResumeInitiator(identity, tickets[i], lambda p: "bob"))

    return _p50_p99(trio.run(run))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200, help="handshakes per suite (default 200)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        alice_home, alice_fp = init_node(root, "alice")
        bob_home, bob_fp = init_node(root, "bob")
        pq("trust", "alice", alice_fp, home=bob_home)
        (bob_home / "config.toml").write_text('[node]\nsuites = ["hybrid", "pq-strong", "classical"]\n')
        bob = Daemon(bob_home).start()
        alice = load_identity(alice_home)
        rows = []
        try:
            for name in (BASELINE, "hybrid", "pq-strong"):
                suite = SUITES[name]
                p50, p99 = latency(alice, bob.port, suite, args.rounds)
                cpu_i, cpu_r, sizes = cpu_per_side(suite, max(20, args.rounds // 4))
                rows.append((name, suite, p50, p99, cpu_i, cpu_r, sizes))
            resumed_p50, resumed_p99 = resumed_latency(alice, bob.port, args.rounds)
        finally:
            bob.stop()
    base = rows[0]
    print(f"\nHandshake over loopback TCP to a real daemon, {args.rounds} rounds per row; "
          f"baseline = {BASELINE} full handshake (same run)\n")
    header = f"{'suite':<10} {'KEM':<20} {'signatures':<18} {'p50 ms':>7} {'p99 ms':>7} {'x base':>6} " \
             f"{'CPU I ms':>8} {'CPU R ms':>8} {'HELLO':>6} {'RESP':>6} {'FINISH':>6} {'total B':>8}"
    print(header)
    print("-" * len(header))
    for name, suite, p50, p99, cpu_i, cpu_r, sizes in rows:
        print(f"{name:<10} {suite.kem_label:<20} {suite.signature_label:<18} {p50:7.2f} {p99:7.2f} "
              f"{p50 / base[2]:6.1f} {cpu_i:8.2f} {cpu_r:8.2f} {sizes[0]:6d} {sizes[1]:6d} {sizes[2]:6d} {sum(sizes):8d}")
    cpu_i, cpu_r, sizes = cpu_resumed(max(20, args.rounds // 4))
    print(f"{'resumed':<10} {'X25519 + hybrid PSK':<20} {'(MAC)':<18} {resumed_p50:7.2f} {resumed_p99:7.2f} "
          f"{resumed_p50 / base[2]:6.2f} {cpu_i:8.2f} {cpu_r:8.2f} {sizes[0]:6d} {sizes[1]:6d} {'-':>6} "
          f"{sum(sizes):8d}")
    print("\nresumed: 1-RTT resumption (docs/PROTOCOL.md 4.10) with a ticket the daemon granted in a full hybrid\n"
          "session (one per round, taken beforehand, untimed). Latency: connect + RESUME_HELLO until the daemon's\n"
          "first record after RESUME_ACCEPT; the daemon (no [ha]) answers after checking the ticket and recording\n"
          "its single use in its memory (replicas: in their shared store). CPU columns: in process, no I/O.")


def cpu_resumed(rounds: int) -> tuple[float, float, list[int]]:
    """Median CPU milliseconds per resumed handshake for each role, in process, no I/O."""
    alice, bob = Identity.generate("alice"), Identity.generate("bob")
    now = int(time.time() * 1000)
    full_i = InitiatorHandshake(alice, lambda p: "bob")
    full_r = ResponderHandshake(bob, lambda p: "alice", peer_address="127.0.0.1")
    decoder = FrameDecoder()
    response = full_r.receive(decoder.feed(full_i.start(now))[0], now).to_send
    step = full_i.receive(decoder.feed(response)[0], now)
    at_bob = full_r.receive(decoder.feed(step.to_send)[0], now).result
    assert step.result is not None and at_bob is not None
    initiator_cpu, responder_cpu, sizes = [], [], []
    for _ in range(rounds):
        state, grant = issue_ticket(at_bob, now)
        ticket = accept_ticket_grant(step.result, grant, now)
        initiator = ResumeInitiator(alice, ticket, lambda p: "bob")
        responder = ResumeResponder(bob, state, lambda p: "alice")
        t0 = time.process_time()
        hello = initiator.start(now)
        t1 = time.process_time()
        accept = responder.receive(decoder.feed(hello)[0], now).to_send
        t2 = time.process_time()
        initiator.receive(decoder.feed(accept)[0], now)
        t3 = time.process_time()
        initiator_cpu.append((t1 - t0 + t3 - t2) * 1000)
        responder_cpu.append((t2 - t1) * 1000)
        sizes = [len(hello), len(accept)]
    return statistics.median(initiator_cpu), statistics.median(responder_cpu), sizes


if __name__ == "__main__":
    main()
