"""Copy bytes both ways between two streams, honouring half-close in each direction."""

from __future__ import annotations

from typing import Any, Protocol

import trio

from pqtunnel.errors import PqtunnelError

CHUNK = 128 * 1024  # two 64 KiB mux frames: bounds what each stream holds while the session is busy
EXPECTED_ERRORS = (PqtunnelError, trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class Readable(Protocol):
    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray: ...


class Writable(Protocol):
    async def send_all(self, data: bytes | bytearray | memoryview) -> None: ...


class Duplex:
    """A receive side and a send side (e.g. a process's stdout and stdin) as one stream."""

    def __init__(self, receive: Any, send: Any) -> None:
        self._receive, self._send = receive, send

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._receive.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._send.send_all(data)

    async def send_eof(self) -> None:
        await self._send.aclose()


async def half_close(stream: Any) -> None:
    """send_eof where the stream has it (TCP, tunnel streams), else close it."""
    try:
        if hasattr(stream, "send_eof"):
            await stream.send_eof()
        else:
            await stream.aclose()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


async def pump(source: Readable, sink: Writable) -> int:
    """Copy until EOF, then half-close the sink; returns the number of bytes copied."""
    copied = 0
    while True:
        data = await source.receive_some(CHUNK)
        if not data:
            break
        await sink.send_all(data)
        copied += len(data)
    await half_close(sink)
    return copied


async def bridge(a: Any, b: Any) -> tuple[int, int]:
    """Splice ``a`` and ``b`` until both directions end.

    Returns (bytes a->b, bytes b->a). If either direction fails, or a side that can be
    aborted (a tunnel stream that is reset) is aborted, everything stops and the first error
    is raised as itself (not wrapped in an exception group), so callers log one reason.
    """
    counts = [0, 0]
    errors: list[BaseException] = []

    async with trio.open_nursery() as nursery:
        def abort(error: BaseException) -> None:
            errors.append(error)
            nursery.cancel_scope.cancel()

        async def forward(index: int, source: Any, sink: Any) -> None:
            try:
                counts[index] = await pump(source, sink)
            except EXPECTED_ERRORS as exc:
                abort(exc)

        for side in (a, b):
            if hasattr(side, "on_abort"):
                side.on_abort(abort)
        nursery.start_soon(forward, 1, b, a)
        await forward(0, a, b)  # one direction in this task: one task fewer per stream
    if errors:
        raise errors[0]
    return counts[0], counts[1]


async def wait_for_hangup(sock: Any, interval: float = 0.2) -> None:
    """Return once the peer of a unix socket has gone away completely (POLLHUP).

    A plain EOF cannot tell "the client half-closed and waits for the answer" from "the
    client died"; on a unix socket POLLHUP is set only in the second case.
    """
    import select

    poller = select.poll()
    poller.register(sock.fileno(), select.POLLHUP)
    while not any(mask & select.POLLHUP for _, mask in poller.poll(0)):
        await trio.sleep(interval)
