"""A stand-in replica as a process: take counters from a lease on a real store, print them.

Tests run two of these against one key (one SQLite file or one etcd cluster), freeze one
with SIGSTOP while the other takes over, and check that the counters they printed never
overlap. Each output line is JSON: ``{"used": [first, last]}`` for a run of consecutive
counters, then ``{"done": true, "leaked": [[start, end], ...]}``.

    python -m pqlab.leaseworker --store local --path F --key K --count N [--takeover] ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import trio

from pqtunnel.errors import LeaseStoppedError
from pqtunnel.leases import CounterLease
from pqtunnel.stores import StoreCodec
from pqtunneld.leasekeeper import LeaseKeeper, takeover_lease
from pqtunneld.noncestore import open_nonce_store

NAMESPACE = "pqlab"
SECRET = bytes(range(32))
"""The lab's fixed store key: lab processes play replicas of one node."""


def lab_codec(namespace: str = NAMESPACE) -> StoreCodec:
    return StoreCodec(namespace, SECRET)


class Runs:
    """Consecutive counters printed as one ``used`` line (at a gap, every ``every``, at the end)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.first: int | None = None
        self.last = -1

    def add(self, counter: int) -> None:
        if self.first is not None and (counter != self.last + 1 or self.last - self.first + 1 >= self.every):
            self.flush()
        if self.first is None:
            self.first = counter
        self.last = counter

    def flush(self) -> None:
        if self.first is not None:
            emit({"used": [self.first, self.last]})
            self.first = None


def emit(line: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


async def work(args: argparse.Namespace) -> None:
    store = open_nonce_store(args.store, codec=lab_codec(args.namespace), path=Path(args.path) if args.path else None,
                             etcd=tuple(args.etcd or ()))
    options = {"block_size": args.block, "low_water": args.block // 4}
    lease = (await takeover_lease(store, args.key, **options)) if args.takeover else CounterLease.fresh(args.key, **options)
    keeper = LeaseKeeper(lease, store)
    runs = Runs(args.every)
    async with trio.open_nursery() as nursery:
        await nursery.start(keeper.run)
        try:
            for index in range(args.count):
                runs.add(await keeper.next_counter())
                if args.pause and index % args.every == args.every - 1:
                    runs.flush()
                    await trio.sleep(args.pause)
        except LeaseStoppedError as exc:
            runs.flush()
            emit({"stopped": str(exc)})
        runs.flush()
        nursery.cancel_scope.cancel()
    emit({"done": True, "leaked": [[b.start, b.end] for b in lease.leaked], "unanswered": keeper.unanswered})
    await store.aclose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pqlab.leaseworker", description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=("local", "etcd"), required=True)
    parser.add_argument("--path", help="SQLite file (local)")
    parser.add_argument("--etcd", action="append", help="etcd client URL (repeatable)")
    parser.add_argument("--namespace", default=NAMESPACE)
    parser.add_argument("--key", required=True, help="counter key id")
    parser.add_argument("--takeover", action="store_true", help="continue from the stored mark instead of creating it")
    parser.add_argument("--count", type=int, required=True, help="counters to use")
    parser.add_argument("--block", type=int, default=64, help="counters per reservation")
    parser.add_argument("--every", type=int, default=16, help="print (and pause) after this many counters")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds to sleep after each --every counters")
    trio.run(work, parser.parse_args(argv))


if __name__ == "__main__":
    main()
