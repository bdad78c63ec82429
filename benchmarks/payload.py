"""Benchmark payload: deterministic bytes, so a client can verify any body on its own.

Clients check bodies without talking to the server process (the server may
sit behind a remote daemon): every resource the benchmark HTTP server
(``httpserver.py``) returns is a prefix of the same pattern, so verifying a
body needs only its length (``expected_body``).  Standard library only.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

MIB = 1 << 20

_PATTERN_SEED = 0x5051_7475
# Odd length: the repetition never lines up with MiB or page boundaries, so a
# tunnel that drops, duplicates or swaps whole chunks still fails the check.
_BLOCK_LEN = MIB + 4093


@functools.cache
def _pattern_block() -> bytes:
    """Random (incompressible) block the payload repeats; generated once."""
    return random.Random(_PATTERN_SEED).randbytes(_BLOCK_LEN)


def expected_body(n: int) -> bytes:
    """The exact bytes the benchmark server returns for a body of length n.

    Every resource is a prefix of the same pattern, so verifying a body needs
    only its length.  Meant for small-to-medium n (it materialises the body).
    """
    block = _pattern_block()
    if n <= _BLOCK_LEN:
        return block[:n]
    return (block * (n // _BLOCK_LEN + 1))[:n]


def write_pattern_file(path: Path, size: int) -> None:
    """Write the first ``size`` pattern bytes to ``path`` in block-sized chunks."""
    block = _pattern_block()
    with open(path, "wb") as f:
        left = size
        while left > 0:
            chunk = block[: min(left, _BLOCK_LEN)]
            f.write(chunk)
            left -= len(chunk)
