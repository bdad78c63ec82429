"""Accept loops that survive running out of descriptors, and descriptors kept for the owner.

When every descriptor is in use, ``accept()`` fails with EMFILE (or ENFILE, system-wide).
The connection stays queued in the kernel, so the right answer is to wait and retry, not
to stop: trio's ``serve_listeners`` retries but logs a traceback every 0.1 s, and a bare
``accept()`` loop dies, taking the daemon with it. ``serve_listeners`` here backs off
(50 ms doubling to 1 s) and says so in one line at most every few seconds.

The control socket also gets a ``DescriptorReserve``: a few descriptors opened at start
and given up one at a time when accept fails for lack of descriptors, so the node's owner
can still run ``pqtunnel status`` (or ``connect``) while strangers or peers hold every other
descriptor (the spare-descriptor trick of libev and nginx). The reserve is refilled as soon
as descriptors free up.
"""

from __future__ import annotations

import errno
import os
from typing import Any, Awaitable, Callable, Sequence

import trio

from pqtunnel.limits import Throttle

from .logs import LOG
from .netio import monotonic_ms

CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
"""accept() failures that mean "no resources right now": retry later, never stop."""
BACKOFF_START = 0.05
BACKOFF_MAX = 1.0
REPORT_INTERVAL_MS = 5_000
RESERVE_SIZE = 4
"""Descriptors kept for the control socket: enough for a few owner commands at once."""

Handler = Callable[[trio.SocketStream], Awaitable[None]]


class DescriptorReserve:
    """Descriptors held back (``/dev/null``, opened close-on-exec) for when there are none left."""

    def __init__(self, size: int = RESERVE_SIZE) -> None:
        self.size = size
        self._fds: list[int] = []
        self.refill()

    def __len__(self) -> int:
        return len(self._fds)

    def refill(self) -> None:
        """Take back descriptors up to ``size``; quietly stops while there are none to take."""
        while len(self._fds) < self.size:
            try:
                self._fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                return

    def spend(self) -> bool:
        """Free one reserved descriptor for the caller's next accept; False if none is left."""
        if not self._fds:
            return False
        os.close(self._fds.pop())
        return True

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.pop())


async def serve_listeners(handler: Handler, listeners: Sequence[trio.SocketListener], *, name: str,
                          reserve: DescriptorReserve | None = None,
                          task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Accept on every listener forever, one task per connection, surviving EMFILE/ENFILE."""
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept_loop, listener, handler, nursery, name, reserve)
        task_status.started()


async def _accept_loop(listener: trio.SocketListener, handler: Handler, nursery: trio.Nursery, name: str,
                       reserve: DescriptorReserve | None) -> None:
    delay = BACKOFF_START
    throttle = Throttle(REPORT_INTERVAL_MS)
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in CAPACITY_ERRNOS:
                raise
            if reserve is not None and reserve.spend():
                continue  # the freed descriptor takes the waiting connection at once (no refill in between)
            _report(throttle, name, exc, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)
            continue
        delay = BACKOFF_START
        if reserve is not None:
            reserve.refill()  # only after an accept: refilling before one would take back what spend freed
        nursery.start_soon(_serve, handler, stream, reserve)


async def _serve(handler: Handler, stream: trio.SocketStream, reserve: DescriptorReserve | None) -> None:
    try:
        await handler(stream)
    finally:
        if reserve is not None:
            reserve.refill()


def _report(throttle: Throttle, name: str, exc: OSError, delay: float) -> None:
    held_back = throttle.allow(monotonic_ms())
    if held_back is None:
        return
    more = f" ({held_back} more since the last report)" if held_back else ""
    LOG.warning("%s: cannot accept connections: %s%s; retrying in %.2f s",
                name, exc.strerror or errno.errorcode.get(exc.errno or 0, exc), more, delay)
