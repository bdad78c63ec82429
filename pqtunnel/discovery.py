"""mDNS / DNS-SD discovery of pqtunnel nodes on the local link: the sans-IO core.

Each node advertises ``NAME._pqtunnel._tcp.local.`` with a TXT record holding its claimed
name (``name``), fingerprint (``fp``) and protocol version(s) (``v``). Everything learnt
this way is a *hint*: anyone on the link can advertise anything, so a sighting only tells
the daemon where it might dial. Whether the peer really is who it claims is decided by
the handshake against the pinned fingerprint (see ``pqtunnel.trust``).

This module is pure, like the rest of the library: ``advertisement_properties``,
``parse_advertisement`` (defensive against hostile records) and ``PeerTable``
(``LogLimiter`` is re-exported from ``pqtunnel.ratelimit``). It does no I/O and reads no
clock: the caller passes ``now``. The trio/zeroconf bridge that feeds it real mDNS
records is the application's ``pqtunneld.mdns`` (``daemon/mdns.py``).

See docs/discovery.md for the record layout, limits and timings.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from .errors import ProtocolError, UserError
from .handshake import PROTOCOL_VERSION
from .ratelimit import LogLimiter
from .ratelimit import TokenBucket as _Bucket
from .identity import FINGERPRINT_PREFIX, normalise_fingerprint
from .names import validate_name

SERVICE_TYPE: Final = "_pqtunnel._tcp.local."
TXT_NAME: Final = "name"
TXT_FINGERPRINT: Final = "fp"
TXT_VERSION: Final = "v"

# --- limits on what a record may contain (anything larger is refused, not truncated) ---------
MAX_TXT_KEYS: Final = 32
MAX_TXT_ENTRY: Final = 255
"""One TXT string (``key=value``) is at most 255 bytes on the wire; more cannot be genuine."""
MAX_TXT_BYTES: Final = 1300
"""Whole TXT record (RFC 6763 6.2: should fit one packet; ours is ~60 bytes)."""
MAX_NAME_VALUE: Final = 63
MAX_FINGERPRINT_VALUE: Final = 40
MAX_VERSION_VALUE: Final = 32
MAX_VERSIONS: Final = 8
MAX_INSTANCE_LABEL: Final = 63
MAX_ADDRESSES: Final = 16
MAX_ADDRESS_TEXT: Final = 64

# --- table defaults ----------------------------------------------------------------------------
PEER_TTL: Final = 100.0
"""A table entry not re-confirmed for this long is dropped. This is what notices a crashed
node: zeroconf keeps PTR records at least 1125 s, but SRV/TXT expire after the bridge's RECORD_TTL
(``pqtunneld.mdns``), after which re-confirmation has to ask the network and gets no answer."""
MAX_PEERS: Final = 1024
MAX_FINGERPRINTS_PER_INSTANCE: Final = 4
"""Candidates one instance may hold (a genuine re-key needs 2); more is a fingerprint flood."""
CHANGE_BURST: Final = 4
CHANGE_INTERVAL: Final = 5.0
"""Per-instance rate limit: ``CHANGE_BURST`` changes at once, then one per ``CHANGE_INTERVAL`` s."""

_VERSION_LIST = re.compile(r"[0-9]{1,3}(,[0-9]{1,3})*")
_SERVICE_SUFFIX = "." + SERVICE_TYPE


class InvalidAdvertisement(ProtocolError):
    """An mDNS record for our service type is malformed or hostile; it is ignored."""

    def __init__(self, reason: str, instance: object = None) -> None:
        self.reason = reason
        self.instance = instance
        shown = repr(instance)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"invalid mDNS advertisement {shown}: {reason}")


# --- advertisements (sans-IO) ----------------------------------------------------------------------


def advertised_versions(version: int | Iterable[int]) -> tuple[int, ...]:
    """The sorted, distinct versions for our ``v`` field; refuses what a peer would reject."""
    versions = (version,) if isinstance(version, int) else tuple(version)
    if not versions or len(versions) > MAX_VERSIONS:
        raise ValueError(f"advertise 1-{MAX_VERSIONS} protocol versions, not {len(versions)}")
    for value in versions:
        if type(value) is not int or not 1 <= value <= 255:
            raise ValueError(f"protocol version must be an integer 1-255, not {value!r}")
    return tuple(sorted(set(versions)))


def advertisement_properties(name: str, fingerprint: str,
                             version: int | Iterable[int] = PROTOCOL_VERSION) -> dict[bytes, bytes]:
    """The TXT record of our own advertisement; refuses values a peer would reject."""
    versions = advertised_versions(version)
    return {
        TXT_NAME.encode(): validate_name(name).encode("ascii"),
        TXT_FINGERPRINT.encode(): normalise_fingerprint(fingerprint).encode("ascii"),
        TXT_VERSION.encode(): ",".join(str(v) for v in versions).encode("ascii"),
    }


@dataclass(frozen=True)
class Sighting:
    """One validated advertisement: where a node claiming ``name`` says it listens."""

    instance: str  # DNS-SD instance label (lower case): the handle removals refer to
    name: str
    fingerprint: str
    addresses: tuple[str, ...]
    port: int
    versions: tuple[int, ...]

    @property
    def compatible(self) -> bool:
        """False if the node speaks no protocol version we do: listed, but not worth dialling."""
        return PROTOCOL_VERSION in self.versions


def parse_advertisement(instance_name: object, properties: object, addresses: object, port: object) -> Sighting:
    """Validate a resolved record; raise InvalidAdvertisement on anything odd.

    Every argument comes off the network, so nothing about its type or size is assumed.
    Unknown TXT keys are ignored (room for later versions), unknown protocol versions are
    kept but make the sighting ``compatible=False`` so the daemon can report it.
    """
    instance = instance_label(instance_name)
    try:
        fields = _txt_fields(properties)
        name = _name_field(fields)
        fingerprint = _fingerprint_field(fields)
        versions = _version_field(fields)
        return Sighting(instance=instance, name=name, fingerprint=fingerprint,
                        addresses=_addresses(addresses), port=_port(port), versions=versions)
    except InvalidAdvertisement as exc:
        raise InvalidAdvertisement(exc.reason, instance_name) from None


def instance_label(instance_name: object) -> str:
    """The instance label of ``LABEL._pqtunnel._tcp.local.`` (or a bare label), lower-cased."""
    if not isinstance(instance_name, str):
        raise InvalidAdvertisement("instance name is not text", instance_name)
    if len(instance_name) > 4 * MAX_INSTANCE_LABEL + len(_SERVICE_SUFFIX):
        raise InvalidAdvertisement("instance name too long", instance_name)
    label = instance_name
    if label.lower().endswith(_SERVICE_SUFFIX):
        label = label[: -len(_SERVICE_SUFFIX)]
    elif label.endswith("."):
        raise InvalidAdvertisement(f"not a {SERVICE_TYPE} instance", instance_name)
    if not label or len(label.encode("utf-8", "surrogatepass")) > MAX_INSTANCE_LABEL:
        raise InvalidAdvertisement(f"instance label must be 1-{MAX_INSTANCE_LABEL} bytes", instance_name)
    if any(ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 or 0xD800 <= ord(ch) < 0xE000 for ch in label):
        raise InvalidAdvertisement("instance label contains control characters", instance_name)
    return label.lower()


def _as_bytes(value: object, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        if len(value) > MAX_TXT_ENTRY:
            raise InvalidAdvertisement(f"{what} longer than {MAX_TXT_ENTRY} bytes")
        return value.encode("utf-8", "surrogatepass")
    raise InvalidAdvertisement(f"{what} has type {type(value).__name__}, expected bytes")


def _txt_fields(properties: object) -> dict[bytes, bytes | None]:
    """TXT map with keys lower-cased (RFC 6763 6.4); sizes capped; duplicates refused."""
    if not isinstance(properties, Mapping):
        raise InvalidAdvertisement("TXT record is not a key/value map")
    if len(properties) > MAX_TXT_KEYS:
        raise InvalidAdvertisement(f"TXT record has {len(properties)} keys (at most {MAX_TXT_KEYS})")
    fields: dict[bytes, bytes | None] = {}
    total = 0
    for raw_key, raw_value in properties.items():
        key = _as_bytes(raw_key, "TXT key")
        value = None if raw_value is None else _as_bytes(raw_value, f"TXT value of {key[:20]!r}")
        entry = len(key) + (0 if value is None else 1 + len(value))
        if not key or b"=" in key:
            raise InvalidAdvertisement("TXT key is empty or contains '='")
        if entry > MAX_TXT_ENTRY:
            raise InvalidAdvertisement(f"TXT entry {key[:20]!r} longer than {MAX_TXT_ENTRY} bytes")
        total += 1 + entry
        if total > MAX_TXT_BYTES:
            raise InvalidAdvertisement(f"TXT record longer than {MAX_TXT_BYTES} bytes")
        folded = key.lower()
        if folded in fields:
            raise InvalidAdvertisement(f"TXT key {folded[:20]!r} appears more than once")
        fields[folded] = value
    return fields


def _ascii_field(fields: dict[bytes, bytes | None], key: str, limit: int) -> str:
    if key.encode() not in fields:
        raise InvalidAdvertisement(f"TXT key {key!r} missing")
    value = fields[key.encode()]
    if value is None:
        raise InvalidAdvertisement(f"TXT key {key!r} has no value")
    if len(value) > limit:
        raise InvalidAdvertisement(f"TXT {key!r} longer than {limit} bytes")
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidAdvertisement(f"TXT {key!r} is not ASCII") from None
    if not text.isprintable() or text != text.strip():
        raise InvalidAdvertisement(f"TXT {key!r} contains spaces or control characters")
    return text


def _name_field(fields: dict[bytes, bytes | None]) -> str:
    text = _ascii_field(fields, TXT_NAME, MAX_NAME_VALUE)
    try:
        return validate_name(text, "advertised name")
    except UserError as exc:
        raise InvalidAdvertisement(str(exc)) from None


def _fingerprint_field(fields: dict[bytes, bytes | None]) -> str:
    text = _ascii_field(fields, TXT_FINGERPRINT, MAX_FINGERPRINT_VALUE)
    try:
        return normalise_fingerprint(text)
    except UserError:
        raise InvalidAdvertisement(f"TXT 'fp' is not a {FINGERPRINT_PREFIX} fingerprint") from None


def _version_field(fields: dict[bytes, bytes | None]) -> tuple[int, ...]:
    text = _ascii_field(fields, TXT_VERSION, MAX_VERSION_VALUE)
    if not _VERSION_LIST.fullmatch(text):
        raise InvalidAdvertisement("TXT 'v' is not a comma-separated list of version numbers")
    versions = {int(part) for part in text.split(",")}
    if len(versions) > MAX_VERSIONS or not all(1 <= v <= 255 for v in versions):
        raise InvalidAdvertisement(f"TXT 'v' must list 1-{MAX_VERSIONS} versions between 1 and 255")
    return tuple(sorted(versions))


def _address(value: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        ip = value
    elif isinstance(value, (bytes, bytearray)):
        if len(value) not in (4, 16):
            raise InvalidAdvertisement(f"packed address has {len(value)} bytes")
        ip = ipaddress.ip_address(bytes(value))
    elif isinstance(value, str):
        if len(value) > MAX_ADDRESS_TEXT or not value.isascii() or not value.isprintable():
            raise InvalidAdvertisement("address is not an IP address")
        try:
            ip = ipaddress.ip_address(value)
        except ValueError:
            raise InvalidAdvertisement(f"address {value!r} is not an IP address") from None
    else:
        raise InvalidAdvertisement(f"address has type {type(value).__name__}")
    if ip.is_unspecified or ip.is_multicast:
        raise InvalidAdvertisement(f"address {ip} cannot be dialled")
    return ip


def _addresses(addresses: object) -> tuple[str, ...]:
    """Unique addresses in a stable order (IPv4 first), so reordering is not a change."""
    if isinstance(addresses, (str, bytes, bytearray)) or not isinstance(addresses, Iterable):
        raise InvalidAdvertisement("addresses are not a list")
    found: dict[str, ipaddress.IPv4Address | ipaddress.IPv6Address] = {}
    for count, value in enumerate(addresses, start=1):
        if count > MAX_ADDRESSES:
            raise InvalidAdvertisement(f"more than {MAX_ADDRESSES} addresses")
        ip = _address(value)
        found[str(ip)] = ip
    if not found:
        raise InvalidAdvertisement("no address")
    ordered = sorted(found.items(), key=lambda item: (item[1].version, item[1].packed, item[0]))
    return tuple(text for text, _ in ordered)


def _port(port: object) -> int:
    if type(port) is not int:
        raise InvalidAdvertisement(f"port has type {type(port).__name__}")
    if not 1 <= port <= 65535:
        raise InvalidAdvertisement(f"port {port} out of range 1-65535")
    return port


# --- the peer table (sans-IO) -----------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """What the table currently believes about one advertised instance."""

    instance: str
    name: str
    fingerprint: str
    addresses: tuple[str, ...]
    port: int
    versions: tuple[int, ...]
    conflict: bool = False
    """Another instance advertises the same name with a different fingerprint."""

    @property
    def compatible(self) -> bool:
        return PROTOCOL_VERSION in self.versions

    @classmethod
    def from_sighting(cls, sighting: Sighting, conflict: bool) -> Peer:
        return cls(instance=sighting.instance, name=sighting.name, fingerprint=sighting.fingerprint,
                   addresses=sighting.addresses, port=sighting.port, versions=sighting.versions,
                   conflict=conflict)

    def same_data(self, sighting: Sighting) -> bool:
        return (self.name, self.fingerprint, self.addresses, self.port, self.versions) == (
            sighting.name, sighting.fingerprint, sighting.addresses, sighting.port, sighting.versions)


_CHANGE_FIELDS: Final = ("addresses", "port", "versions", "conflict")


@dataclass(frozen=True)
class PeerAppeared:
    peer: Peer


@dataclass(frozen=True)
class PeerChanged:
    peer: Peer
    previous: Peer

    @property
    def changes(self) -> tuple[str, ...]:
        """Names of the fields that differ: addresses, port, versions, conflict.

        Never the fingerprint: another fingerprint is another candidate (see PeerTable).
        """
        return tuple(f for f in _CHANGE_FIELDS if getattr(self.peer, f) != getattr(self.previous, f))


class LeaveReason(str, enum.Enum):
    REMOVED = "removed"  # goodbye packet, or zeroconf's cache expired the record
    EXPIRED = "expired"  # not re-confirmed within the table TTL
    INVALID = "invalid"  # its current record no longer validates
    RENAMED = "renamed"  # the same instance now claims another name (an Appeared follows)


@dataclass(frozen=True)
class PeerLeft:
    peer: Peer
    reason: LeaveReason


PeerEvent = PeerAppeared | PeerChanged | PeerLeft


_Key = tuple[str, str]  # (instance, fingerprint)


@dataclass
class _Slot:
    current: Peer | None  # what the caller was told (None: the appearance is still held back)
    pending: Sighting | None  # newer data held back by the rate limit
    last_seen: float


@dataclass
class TableStats:
    """Counters the I/O shell turns into (rate-limited) log lines."""

    dropped_full: int = 0  # new candidates refused because the table was full
    dropped_fingerprints: int = 0  # refused: the instance already has too many fingerprints
    throttled: int = 0  # changes held back by the per-instance rate limit


class PeerTable:
    """Who advertises what, with expiry, a size cap and a per-instance change rate limit.

    One entry per (DNS-SD instance, fingerprint). Whenever one name is claimed by more
    than one fingerprint (two instances, or one instance whose fingerprint changed), every
    candidate is kept with ``conflict=True``: discovery cannot know which is genuine, so it
    never picks one; the daemon decides by handshake proof against the pinned fingerprint.
    A superseded candidate leaves when it expires or its instance says goodbye.

    A change beyond the rate limit is held, not lost: the latest data is delivered when
    the instance has a token again (``tick``). Removals are never rate-limited.
    """

    def __init__(self, *, ttl: float = PEER_TTL, max_entries: int = MAX_PEERS,
                 change_burst: int = CHANGE_BURST, change_interval: float = CHANGE_INTERVAL) -> None:
        if ttl <= 0 or max_entries < 1 or change_burst < 1 or change_interval <= 0:
            raise ValueError("PeerTable limits must be positive")
        self.ttl = ttl
        self.max_entries = max_entries
        self.change_burst = change_burst
        self.change_interval = change_interval
        self.stats = TableStats()
        self._slots: dict[_Key, _Slot] = {}
        self._by_instance: dict[str, set[_Key]] = {}
        self._by_name: dict[str, set[_Key]] = {}  # only entries the caller has been told about
        self._buckets: dict[str, _Bucket] = {}  # per live instance
        self._recent: OrderedDict[str, _Bucket] = OrderedDict()  # buckets of instances that left

    # --- queries -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, instance: object) -> bool:
        return instance in self._by_instance

    def peers(self) -> list[Peer]:
        """Every peer the caller has been told about."""
        return [slot.current for slot in self._slots.values() if slot.current is not None]

    def candidates(self, name: str) -> list[Peer]:
        """All advertised peers claiming ``name`` (several if there is a conflict)."""
        return sorted((self._visible(key) for key in self._by_name.get(name, ())),
                      key=lambda peer: (peer.instance, peer.fingerprint))

    def fingerprints(self, name: str) -> tuple[str, ...]:
        """The distinct fingerprints advertised for ``name`` (more than one: a conflict)."""
        return tuple(sorted({fingerprint for _, fingerprint in self._by_name.get(name, ())}))

    def conflicts(self) -> dict[str, tuple[str, ...]]:
        """Names claimed by more than one fingerprint, with those fingerprints."""
        result = {}
        for name, keys in self._by_name.items():
            fingerprints = {fingerprint for _, fingerprint in keys}
            if len(fingerprints) > 1:
                result[name] = tuple(sorted(fingerprints))
        return result

    def next_deadline(self) -> float | None:
        """When ``tick`` next has work (an expiry or a held change), or None."""
        deadlines = [slot.last_seen + self.ttl for slot in self._slots.values()]
        deadlines += [self._buckets[instance].ready_at(self.change_interval)
                      for (instance, _), slot in self._slots.items() if slot.pending is not None]
        return min(deadlines, default=None)

    # --- updates -------------------------------------------------------------------------------

    def apply(self, sighting: Sighting, now: float) -> list[PeerEvent]:
        """Record a (re-)sighting; returns the events it causes (none for a plain refresh)."""
        key = (sighting.instance, sighting.fingerprint)
        slot = self._slots.get(key)
        if slot is None:
            if len(self._slots) >= self.max_entries:
                self.stats.dropped_full += 1
                return []
            if len(self._by_instance.get(sighting.instance, ())) >= MAX_FINGERPRINTS_PER_INSTANCE:
                self.stats.dropped_fingerprints += 1
                return []
            slot = self._slots[key] = _Slot(current=None, pending=sighting, last_seen=now)
            self._by_instance.setdefault(sighting.instance, set()).add(key)
            if sighting.instance not in self._buckets:
                self._buckets[sighting.instance] = self._bucket_for(sighting.instance, now)
            return self._release(key, slot, now)
        slot.last_seen = max(slot.last_seen, now)
        if slot.current is not None and slot.current.same_data(sighting):
            slot.pending = None  # a held change was reverted before it was delivered
            return []
        slot.pending = sighting
        return self._release(key, slot, now)

    def remove(self, instance: str, now: float, reason: LeaveReason = LeaveReason.REMOVED) -> list[PeerEvent]:
        """Forget every candidate of an instance (its goodbye, or its record became invalid)."""
        events: list[PeerEvent] = []
        for key in sorted(self._by_instance.get(instance, ())):
            events += self._drop(key, reason)
        return events

    def tick(self, now: float) -> list[PeerEvent]:
        """Expire stale entries and deliver held changes whose rate limit has passed."""
        events: list[PeerEvent] = []
        for key in [key for key, slot in self._slots.items() if now >= slot.last_seen + self.ttl]:
            events += self._drop(key, LeaveReason.EXPIRED)
        for key, slot in list(self._slots.items()):
            if slot.pending is not None:
                events += self._release(key, slot, now)
        return events

    # --- internals -----------------------------------------------------------------------------

    def _visible(self, key: _Key) -> Peer:
        peer = self._slots[key].current
        assert peer is not None, "only announced entries are indexed by name"
        return peer

    def _drop(self, key: _Key, reason: LeaveReason) -> list[PeerEvent]:
        slot = self._slots.pop(key)
        instance = key[0]
        keys = self._by_instance[instance]
        keys.discard(key)
        if not keys:
            del self._by_instance[instance]
            self._remember_bucket(instance, self._buckets.pop(instance))
        if slot.current is None:
            return []
        self._unindex(key, slot.current.name)
        return [PeerLeft(slot.current, reason), *self._refresh_conflicts(slot.current.name)]

    def _bucket_for(self, instance: str, now: float) -> _Bucket:
        """A returning instance gets its old bucket back: leaving does not refill it."""
        bucket = self._recent.pop(instance, None)
        return bucket if bucket is not None else _Bucket(tokens=float(self.change_burst), stamp=now)

    def _remember_bucket(self, instance: str, bucket: _Bucket) -> None:
        """Keep a departed instance's bucket, so leaving and coming back is rate-limited too."""
        self._recent[instance] = bucket
        self._recent.move_to_end(instance)
        while len(self._recent) > self.max_entries:
            self._recent.popitem(last=False)

    def _release(self, key: _Key, slot: _Slot, now: float) -> list[PeerEvent]:
        if slot.pending is None:
            return []
        if not self._buckets[key[0]].take(now, self.change_burst, self.change_interval):
            self.stats.throttled += 1
            return []
        sighting, slot.pending = slot.pending, None
        return self._commit(key, slot, sighting)

    def _commit(self, key: _Key, slot: _Slot, sighting: Sighting) -> list[PeerEvent]:
        events: list[PeerEvent] = []
        old = slot.current
        if old is not None and old.name != sighting.name:
            slot.current = None
            self._unindex(key, old.name)
            events += [PeerLeft(old, LeaveReason.RENAMED), *self._refresh_conflicts(old.name)]
            old = None
        claimed_by_other = any(fp != sighting.fingerprint for _, fp in self._by_name.get(sighting.name, ()))
        peer = Peer.from_sighting(sighting, conflict=claimed_by_other)
        slot.current = peer
        self._by_name.setdefault(peer.name, set()).add(key)
        events.append(PeerAppeared(peer) if old is None else PeerChanged(peer, old))
        return events + self._refresh_conflicts(peer.name)

    def _unindex(self, key: _Key, name: str) -> None:
        keys = self._by_name.get(name)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_name[name]

    def _refresh_conflicts(self, name: str) -> list[PeerEvent]:
        """Flip ``conflict`` on every peer of ``name`` whose flag no longer matches."""
        keys = sorted(self._by_name.get(name, ()))
        conflict = len({fingerprint for _, fingerprint in keys}) > 1
        events: list[PeerEvent] = []
        for key in keys:
            slot = self._slots[key]
            old = self._visible(key)
            if old.conflict != conflict:
                slot.current = dataclasses.replace(old, conflict=conflict)
                events.append(PeerChanged(slot.current, old))
        return events


# --- describing events (sans-IO) --------------------------------------------------------------------


def compatibility_note(peer: Peer) -> str:
    """Empty for a peer we can talk to; otherwise why not, for the log line announcing it."""
    if peer.compatible:
        return ""
    spoken = ",".join(str(v) for v in peer.versions)
    return f"; incompatible: it speaks protocol {spoken}, this node speaks {PROTOCOL_VERSION}"


def describe_changes(event: PeerChanged) -> str:
    """``port 7001 -> 7002; ...``: what changed, so one log line explains the event."""
    parts = []
    for field_name in event.changes:
        before, after = getattr(event.previous, field_name), getattr(event.peer, field_name)
        if isinstance(before, tuple):
            before, after = ",".join(map(str, before)), ",".join(map(str, after))
        parts.append(f"{field_name} {before} -> {after}")
    return "; ".join(parts)


__all__ = [
    "SERVICE_TYPE", "InvalidAdvertisement", "Sighting", "Peer", "PeerAppeared", "PeerChanged", "PeerLeft",
    "PeerEvent", "LeaveReason", "PeerTable", "TableStats", "LogLimiter", "advertisement_properties",
    "advertised_versions", "parse_advertisement", "instance_label", "compatibility_note", "describe_changes",
]
