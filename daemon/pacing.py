"""A listener that takes new connections from the kernel no faster than admission allows.

Every connection the node accepts costs it something before it knows anything (accept,
a task, reading and parsing a HELLO, an answer, a close); a flood of them, each answered
in microseconds, could take the CPU that established sessions need. Connections that are
not accepted yet wait in the kernel's listen queue and cost the node nothing, so pacing
``accept()`` bounds what a flood can make the node do per second, whatever it sends.
Established sessions are never paced. The rate is ``pqtunnel.admission``'s.
"""

from __future__ import annotations

from typing import Callable

import trio


class PacedListener(trio.abc.Listener[trio.SocketStream]):
    """Wraps a socket listener; ``delay_ms()`` says how long to leave the next connection queued."""

    def __init__(self, inner: trio.SocketListener, delay_ms: Callable[[], int]) -> None:
        self.inner = inner
        self.socket = inner.socket
        self._delay_ms = delay_ms

    async def accept(self) -> trio.SocketStream:
        while (delay := self._delay_ms()) > 0:
            await trio.sleep(delay / 1000)
        return await self.inner.accept()

    async def aclose(self) -> None:
        await self.inner.aclose()
