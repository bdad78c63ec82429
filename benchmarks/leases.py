"""Counter-lease reservations per second: the local (SQLite) store against a real etcd cluster.

Run: ``.venv/bin/python benchmarks/leases.py [--seconds S]``. Each row runs compare-and-swap
reservations (exactly what a replica does before sealing with a new block of counters)
back to back for S seconds: one reserver, then two reservers on the same key (two store
clients racing, as two replicas do; a lost race is retried from the stored mark and is not
counted as granted), and two reservers on a key each (two sessions). ``local`` is a SQLite file on this machine's disk (WAL, synchronous=FULL:
every reservation is fsync'd); ``etcd`` is a fresh 3-member cluster on loopback (one Raft
commit per reservation). The lab notes measured 200-400 etcd reservations/s; that figure
is printed as the reference row.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pqlab.etcd import EtcdCluster  # noqa: E402
from pqlab.leaseworker import lab_codec  # noqa: E402
from pqtunnel.leases import Granted, MarkMoved  # noqa: E402
from pqtunnel.stores import NonceStore  # noqa: E402
from pqtunneld.etcd import EtcdGateway  # noqa: E402
from pqtunneld.noncestore import EtcdNonceStore, SqliteNonceStore  # noqa: E402
from report import Row, print_table  # noqa: E402

BLOCK = 1 << 16
LAB_NOTES = (200, 400)


async def reserver(store: NonceStore, key: str, until: float, latencies: list[float], lost: list[int],
                   blocks: list[tuple[str, int]]) -> None:
    """Reserve blocks back to back until ``until`` (monotonic), retrying lost races from the stored mark."""
    mark = await store.read_mark(key)
    while time.monotonic() < until:
        start = time.perf_counter()
        result = await store.reserve(key, mark, (mark or 0) + BLOCK)
        latencies.append((time.perf_counter() - start) * 1000)
        if isinstance(result, Granted):
            blocks.append((key, mark or 0))
            mark = (mark or 0) + BLOCK
        elif isinstance(result, MarkMoved):
            mark = result.current
            lost.append(1)
        else:
            raise RuntimeError(f"reservation of {key} answered {result!r}")


async def measure(name: str, clients: list[NonceStore], seconds: float, *, same_key: bool = True) -> Row:
    """Every client reserves for ``seconds``: on one key (replicas racing) or one key each (sessions)."""
    key = f"bench-{time.monotonic_ns()}"
    latencies: list[float] = []
    lost: list[int] = []
    blocks: list[tuple[str, int]] = []
    until = time.monotonic() + seconds
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for index, client in enumerate(clients):
            nursery.start_soon(reserver, client, key if same_key else f"{key}-{index}", until, latencies, lost, blocks)
    elapsed = time.monotonic() - started
    granted = len(latencies) - len(lost)
    if len(set(blocks)) != len(blocks):
        raise RuntimeError(f"{name}: a block was granted twice")  # never: this is what the store is for
    for client in clients:
        await client.aclose()
    latencies.sort()
    return Row(name, {"granted/s": granted / elapsed, "p50 ms": statistics.median(latencies),
                      "p99 ms": latencies[int(len(latencies) * 0.99) - 1]},
               note=f"{granted} granted, {len(lost)} lost races retried, no block granted twice, {elapsed:.1f} s")


async def run(seconds: float, directory: Path, endpoints: list[str]) -> list[Row]:
    codec = lab_codec("bench")
    path = directory / "nonces.sqlite"
    rows = [
        await measure("local, 1 reserver", [SqliteNonceStore(path, codec)], seconds),
        await measure("local, 2 reservers, 1 key", [SqliteNonceStore(path, codec) for _ in range(2)], seconds),
        await measure("local, 2 reservers, 2 keys", [SqliteNonceStore(path, codec) for _ in range(2)], seconds,
                      same_key=False),
    ]
    for title, count, same_key in (("1 reserver", 1, True), ("2 reservers, 1 key", 2, True),
                                   ("2 reservers, 2 keys", 2, False)):
        clients: list[NonceStore] = [EtcdNonceStore(EtcdGateway(tuple(endpoints)), codec) for _ in range(count)]
        rows.append(await measure(f"etcd 3 members, {title}", clients, seconds, same_key=same_key))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per row (default 3)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pqbench-leases-") as directory, EtcdCluster() as cluster:
        rows = trio.run(run, args.seconds, Path(directory), cluster.endpoints)
    rows.append(Row("lab notes: etcd CAS (reference)", {"granted/s": sum(LAB_NOTES) / 2},
                    note=f"{LAB_NOTES[0]}-{LAB_NOTES[1]} reservations/s with etcd-server 3.4 (midpoint shown)"))
    print(f"reservations of {BLOCK}-counter blocks, {args.seconds:g} s per row")
    print_table(rows, rows[0].name)


if __name__ == "__main__":
    main()
