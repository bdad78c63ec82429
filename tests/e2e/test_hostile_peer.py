"""An authenticated but hostile peer, built from the library itself, cannot hurt the daemon.

It speaks the real protocol (it is pinned, so it gets a session) and then misbehaves at the
stream layer. After each trick the daemon must still serve an honest peer, and no process
it started may be left behind.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import trio

from pqtunnel import mux
from pqtunnel.handshake import InitiatorHandshake
from pqtunnel.records import ContentType
from pqtunnel.session import Established, Session
from tests.nodes import hostile_lab, pq


@pytest.fixture
def bob(tmp_path: Path) -> Iterator[dict]:
    with hostile_lab(tmp_path, f'[services]\nhang = {{ exec = ["{sys.executable}", "-c", "import time; time.sleep(600)"] }}\n') as lab:
        yield lab


async def hostile_session(port: int, identity, records: list[tuple[ContentType, bytes]]) -> None:  # type: ignore[no-untyped-def]
    """Handshake for real, then send ``records`` verbatim and linger briefly."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    session = Session(InitiatorHandshake(identity, lambda peer: "bob"), now_ms=int(time.time() * 1000))
    session.start(int(time.time() * 1000))
    async with stream:
        await stream.send_all(session.data_to_send())
        while True:
            data = await stream.receive_some(65536)
            assert data, "bob closed the connection during the handshake"
            events = session.receive_data(data, int(time.time() * 1000))
            await stream.send_all(session.data_to_send())
            if any(isinstance(e, Established) for e in events):
                break
        assert session.records is not None
        for content_type, payload in records:
            await stream.send_all(session.records.seal(content_type, payload))
        with trio.move_on_after(1):
            while await stream.receive_some(65536):
                pass


def open_then_reset(target: dict) -> bytes:
    frames = mux.Multiplexer(is_initiator=True)
    stream_id = frames.open_stream(target)
    frames.reset_stream(stream_id, mux.ErrorCode.CANCELLED, "changed my mind")
    return frames.data_to_send()


def hang_pids() -> set[int]:
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"time.sleep(600)" in (proc / "cmdline").read_bytes():
                    pids.add(int(proc.name))
            except OSError:
                pass
    return pids


def test_open_and_reset_in_one_record_neither_crashes_nor_leaks(bob: dict) -> None:
    before = hang_pids()
    tricks = [(ContentType.DATA, open_then_reset({"port": 9})),          # refused target, already reset
              (ContentType.DATA, open_then_reset({"service": "hang"})),  # exec target, reset at once
              (ContentType.DATA, open_then_reset({"service": "nope"}))]
    trio.run(hostile_session, bob["daemon"].port, bob["mallory"], tricks)
    assert pq("ping", "bob", home=bob["alice_home"]).returncode == 0  # bob still serves alice
    deadline = time.monotonic() + 10
    while hang_pids() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not hang_pids() - before, "an exec process outlived its stream"
    assert bob["daemon"].process.poll() is None
    assert "Traceback" not in bob["daemon"].logs()


def test_a_ping_that_could_amplify_closes_only_that_session(bob: dict) -> None:
    trio.run(hostile_session, bob["daemon"].port, bob["mallory"], [(ContentType.PING, b"x" * 200_000)])
    bob["daemon"].wait_for_log("PING has the wrong size")
    assert pq("ping", "bob", home=bob["alice_home"]).returncode == 0


def test_a_bad_control_request_answers_only_that_client(bob: dict) -> None:
    result = pq("ping", "alice", "--timeout", "-1", home=bob["daemon"].home)
    assert result.returncode == 1 and "timeout must be" in result.stderr
    assert bob["daemon"].status()["name"] == "bob"
