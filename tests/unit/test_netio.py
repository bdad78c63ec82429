"""DirectStream: trio's stream interface over a local TCP socket, without a scheduler pass
after every read and write the socket answers at once (daemon/netio.py)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from pqtunneld.netio import DirectStream


@pytest.fixture
async def pair() -> AsyncIterator[tuple[DirectStream, trio.SocketStream]]:
    """A DirectStream and the trio stream at the other end of a real loopback TCP connection."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listener.accept()
    await listener.aclose()
    yield DirectStream(client), server
    await client.aclose()
    await server.aclose()


async def test_reads_what_is_ready_and_waits_for_what_is_not(pair) -> None:
    direct, other = pair
    await other.send_all(b"ready")
    await trio.testing.wait_all_tasks_blocked()
    assert await direct.receive_some(100) == b"ready"
    async with trio.open_nursery() as nursery:
        async def later() -> None:
            await trio.sleep(0.05)
            await other.send_all(b"later")
        nursery.start_soon(later)
        assert await direct.receive_some() == b"later"


async def test_sends_more_than_the_socket_buffers_while_the_peer_reads_slowly(pair) -> None:
    direct, other = pair
    data = bytes(range(256)) * (16 * 1024)  # 4 MiB: the send must wait for room several times
    received = bytearray()
    async with trio.open_nursery() as nursery:
        async def read_slowly() -> None:
            while len(received) < len(data):
                received.extend(await other.receive_some(65536))
                await trio.sleep(0.001)
        nursery.start_soon(read_slowly)
        await direct.send_all(data)
    assert received == data


async def test_eof_and_half_close_work_as_on_a_trio_stream(pair) -> None:
    direct, other = pair
    await other.send_eof()
    assert await direct.receive_some() == b""
    await direct.send_eof()
    assert await other.receive_some() == b""


async def test_a_reset_connection_is_a_broken_resource_with_the_os_reason(pair) -> None:
    direct, other = pair
    other.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    await other.aclose()  # linger 0: RST
    with pytest.raises(trio.BrokenResourceError) as caught:
        await direct.receive_some()
    assert isinstance(caught.value.__cause__, ConnectionResetError)


async def test_using_it_after_close_is_a_closed_resource(pair) -> None:
    direct, _ = pair
    await direct.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await direct.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        await direct.send_all(b"x")


async def test_small_ready_reads_do_not_pass_through_the_scheduler(pair) -> None:
    """The point of DirectStream: a read the socket answers at once lets no other task run."""
    direct, other = pair
    await other.send_all(b"a" * 100)
    await trio.testing.wait_all_tasks_blocked()
    ran = 0

    async def other_task() -> None:
        nonlocal ran
        while True:
            ran += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        await trio.lowlevel.checkpoint()
        before = ran
        for _ in range(10):
            assert await direct.receive_some(10) == b"a" * 10
        await direct.send_all(b"reply")
        assert ran == before
        nursery.cancel_scope.cancel()
    assert await other.receive_some() == b"reply"
