"""mDNS / DNS-SD for the daemon: zeroconf bridged to trio around the library's sans-IO core.

``MdnsDiscovery`` advertises this node and reports other nodes as ``PeerEvent``s.
python-zeroconf runs its own asyncio loop in its own threads; this class talks to it with
``asyncio.run_coroutine_threadsafe`` and gets woken back through the trio token, so the
trio thread never blocks. Everything it learns goes through ``pqtunnel.discovery``
(record parsing and the ``PeerTable``), which decides what is a valid peer and when an
event is due; this module only does the I/O, the clock and the logging.

See docs/discovery.md for the record layout, limits and timings.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import enum
import ipaddress
import logging
from collections import OrderedDict
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import ifaddr  # zeroconf's own dependency for listing interfaces
import trio
import zeroconf
from zeroconf import DNSQuestionType, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceInfo

from pqtunnel.discovery import (
    MAX_FINGERPRINTS_PER_INSTANCE,
    MAX_PEERS,
    SERVICE_TYPE,
    InvalidAdvertisement,
    LeaveReason,
    LogLimiter,
    PeerAppeared,
    PeerChanged,
    PeerEvent,
    PeerTable,
    Sighting,
    advertised_versions,
    advertisement_properties,
    compatibility_note,
    describe_changes,
    instance_label,
    parse_advertisement,
)
from pqtunnel.errors import UserError
from pqtunnel.handshake import PROTOCOL_VERSION
from pqtunnel.identity import FINGERPRINT_PREFIX, normalise_fingerprint
from pqtunnel.names import validate_name

from .logs import LOG

RECORD_TTL: Final = 120
"""TTL (s) of every record we publish (RFC 6762's value for records naming a host)."""
REFRESH_INTERVAL: Final = 30.0
"""How often the bridge re-confirms every advertised name (zeroconf's cache, else a query)."""
RESOLVE_TIMEOUT: Final = 3.0
RESOLVERS: Final = 8
"""Concurrent resolutions: an unresolvable flood cannot starve a genuine peer of all of them."""
MAX_BROWSED: Final = 4 * MAX_PEERS
GOODBYE_TIMEOUT: Final = 3.0
CLOSE_TIMEOUT: Final = 5.0

_T = TypeVar("_T")


class DiscoveryError(UserError):
    """mDNS cannot run here (no multicast route, no address to advertise, bad settings)."""


# --- the trio / zeroconf bridge ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Resolved:
    name: str
    properties: dict[Any, Any]
    addresses: list[str]
    port: int | None


@dataclass(frozen=True)
class _Unresolved:
    reason: str


@dataclass(frozen=True)
class _Removed:
    pass


_InboxItem = _Resolved | _Unresolved | _Removed


class _Resolving(enum.Enum):
    CURRENT = "current"
    AGAIN = "again"  # the records changed while resolving: resolve once more
    DROPPED = "dropped"  # the instance was removed while resolving: discard the result


async def _async_register(zc: Zeroconf, info: ServiceInfo) -> str:
    """On zeroconf's loop: probe, register and wait for the announcements to go out."""
    announced = await zc.async_register_service(info, allow_name_change=True)
    await announced
    return info.name


async def _async_update(zc: Zeroconf, info: ServiceInfo) -> None:
    announced = await zc.async_update_service(info)
    await announced


async def _async_unregister(zc: Zeroconf, info: ServiceInfo) -> None:
    goodbyes = await zc.async_unregister_service(info)
    await goodbyes


async def _async_resolve(zc: Zeroconf, name: str, timeout_ms: int,
                         question: DNSQuestionType | None = None) -> _Resolved | _Unresolved:
    """On zeroconf's loop: SRV/TXT/addresses from the cache, or from the network if missing
    (asking again about once a second until ``timeout_ms``)."""
    info = AsyncServiceInfo(SERVICE_TYPE, name)
    if not await info.async_request(zc, timeout_ms, question_type=question):
        return _Unresolved("no complete answer (SRV, TXT and an address) in time")
    return _Resolved(name=name, properties=dict(info.properties),
                     addresses=info.parsed_scoped_addresses(), port=info.port)


def _host_addresses() -> list[str]:
    """Non-loopback IPv4 addresses of this host (what InterfaceChoice.All announces on)."""
    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ipaddress.ip_address(ip.ip).is_loopback and ip.ip not in found:
                found.append(ip.ip)
    return found


class MdnsDiscovery:
    """Advertise this node and report other nodes as PeerEvents, under trio.

    ``interfaces=None`` lets zeroconf choose (its default, every interface); otherwise a
    list of interface IP addresses (tests use ``["127.0.0.1"]``). ``addresses`` are what
    the A/AAAA records say; they default to the listed interface addresses, or to the
    host's non-loopback IPv4 addresses.
    """

    def __init__(self, name: str, fingerprint: str, port: int, *, interfaces: list[str] | None = None,
                 addresses: Sequence[str] | None = None, version: int | Iterable[int] = PROTOCOL_VERSION,
                 table: PeerTable | None = None, refresh_interval: float = REFRESH_INTERVAL,
                 resolve_timeout: float = RESOLVE_TIMEOUT) -> None:
        self.name = validate_name(name)
        self.fingerprint = normalise_fingerprint(fingerprint)
        self.port = _config_port(port)
        self.versions = advertised_versions(version)
        self.interfaces = list(interfaces) if interfaces is not None else None
        self._addresses = _config_addresses(addresses) if addresses is not None else None
        self.table = table if table is not None else PeerTable()
        self.refresh_interval = refresh_interval
        self.resolve_timeout = resolve_timeout
        self._server = f"pq1-{self.fingerprint.removeprefix(FINGERPRINT_PREFIX)}.local."
        self._log_limiter = LogLimiter()
        self._token: trio.lowlevel.TrioToken | None = None
        self._zc: Zeroconf | None = None
        self._info: ServiceInfo | None = None
        self._accepting = False
        self._browsed: dict[str, str] = {}  # key (lower-case service name) -> name as zeroconf spells it
        self._want: OrderedDict[str, str] = OrderedDict()
        self._resolving: dict[str, _Resolving] = {}
        self._want_ready = trio.Event()
        self._inbox: OrderedDict[str, _InboxItem] = OrderedDict()
        self._inbox_ready = trio.Event()
        self._contested: set[str] = set()  # names already warned about (bounded by the table)
        self._running = trio.Event()  # set once the browser runs (queries wait for it)
        self._querying: set[str] = set()  # names with an active query in flight (one each)

    @property
    def instance_name(self) -> str | None:
        """Our registered service name (zeroconf appends -2, -3... if the name was taken)."""
        return self._info.name if self._info is not None else None

    # --- lifecycle -------------------------------------------------------------------------------

    async def run(self, send_channel: trio.abc.SendChannel[PeerEvent],
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Advertise, browse and send PeerEvents until cancelled; then say goodbye.

        ``task_status.started()`` fires once the advertisement has been announced.
        The channel is not closed on exit: the caller owns it.
        """
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope(shield=True):  # a cancelled open must not leak zeroconf's threads
            zc = await trio.to_thread.run_sync(self._open_zeroconf)
        self._zc = zc
        browser: ServiceBrowser | None = None
        try:
            await self._register(zc)
            async with trio.open_nursery() as nursery:
                for _ in range(RESOLVERS):
                    nursery.start_soon(self._resolver, zc)
                self._accepting = True
                browser = await trio.to_thread.run_sync(self._open_browser, zc)
                self._running.set()
                task_status.started()
                await self._process(send_channel)
                nursery.cancel_scope.cancel()  # the receiver is gone: stop the resolvers too
        finally:
            self._accepting = False
            await self._shutdown(zc, browser)

    async def update(self, *, port: int | None = None, addresses: Sequence[str] | None = None) -> None:
        """Re-announce with a new port and/or addresses (only while ``run`` is running)."""
        zc, info = self._zc, self._info
        if zc is None or info is None:
            raise RuntimeError("MdnsDiscovery.update() needs run() to have started")
        new_port = self.port if port is None else _config_port(port)
        new_addresses = self._addresses if addresses is None else _config_addresses(addresses)
        new_info = self._service_info(info.name, new_port, new_addresses or self._advertised_addresses())
        await self._on_loop(zc, _async_update(zc, new_info))
        self._info, self.port, self._addresses = new_info, new_port, new_addresses
        LOG.info("mDNS: re-announced %r on port %d at %s", info.name, new_port, ", ".join(new_info.parsed_addresses()))

    async def query(self, name: str, timeout: float) -> bool:
        """Ask the link now where the node called ``name`` is, for up to ``timeout`` seconds.

        Browsing alone learns of a node only from its announcements or the browser's next
        PTR query, which backs off to minutes; a request for a name we expect cannot wait
        that long. This asks for ``NAME._pqtunnel._tcp.local.`` directly (multicast answers,
        so several responders on one host all hear them, repeated about once a second) and
        feeds an answer through the same table as a browsed one. Returns whether one came.
        At most one query per name runs at a time; a second caller returns False at once.
        """
        key = f"{validate_name(name)}.{SERVICE_TYPE}"
        if key in self._querying:
            return False
        self._querying.add(key)
        try:
            with trio.move_on_after(timeout):
                await self._running.wait()
                zc = self._zc
                if zc is None or not self._accepting:
                    return False
                remaining_ms = max(1, int((trio.current_effective_deadline() - trio.current_time()) * 1000))
                try:
                    item = await self._on_loop(zc, _async_resolve(zc, key, remaining_ms, DNSQuestionType.QM))
                except Exception as exc:  # noqa: BLE001 - as in _resolver: a hostile answer must not end the request
                    self._log(logging.WARNING, "invalid", "mDNS: query for %r failed: %r", key, exc)
                    return False
                if isinstance(item, _Resolved) and self._accepting:
                    self._note_answer(key, item)
                    return True
            return False
        finally:
            self._querying.discard(key)

    def _note_answer(self, key: str, item: _Resolved) -> None:
        """An answer to our own query: tracked (and refreshed) like a browsed name."""
        if key not in self._browsed:
            if len(self._browsed) >= MAX_BROWSED:
                return
            self._browsed[key] = item.name
        self._post(key, item)

    def _open_zeroconf(self) -> Zeroconf:
        """Worker thread: zeroconf starts its own asyncio loop thread here."""
        try:
            if self.interfaces is None:
                return Zeroconf()
            return Zeroconf(interfaces=list(self.interfaces))
        except OSError as exc:
            raise DiscoveryError(
                f"mDNS cannot start on {self.interfaces or 'the default interfaces'}: {exc} "
                "(is there a multicast route? disable mDNS with --no-mdns)"
            ) from None

    def _open_browser(self, zc: Zeroconf) -> ServiceBrowser:
        return ServiceBrowser(zc, SERVICE_TYPE, handlers=[self._on_state_change])

    async def _register(self, zc: Zeroconf) -> None:
        addresses = self._addresses or self._advertised_addresses()
        info = self._service_info(f"{self.name}.{SERVICE_TYPE}", self.port, addresses)
        try:
            registered = await self._on_loop(zc, _async_register(zc, info))
        except zeroconf.Error as exc:
            raise DiscoveryError(f"mDNS registration of {info.name!r} failed: {exc!r}") from None
        self._info = info
        if registered.lower() != f"{self.name}.{SERVICE_TYPE}":
            LOG.warning("mDNS: the name %r is already advertised on this link; advertising as %r",
                        self.name, registered)
        LOG.info("mDNS: advertising %r on port %d at %s (fp %s)", registered, self.port,
                 ", ".join(addresses), self.fingerprint)

    def _service_info(self, service_name: str, port: int, addresses: Sequence[str]) -> ServiceInfo:
        return ServiceInfo(
            SERVICE_TYPE, service_name, port=port,
            properties=advertisement_properties(self.name, self.fingerprint, self.versions),
            server=self._server, parsed_addresses=list(addresses),
            host_ttl=RECORD_TTL, other_ttl=RECORD_TTL,
        )

    def _advertised_addresses(self) -> list[str]:
        if self.interfaces is not None:
            candidates = [a for a in self.interfaces if isinstance(a, str) and _is_ip(a)]
        else:
            candidates = _host_addresses()
        if not candidates:
            raise DiscoveryError("mDNS has no address to advertise (pass addresses= or interfaces=)")
        return candidates

    async def _shutdown(self, zc: Zeroconf, browser: ServiceBrowser | None) -> None:
        """Goodbye packets first (so peers drop us at once), then close; shielded and bounded."""
        info, self._info = self._info, None
        if info is not None:
            with trio.move_on_after(GOODBYE_TIMEOUT, shield=True):
                try:
                    await self._on_loop(zc, _async_unregister(zc, info))
                except zeroconf.Error as exc:
                    LOG.debug("mDNS: goodbye for %r failed: %r", info.name, exc)
        with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
            await trio.to_thread.run_sync(_close_zeroconf, zc, browser, abandon_on_cancel=True)
        self._zc = None

    async def _on_loop(self, zc: Zeroconf, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coro`` on zeroconf's asyncio loop; wait without blocking the trio thread."""
        assert zc.loop is not None
        future = asyncio.run_coroutine_threadsafe(coro, zc.loop)
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def wake(_: concurrent.futures.Future[_T]) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        future.add_done_callback(wake)
        try:
            await done.wait()
        except trio.Cancelled:
            future.cancel()
            raise
        return future.result()

    # --- zeroconf's browser thread -----------------------------------------------------------------

    def _on_state_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                         state_change: ServiceStateChange) -> None:
        """Runs on zeroconf's browser thread: hand the event to trio and return.

        zeroconf calls handlers with these keyword names, hence ``zeroconf`` shadowing the module.
        """
        removed = state_change is ServiceStateChange.Removed
        assert self._token is not None
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(self._note_browser_event, name, removed, trio_token=self._token)

    # --- trio side ---------------------------------------------------------------------------------

    def _note_browser_event(self, name: str, removed: bool) -> None:
        if not self._accepting:
            return
        key = name.lower()
        if removed:
            known = self._browsed.pop(key, None) is not None  # unknown names cannot be in the table
            self._want.pop(key, None)
            if key in self._resolving:
                self._resolving[key] = _Resolving.DROPPED
            if known:
                self._post(key, _Removed())
            return
        if key not in self._browsed:
            if len(self._browsed) >= MAX_BROWSED:
                self._log(logging.WARNING, "overload", "mDNS: already tracking %d advertised names; ignoring %r",
                          len(self._browsed), name)
                return
            self._browsed[key] = name
        self._want_resolve(key)

    def _want_resolve(self, key: str) -> None:
        state = self._resolving.get(key)
        if state is not None:
            self._resolving[key] = _Resolving.AGAIN
            return
        self._want[key] = self._browsed[key]
        self._want_ready.set()

    def _post(self, key: str, item: _InboxItem) -> None:
        self._inbox[key] = item
        self._inbox.move_to_end(key)
        self._inbox_ready.set()

    async def _next_wanted(self) -> tuple[str, str]:
        while not self._want:
            if self._want_ready.is_set():
                self._want_ready = trio.Event()
            await self._want_ready.wait()
        return self._want.popitem(last=False)

    async def _resolver(self, zc: Zeroconf) -> None:
        """One of RESOLVERS workers: resolve wanted names and post the raw results."""
        while True:
            key, name = await self._next_wanted()
            self._resolving[key] = _Resolving.CURRENT
            try:
                item = await self._on_loop(zc, _async_resolve(zc, name, int(self.resolve_timeout * 1000)))
            except Exception as exc:  # noqa: BLE001 - zeroconf handling a hostile record must not end discovery
                self._log(logging.WARNING, "invalid", "mDNS: ignoring advertisement %r: zeroconf cannot resolve it (%r)",
                          name, exc)
                item = _Unresolved(repr(exc))
            state = self._resolving.pop(key)
            if state is _Resolving.DROPPED:
                continue
            if state is _Resolving.AGAIN and key in self._browsed:
                self._want_resolve(key)
            self._post(key, item)

    async def _process(self, send_channel: trio.abc.SendChannel[PeerEvent]) -> None:
        """The only writer of the table: applies results, ticks, refreshes, sends events.

        Returns (ending ``run``) when the receiving side of the channel has been closed.
        """
        try:
            await self._process_forever(send_channel)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            LOG.info("mDNS: nobody reads discovery events any more; stopping discovery")

    async def _process_forever(self, send_channel: trio.abc.SendChannel[PeerEvent]) -> None:
        next_refresh = trio.current_time() + self.refresh_interval
        while True:
            table_deadline = self.table.next_deadline()
            deadline = next_refresh if table_deadline is None else min(next_refresh, table_deadline)
            with trio.move_on_at(deadline):
                await self._inbox_ready.wait()
            self._inbox_ready = trio.Event()
            while self._inbox:
                key, item = self._inbox.popitem(last=False)
                await self._publish(send_channel, self._handle(key, item, trio.current_time()))
            now = trio.current_time()
            await self._publish(send_channel, self.table.tick(now))
            if now >= next_refresh:
                for key in list(self._browsed):
                    self._want_resolve(key)
                next_refresh = now + self.refresh_interval

    def _handle(self, key: str, item: _InboxItem, now: float) -> list[PeerEvent]:
        try:
            label = instance_label(key)
        except InvalidAdvertisement:
            label = None
        if isinstance(item, _Removed):
            return self.table.remove(label, now) if label is not None else []
        if isinstance(item, _Unresolved):
            LOG.debug("mDNS: could not resolve %r: %s", key, item.reason)
            return []
        try:
            sighting = parse_advertisement(item.name, item.properties, item.addresses, item.port)
        except InvalidAdvertisement as exc:
            self._log(logging.WARNING, "invalid", "mDNS: ignoring advertisement: %s", exc)
            return self.table.remove(label, now, LeaveReason.INVALID) if label is not None else []
        if sighting.fingerprint == self.fingerprint:
            return []  # ourselves (or a clone of our identity): never a peer to dial
        return self._apply(sighting, now)

    def _apply(self, sighting: Sighting, now: float) -> list[PeerEvent]:
        stats = dataclasses.replace(self.table.stats)
        events = self.table.apply(sighting, now)
        if self.table.stats.dropped_full > stats.dropped_full:
            self._log(logging.WARNING, "overload", "mDNS: peer table full (%d entries); ignoring %r",
                      len(self.table), sighting.instance)
        if self.table.stats.dropped_fingerprints > stats.dropped_fingerprints:
            self._log(logging.WARNING, "overload", "mDNS: %r already advertised %d fingerprints; ignoring %s",
                      sighting.instance, MAX_FINGERPRINTS_PER_INSTANCE, sighting.fingerprint)
        if self.table.stats.throttled > stats.throttled:
            self._log(logging.WARNING, "flap", "mDNS: %r (%r) changes too often; holding back its updates",
                      sighting.instance, sighting.name)
        return events

    async def _publish(self, send_channel: trio.abc.SendChannel[PeerEvent], events: list[PeerEvent]) -> None:
        for event in events:
            self._log_event(event)
            await send_channel.send(event)

    def _log_event(self, event: PeerEvent) -> None:
        if isinstance(event, PeerAppeared):
            peer = event.peer
            self._log(logging.INFO, "peer", "mDNS: peer %r appeared at %s port %d (fp %s, instance %r)%s",
                      peer.name, ", ".join(peer.addresses), peer.port, peer.fingerprint, peer.instance,
                      compatibility_note(peer))
        elif isinstance(event, PeerChanged):
            self._log(logging.INFO, "peer", "mDNS: peer %r changed: %s", event.peer.name, describe_changes(event))
        else:
            self._log(logging.INFO, "peer", "mDNS: peer %r left (%s; instance %r)",
                      event.peer.name, event.reason.value, event.peer.instance)
        self._note_conflict(event.peer.name)

    def _note_conflict(self, name: str) -> None:
        """Warn once when a name becomes contested; forget it when it no longer is."""
        fingerprints = self.table.fingerprints(name)
        if len(fingerprints) < 2:
            self._contested.discard(name)
        elif name not in self._contested:
            self._contested.add(name)
            self._log(logging.WARNING, "conflict",
                      "mDNS: name %r is advertised with %d fingerprints (%s); only a handshake proves which is genuine",
                      name, len(fingerprints), ", ".join(fingerprints))

    def _log(self, level: int, category: str, message: str, *args: object) -> None:
        allowed, suppressed = self._log_limiter.allow(category, trio.current_time())
        if not allowed:
            return
        if suppressed:
            message += " (%d similar messages suppressed)"
            args = (*args, suppressed)
        LOG.log(level, message, *args)


def _close_zeroconf(zc: Zeroconf, browser: ServiceBrowser | None) -> None:
    """Worker thread: stop the browser thread, then zeroconf's loop and sockets."""
    if browser is not None:
        browser.cancel()
    zc.close()


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _config_port(port: int) -> int:
    if type(port) is not int or not 1 <= port <= 65535:
        raise DiscoveryError(f"mDNS: cannot advertise port {port!r} (expected 1-65535)")
    return port


def _config_addresses(addresses: Sequence[str]) -> list[str]:
    if isinstance(addresses, str) or not addresses or not all(isinstance(a, str) and _is_ip(a) for a in addresses):
        raise DiscoveryError(f"mDNS: cannot advertise addresses {addresses!r} (expected a list of IP addresses)")
    return list(addresses)


__all__ = ["DiscoveryError", "MdnsDiscovery", "RECORD_TTL", "REFRESH_INTERVAL", "RESOLVE_TIMEOUT"]
