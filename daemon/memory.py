"""Give freed memory back to the operating system after a peer leaves.

CPython frees buffers to the C allocator, which keeps the pages for reuse: after a peer
filled its stream windows and left, the daemon's RSS stayed at its peak. glibc's
``malloc_trim`` returns the free pages at the top and in the middle of the heap. Elsewhere
(no glibc) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import trio

TRIM_DELAY_SECONDS = 1.0
"""Stream handlers let go of a dead session's buffers shortly after it ends."""


def _load_trim():  # type: ignore[no-untyped-def]
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc.malloc_trim if libc is not None else None
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_trim()


def release_free_memory() -> bool:
    """Return free heap pages to the OS; True if the allocator could do it."""
    return bool(_MALLOC_TRIM is not None and _MALLOC_TRIM(0))


async def release_after_session() -> None:
    """Wait for the session's stream handlers to drop their buffers, then trim."""
    await trio.sleep(TRIM_DELAY_SECONDS)
    release_free_memory()
