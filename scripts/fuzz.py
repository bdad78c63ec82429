"""Fuzz every parser that reads bytes or text an attacker (or a careless user) controls.

    python scripts/fuzz.py                      # every target, 10 s each, coverage-guided if atheris is installed
    python scripts/fuzz.py --seconds 600 mux    # one target, longer
    python scripts/fuzz.py --runs 1000000       # a fixed number of inputs per target
    python scripts/fuzz.py --list

Each target feeds one input to one parser and accepts only the parser's documented way of
refusing input (the peer's ``ProtocolError`` for wire data, ``UserError`` for files); any
other exception is a crash: the script prints the input (hex) and exits 1. With atheris
installed (``pip install atheris``) inputs are coverage-guided; without it, a seeded
mutation loop over valid seed inputs runs, which is what CI's short pass uses
(``tests/unit/test_fuzz.py``). Results of long runs are recorded in docs/security.md.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgpack  # noqa: E402

from pqtunnel import discovery, mux, socks  # noqa: E402
from pqtunnel.ca import decode_certificate  # noqa: E402
from pqtunnel.crypto.suites import HYBRID, Aead  # noqa: E402
from pqtunnel.errors import ProtocolError, UserError  # noqa: E402
from pqtunnel.handshake import InitiatorHandshake, ResponderHandshake  # noqa: E402
from pqtunnel.identity import Identity, WireIdentity  # noqa: E402
from pqtunnel.records import ContentType, RecordLayer  # noqa: E402
from pqtunnel.wire import Frame, FrameDecoder, Kind  # noqa: E402


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], None]
    seeds: tuple[bytes, ...]


# --- shared fixtures (built once) ------------------------------------------------------------------

_ALICE = Identity.generate("alice")
_BOB = Identity.generate("bob")
_SESSION_ID = bytes(8)
_KEY = bytes(range(32))


def _accept(_peer: WireIdentity) -> str:
    return "alice"


def _hello() -> bytes:
    return InitiatorHandshake(_ALICE, lambda peer: "bob").start(1_800_000_000_000)


def _body(frame: bytes) -> bytes:
    return frame[5:]


# --- targets ------------------------------------------------------------------------------------------


def fuzz_frames(data: bytes) -> None:
    try:
        FrameDecoder().feed(data)
    except ProtocolError:
        pass


def fuzz_hello(data: bytes) -> None:
    responder = ResponderHandshake(_BOB, _accept, peer_address="192.0.2.1")
    try:
        responder.receive(Frame(Kind.HELLO, data), 1_800_000_000_000)
    except ProtocolError:
        pass


def fuzz_response(data: bytes) -> None:
    initiator = InitiatorHandshake(_ALICE, lambda peer: "bob")
    initiator.start(1_800_000_000_000)
    kind = Kind.RETRY if data[:1] == b"\x04" else Kind.RESPONSE
    try:
        initiator.receive(Frame(kind, data[1:]), 1_800_000_000_000)
    except ProtocolError:
        pass


def fuzz_records(data: bytes) -> None:
    layer = RecordLayer(Aead.CHACHA20_POLY1305, _KEY, _KEY, _SESSION_ID)
    try:
        layer.open(data)
    except ProtocolError:
        pass


def fuzz_mux(data: bytes) -> None:
    multiplexer = mux.Multiplexer(is_initiator=False, initial_window=1024, max_streams=4)
    for event in multiplexer.receive_data(data):
        if isinstance(event, mux.StreamOpenRequested):
            try:
                multiplexer.accept_stream(event.stream_id)
            except mux.MuxError:
                pass  # reset later in the same record: the application learns it from the events
    multiplexer.receive_data(data)
    multiplexer.data_to_send()


def fuzz_socks(data: bytes) -> None:
    server = socks.Socks5Server(require_auth=bool(data[:1]) and data[0] & 1 == 1)
    for event in server.receive_data(data[1:]):
        if isinstance(event, socks.AuthRequested):
            server.accept_credentials(True)
        elif isinstance(event, socks.ConnectRequested):
            try:
                socks.target_for_request(event)
            except ProtocolError:
                pass
    server.data_to_send()


def fuzz_certificate(data: bytes) -> None:
    try:
        decode_certificate(data)
    except ProtocolError:
        pass


def fuzz_wire_identity(data: bytes) -> None:
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception:
        return  # not msgpack: the handshake refuses it before this point
    try:
        WireIdentity.from_wire(value, HYBRID)
    except ProtocolError:
        pass


def fuzz_mdns_txt(data: bytes) -> None:
    properties: dict[bytes, bytes | None] = {}
    for entry in data.split(b"\x00")[:16]:
        key, _, value = entry.partition(b"=")
        properties[key] = value if b"=" in entry else None
    try:
        discovery.parse_advertisement("bob._pqtunnel._tcp.local.", properties, [b"\x7f\x00\x00\x01"], 7330)
    except ProtocolError:
        pass


def fuzz_known_peers(data: bytes) -> None:
    from pqtunneld.stores import parse_known_peers

    try:
        parse_known_peers(data.decode("utf-8", "surrogateescape"), Path("known_peers"))
    except UserError:
        pass


def fuzz_config(data: bytes) -> None:
    from pqtunneld.config import load_config

    with tempfile.TemporaryDirectory() as home:
        path = Path(home) / "config.toml"
        path.write_bytes(data)
        path.chmod(0o600)
        try:
            load_config(Path(home), path)
        except UserError:
            pass


def _record_seed() -> bytes:
    layer = RecordLayer(Aead.CHACHA20_POLY1305, _KEY, _KEY, _SESSION_ID)
    return _body(layer.seal(ContentType.DATA, b"hello"))


TARGETS = {
    t.name: t
    for t in [
        Target("frames", fuzz_frames, (_hello(), b"\x00\x00\x00\x05\x10abcd")),
        Target("hello", fuzz_hello, (_body(_hello()),)),
        Target("response", fuzz_response, (b"\x02" + bytes(2400), b"\x04" + msgpack.packb({"suite": 2, "cookie": bytes(24)}))),
        Target("records", fuzz_records, (_record_seed(),)),
        Target("mux", fuzz_mux, (mux.encode_frame(mux.FrameType.OPEN, 1, msgpack.packb({"service": "web"}))
                                 + mux.encode_frame(mux.FrameType.DATA, 1, b"hi"),)),
        Target("socks", fuzz_socks, (b"\x00\x05\x01\x00\x05\x01\x00\x03\x0aweb.bob.pq\x00\x50",
                                     b"\x01\x05\x01\x02\x01\x04user\x04pass\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50")),
        Target("certificate", fuzz_certificate, (msgpack.packb({"v": 1, "body": b"", "sig": {}}),)),
        Target("wire_identity", fuzz_wire_identity, (msgpack.packb(_ALICE.public.to_wire(HYBRID)),)),
        Target("mdns_txt", fuzz_mdns_txt, (b"name=bob\x00fp=pq1:abc\x00v=1",)),
        Target("known_peers", fuzz_known_peers, (b"bob pq1:" + b"a" * 52 + b"\n# comment\n",)),
        Target("config", fuzz_config, (b'[node]\nlisten = "127.0.0.1:7330"\n[services]\nweb = "127.0.0.1:8080"\n',)),
    ]
}


class Crash(Exception):
    def __init__(self, target: str, data: bytes, error: BaseException) -> None:
        super().__init__(f"{target}: {type(error).__name__}: {error} on input {data.hex()}")
        self.data = data


def _mutate(rng: random.Random, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(rng.randint(1, 8)):
        choice = rng.random()
        if choice < 0.3 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif choice < 0.5:
            data.insert(rng.randrange(len(data) + 1), rng.randrange(256))
        elif choice < 0.7 and data:
            del data[rng.randrange(len(data))]
        elif choice < 0.8:
            cut = rng.randrange(len(data) + 1)
            data = data[:cut]
        elif choice < 0.9 and data:
            start = rng.randrange(len(data))
            data[start:start] = data[start : start + rng.randint(1, 64)]
        else:
            data += rng.randbytes(rng.randint(1, 32))
    return bytes(data)


def inputs(target: Target, rng: random.Random) -> Iterator[bytes]:
    """Seeds, then mutations of seeds, with plain random bytes mixed in."""
    yield from target.seeds
    while True:
        if rng.random() < 0.1:
            yield rng.randbytes(rng.randint(0, 256))
        else:
            yield _mutate(rng, rng.choice(target.seeds))


def check(target: Target, data: bytes) -> None:
    """Run one input; anything escaping the target (which catches its documented refusal) is a crash."""
    try:
        target.run(data)
    except Exception as exc:
        raise Crash(target.name, data, exc) from exc


def run_mutation(target: Target, *, runs: int | None, seconds: float | None, seed: int = 0) -> int:
    """The fallback fuzzer; returns the number of inputs tried. Raises Crash."""
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds if seconds is not None else None
    count = 0
    for data in inputs(target, rng):
        check(target, data)
        count += 1
        if runs is not None and count >= runs:
            break
        if deadline is not None and count % 64 == 0 and time.monotonic() > deadline:
            break
    return count


def run_atheris(target: Target, *, runs: int | None, seconds: float | None) -> None:
    import atheris

    corpus = Path(tempfile.mkdtemp(prefix=f"fuzz-{target.name}-"))
    for index, seed in enumerate(target.seeds):
        (corpus / f"seed{index}").write_bytes(seed)
    argv = [sys.argv[0], str(corpus), "-print_final_stats=1"]
    if runs is not None:
        argv.append(f"-runs={runs}")
    if seconds is not None:
        argv.append(f"-max_total_time={int(seconds)}")
    atheris.instrument_all()  # coverage of the already imported pqtunnel code guides the inputs
    atheris.Setup(argv, lambda data: check(target, data))
    atheris.Fuzz()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", help="targets to run (default: all)")
    parser.add_argument("--seconds", type=float, default=None, help="time per target (default 10 s unless --runs)")
    parser.add_argument("--runs", type=int, default=None, help="inputs per target")
    parser.add_argument("--no-atheris", action="store_true", help="use the seeded mutation loop even if atheris is installed")
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    args = parser.parse_args()
    if args.list:
        print("\n".join(TARGETS))
        return 0
    unknown = [name for name in args.targets if name not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s): {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    seconds = args.seconds if args.seconds is not None or args.runs is not None else 10.0
    names = args.targets or list(TARGETS)
    if not args.no_atheris and len(names) == 1:
        try:
            import atheris  # noqa: F401
        except ImportError:
            pass
        else:
            run_atheris(TARGETS[names[0]], runs=args.runs, seconds=seconds)
            return 0
    for name in names:
        started = time.monotonic()
        try:
            count = run_mutation(TARGETS[name], runs=args.runs, seconds=seconds)
        except Crash as crash:
            print(f"CRASH {crash}", file=sys.stderr)
            return 1
        print(f"{name:14s} {count:>10d} inputs  {time.monotonic() - started:6.1f} s  0 crashes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
