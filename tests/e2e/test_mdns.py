"""mDNS discovery's zeroconf bridge (``pqtunneld.mdns``): settings, and real mDNS on loopback.

These tests run python-zeroconf on 127.0.0.1 only (never every interface) and wait for
events with generous deadlines instead of sleeping: registration alone takes ~1.7 s.
Node names carry a random suffix, and every wait filters on the expected names, so
other tests advertising on this machine's loopback at the same time cannot confuse them.
The pure parsing and peer-table tests are in test_discovery.py.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import secrets
from collections.abc import Callable

import pytest
import trio
from zeroconf import ServiceInfo, Zeroconf

from pqtunnel.discovery import (
    SERVICE_TYPE,
    LeaveReason,
    PeerAppeared,
    PeerChanged,
    PeerEvent,
    PeerLeft,
    PeerTable,
)
from pqtunnel.errors import ConfigError
from pqtunneld.mdns import DiscoveryError, MdnsDiscovery

LOOPBACK = ["127.0.0.1"]
MDNS_TIMEOUT = 20.0  # registration ~1.7 s, discovery of a new service ~1.1 s later; slack for loaded CI


def random_fingerprint() -> str:
    return "pq1:" + base64.b32encode(os.urandom(20)).decode().lower()


FP_A = random_fingerprint()
FP_B = random_fingerprint()


def test_discovery_refuses_bad_settings() -> None:
    with pytest.raises(DiscoveryError):
        MdnsDiscovery("bob", FP_A, 0)
    with pytest.raises(DiscoveryError):
        MdnsDiscovery("bob", FP_A, 7000, addresses=["nope"])
    with pytest.raises(ConfigError):
        MdnsDiscovery("bob_1", FP_A, 7000)


# --- real mDNS on loopback ------------------------------------------------------------------------------------


def unique(name: str) -> str:
    return f"{name}-{secrets.token_hex(3)}"


class Collector:
    """Keeps every event a node reports, so waits never lose one that arrived earlier."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.events: list[PeerEvent] = []
        self._arrived = trio.Event()

    async def collect(self, receive: trio.MemoryReceiveChannel[PeerEvent]) -> None:
        async for event in receive:
            self.events.append(event)
            self._arrived.set()
            self._arrived = trio.Event()

    async def wait_for(self, predicate: Callable[[PeerEvent], bool], timeout: float = MDNS_TIMEOUT) -> PeerEvent:
        """The first matching event; other nodes' events on the shared loopback are skipped."""
        checked = 0
        with trio.fail_after(timeout):
            while True:
                for event in self.events[checked:]:
                    if predicate(event):
                        return event
                checked = len(self.events)
                await self._arrived.wait()


def start_node(nursery: trio.Nursery, node: MdnsDiscovery) -> Collector:
    """Run ``node`` in ``nursery`` and collect its events."""
    send, receive = trio.open_memory_channel[PeerEvent](1000)
    collector = Collector(node.name)
    nursery.start_soon(node.run, send)
    nursery.start_soon(collector.collect, receive)
    return collector


def about(name: str, kind: type) -> Callable[[PeerEvent], bool]:
    return lambda event: isinstance(event, kind) and event.peer.name == name


async def test_two_nodes_find_each_other_see_a_port_change_and_a_goodbye() -> None:
    alice_name, bob_name = unique("alice"), unique("bob")
    alice = MdnsDiscovery(alice_name, FP_A, 7101, interfaces=LOOPBACK)
    bob = MdnsDiscovery(bob_name, FP_B, 7102, interfaces=LOOPBACK)
    async with trio.open_nursery() as nursery:
        at_alice = start_node(nursery, alice)
        async with trio.open_nursery() as bob_nursery:
            at_bob = start_node(bob_nursery, bob)
            seen_by_alice = await at_alice.wait_for(about(bob_name, PeerAppeared))
            seen_by_bob = await at_bob.wait_for(about(alice_name, PeerAppeared))
            assert seen_by_alice.peer.fingerprint == FP_B and seen_by_alice.peer.port == 7102
            assert seen_by_alice.peer.addresses == ("127.0.0.1",) and seen_by_alice.peer.compatible
            assert seen_by_bob.peer.fingerprint == FP_A and seen_by_bob.peer.port == 7101
            assert alice.instance_name == f"{alice_name}.{SERVICE_TYPE}"

            await bob.update(port=7103)
            changed = await at_alice.wait_for(about(bob_name, PeerChanged))
            assert changed.changes == ("port",) and changed.peer.port == 7103
            bob_nursery.cancel_scope.cancel()  # bob shuts down: its goodbye must reach alice well before any TTL

        left = await at_alice.wait_for(about(bob_name, PeerLeft), timeout=10.0)
        assert left.reason is LeaveReason.REMOVED
        assert bob_name not in {p.name for p in alice.table.peers()}
        nursery.cancel_scope.cancel()


async def test_two_fingerprints_claiming_one_name_are_both_reported_as_conflicting(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pqtunneld")
    contested = unique("bob")
    genuine, impostor = random_fingerprint(), random_fingerprint()
    async with trio.open_nursery() as nursery:
        at_alice = start_node(nursery, MdnsDiscovery(unique("alice"), FP_A, 7111, interfaces=LOOPBACK))
        await nursery.start(MdnsDiscovery(contested, genuine, 7112, interfaces=LOOPBACK).run,
                            trio.open_memory_channel[PeerEvent](100)[0])
        # Whether zeroconf's probe renames the second to bob-2 depends on which socket gets the
        # unicast probe answer when several share port 5353; both outcomes must be reported alike.
        await nursery.start(MdnsDiscovery(contested, impostor, 7113, interfaces=LOOPBACK).run,
                            trio.open_memory_channel[PeerEvent](100)[0])
        for fingerprint in (genuine, impostor):
            await at_alice.wait_for(lambda e, fp=fingerprint: about(contested, PeerAppeared)(e)
                                    and e.peer.fingerprint == fp)
        nursery.cancel_scope.cancel()
    candidates = [e.peer for e in at_alice.events if about(contested, PeerAppeared)(e)]
    assert {p.fingerprint for p in candidates} == {genuine, impostor}
    assert [p.port for p in candidates if p.fingerprint == impostor] == [7113] and candidates[-1].conflict
    flipped = [e for e in at_alice.events if about(contested, PeerChanged)(e) and e.changes == ("conflict",)]
    assert len(flipped) == 1 and flipped[0].peer.conflict and flipped[0].peer.fingerprint == genuine
    warnings = [r.getMessage() for r in caplog.records if f"name {contested!r} is advertised with 2" in r.getMessage()]
    assert len(warnings) == 1 and genuine in warnings[0] and impostor in warnings[0]


async def test_cancel_during_registration_shuts_down_cleanly() -> None:
    early = MdnsDiscovery(unique("early"), FP_A, 7104, interfaces=LOOPBACK)
    with trio.fail_after(10):
        with trio.move_on_after(0.3):
            await early.run(trio.open_memory_channel[PeerEvent](1)[0])
    assert early.instance_name is None and early._zc is None  # closed in the shielded cleanup


async def test_run_returns_when_nobody_reads_the_events() -> None:
    node = MdnsDiscovery(unique("lonely"), FP_A, 7105, interfaces=LOOPBACK)
    send, receive = trio.open_memory_channel[PeerEvent](0)
    async with trio.open_nursery() as nursery:
        start_node(nursery, MdnsDiscovery(unique("poke"), FP_B, 7106, interfaces=LOOPBACK))  # an event to send
        await nursery.start(node.run, send)
        await receive.aclose()
        with trio.fail_after(MDNS_TIMEOUT):
            while node.instance_name is not None:  # cleared by run()'s shutdown
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


def _register_on_loop(zc: Zeroconf, infos: list[ServiceInfo]) -> None:
    """Worker thread: announce raw records concurrently (no probing) and wait until sent."""

    async def register_all() -> None:
        announcements = [await zc.async_register_service(info, cooperating_responders=True, strict=False)
                         for info in infos]
        await asyncio.gather(*announcements)

    assert zc.loop is not None
    asyncio.run_coroutine_threadsafe(register_all(), zc.loop).result(timeout=MDNS_TIMEOUT)


def hostile_records(tag: str) -> dict[str, ServiceInfo]:
    """Records a hostile or broken advertiser might send, keyed by instance label."""
    good = {b"name": f"mallory-{tag}".encode(), b"fp": FP_B.encode(), b"v": b"1"}
    variants: dict[str, tuple[dict, int]] = {
        "missing-fp": ({b"name": good[b"name"], b"v": b"1"}, 7201),
        "huge": ({**good, **{f"pad{i}".encode(): b"x" * 200 for i in range(12)}}, 7202),
        "garbage-fp": ({**good, b"fp": b"pq1:\xff\xfe\x00" + os.urandom(40)}, 7203),
        "bad-name": ({**good, b"name": b"-evil-"}, 7204),
        "port-zero": (good, 0),
        "no-value": ({**good, b"fp": None}, 7206),
        "bad-version": ({**good, b"v": b"1,abc"}, 7207),
    }
    records = {}
    for variant, (properties, port) in variants.items():
        label = f"{variant}-{tag}"
        records[label] = ServiceInfo(SERVICE_TYPE, f"{label}.{SERVICE_TYPE}", port=port, properties=properties,
                                     server=f"hostile-{tag}.local.", parsed_addresses=["127.0.0.1"])
    return records


async def test_hostile_advertisements_are_logged_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pqtunneld")
    tag = secrets.token_hex(3)
    records = hostile_records(tag)
    junk_label = f"junk-key-{tag}"  # unknown TXT keys, even binary ones, are ignored: still a valid record
    records[junk_label] = ServiceInfo(
        SERVICE_TYPE, f"{junk_label}.{SERVICE_TYPE}", port=7208,
        properties={b"name": f"mallory-{tag}".encode(), b"fp": FP_B.encode(), b"v": b"1", b"\x00\xff": b"\x00",
                    b"flag": None},
        server=f"hostile-{tag}.local.", parsed_addresses=["127.0.0.1"])
    future_name = unique("future")
    records[future_name] = ServiceInfo(
        SERVICE_TYPE, f"{future_name}.{SERVICE_TYPE}", port=7209,
        properties={b"name": future_name.encode(), b"fp": random_fingerprint().encode(), b"v": b"2"},
        server=f"hostile-{tag}.local.", parsed_addresses=["127.0.0.1"])
    hostile = await trio.to_thread.run_sync(lambda: Zeroconf(interfaces=LOOPBACK))
    try:
        alice = MdnsDiscovery(unique("alice"), FP_A, 7210, interfaces=LOOPBACK)
        bob_name = unique("bob")
        bob = MdnsDiscovery(bob_name, random_fingerprint(), 7211, interfaces=LOOPBACK)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, _register_on_loop, hostile, list(records.values()))
            at_alice = start_node(nursery, alice)
            start_node(nursery, bob)
            assert (await at_alice.wait_for(about(bob_name, PeerAppeared))).peer.port == 7211
            future = await at_alice.wait_for(about(future_name, PeerAppeared))
            assert not future.peer.compatible and future.peer.versions == (2,)
            invalid = {label for label in records if label not in (future_name, junk_label)}
            with trio.fail_after(MDNS_TIMEOUT):
                while not all(any(label in r.getMessage() and "ignoring advertisement" in r.getMessage()
                                  for r in caplog.records) for label in invalid):
                    await trio.sleep(0.05)
            assert {p.instance for p in alice.table.peers() if p.name == f"mallory-{tag}"} == {junk_label}
            assert bob_name in {p.name for p in alice.table.peers()}
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(hostile.close)
    messages = [r.getMessage() for r in caplog.records]
    assert any("port 0 out of range" in m and f"port-zero-{tag}" in m for m in messages)
    assert any("TXT record longer than 1300 bytes" in m and f"huge-{tag}" in m for m in messages)
    assert any(f"peer {future_name!r} appeared" in m and "incompatible" in m for m in messages)


async def test_a_flood_of_advertisements_is_capped_and_its_log_lines_rate_limited(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pqtunneld")
    tag = secrets.token_hex(3)
    flood = [ServiceInfo(SERVICE_TYPE, f"flood{i}-{tag}.{SERVICE_TYPE}", port=7300 + i,
                         properties={b"name": f"flood{i}-{tag}".encode(), b"fp": random_fingerprint().encode(),
                                     b"v": b"1"},
                         server=f"flood-{tag}.local.", parsed_addresses=["127.0.0.1"]) for i in range(60)]
    flooder = await trio.to_thread.run_sync(lambda: Zeroconf(interfaces=LOOPBACK))
    try:
        alice = MdnsDiscovery(unique("alice"), FP_A, 7299, interfaces=LOOPBACK, table=PeerTable(max_entries=10))
        async with trio.open_nursery() as nursery:
            await trio.to_thread.run_sync(_register_on_loop, flooder, flood)
            at_alice = start_node(nursery, alice)
            with trio.fail_after(MDNS_TIMEOUT):
                while alice.table.stats.dropped_full < 60 - len(alice.table):
                    await trio.sleep(0.05)
            assert len(alice.table) == 10
            assert len([e for e in at_alice.events if isinstance(e, PeerAppeared)]) <= 10
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(flooder.close)
    full_lines = [r for r in caplog.records if "peer table full" in r.getMessage()]
    assert 1 <= len(full_lines) <= 20 < alice.table.stats.dropped_full
