"""Connecting a service stream (daemon/netio.py ``connect_stream``): real sockets on loopback."""

from __future__ import annotations

import errno
import os
import socket

import pytest
import trio

from pqtunneld.netio import connect_stream


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_local_listener_is_connected_and_carries_bytes() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        stream = await connect_stream(socket.AF_INET, listener.getsockname())
        peer, _ = listener.accept()
        with peer:
            async with stream:
                await stream.send_all(b"ping")
                assert peer.recv(4) == b"ping"
                assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


async def test_a_closed_port_is_refused_with_the_kernels_reason_and_no_descriptor_left() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = probe.getsockname()  # bound, never listening: connections are refused
        before = open_descriptors()
        with pytest.raises(OSError) as refused:
            await connect_stream(socket.AF_INET, address)
        assert open_descriptors() == before
    assert refused.value.errno == errno.ECONNREFUSED and refused.value.strerror == os.strerror(errno.ECONNREFUSED)


async def test_a_connect_that_has_to_wait_can_be_cancelled_without_leaking_its_socket() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # never accepted: once its queue is full the kernel drops new SYNs
        fillers = [socket.socket() for _ in range(4)]
        for filler in fillers:
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
        try:
            before = open_descriptors()
            with trio.move_on_after(0.3) as scope:
                await connect_stream(socket.AF_INET, listener.getsockname())
            assert scope.cancelled_caught
            assert open_descriptors() == before
        finally:
            for filler in fillers:
                filler.close()
