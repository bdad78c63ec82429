"""mDNS discovery's sans-IO core: hostile-record parsing and the peer table.

Everything here is pure and tested exhaustively without sockets or a clock (time is an
argument). The zeroconf bridge, on real mDNS over loopback, is tested in test_mdns.py.
"""

from __future__ import annotations

import base64
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pqtunnel.discovery import (
    InvalidAdvertisement,
    LeaveReason,
    LogLimiter,
    Peer,
    PeerAppeared,
    PeerChanged,
    PeerEvent,
    PeerLeft,
    PeerTable,
    Sighting,
    advertisement_properties,
    compatibility_note,
    describe_changes,
    parse_advertisement,
)
from pqtunnel.errors import ConfigError, IdentityError, ProtocolError
from pqtunnel.identity import normalise_fingerprint
from pqtunnel.names import validate_name



def random_fingerprint() -> str:
    return "pq1:" + base64.b32encode(os.urandom(20)).decode().lower()


FP_A = random_fingerprint()
FP_B = random_fingerprint()


def props(name: str = "bob", fp: str = FP_A, v: str = "1") -> dict[bytes, bytes]:
    return {b"name": name.encode(), b"fp": fp.encode(), b"v": v.encode()}


_DEFAULT = object()


def parse(properties: object = _DEFAULT, addresses: object = ("192.0.2.1",), port: object = 7000,
          instance: object = "bob._pqtunnel._tcp.local.") -> Sighting:
    return parse_advertisement(instance, props() if properties is _DEFAULT else properties, addresses, port)


def reason_of(properties: object = _DEFAULT, **kwargs: object) -> str:
    with pytest.raises(InvalidAdvertisement) as info:
        parse(properties, **kwargs)
    return info.value.reason


# --- advertisement_properties / parse_advertisement -----------------------------------------------------


def test_own_advertisement_round_trips() -> None:
    properties = advertisement_properties("Bob", FP_A.upper(), 1)
    assert properties == {b"name": b"bob", b"fp": FP_A.encode(), b"v": b"1"}
    sighting = parse(properties)
    assert sighting == Sighting(instance="bob", name="bob", fingerprint=FP_A, addresses=("192.0.2.1",),
                                port=7000, versions=(1,))
    assert sighting.compatible


def test_own_advertisement_refuses_what_peers_would_reject() -> None:
    with pytest.raises(ConfigError):
        advertisement_properties("-bob", FP_A)
    with pytest.raises(IdentityError):
        advertisement_properties("bob", "pq1:short")
    with pytest.raises(ValueError):
        advertisement_properties("bob", FP_A, 0)
    with pytest.raises(ValueError):
        advertisement_properties("bob", FP_A, [])
    assert advertisement_properties("bob", FP_A, [2, 1, 2])[b"v"] == b"1,2"


def test_accepts_text_properties_case_insensitive_keys_and_unknown_keys() -> None:
    sighting = parse({"NAME": "bob", "Fp": FP_A.upper(), "v": "1", "future": None,
                      b"other": "\u00e9t\u00e9".encode()})
    assert (sighting.name, sighting.fingerprint) == ("bob", FP_A)


def test_bare_instance_label_and_case_folding() -> None:
    assert parse(instance="Bob").instance == "bob"
    assert parse(instance="BOB._PQTUNNEL._TCP.LOCAL.").instance == "bob"


def test_instance_name_need_not_match_the_claimed_name() -> None:
    """zeroconf renames a clashing instance to bob-2; the TXT name is the claim that matters."""
    sighting = parse(instance="bob-2._pqtunnel._tcp.local.")
    assert (sighting.instance, sighting.name) == ("bob-2", "bob")


@pytest.mark.parametrize("instance, reason", [
    (None, "not text"),
    (b"bob._pqtunnel._tcp.local.", "not text"),
    ("bob._http._tcp.local.", "not a _pqtunnel._tcp.local. instance"),
    ("._pqtunnel._tcp.local.", "1-63 bytes"),
    ("x" * 64 + "._pqtunnel._tcp.local.", "1-63 bytes"),
    ("x" * 1000, "too long"),
    ("bob\x1b[31m", "control characters"),
    ("bob\ud800", "control characters"),
])
def test_rejects_bad_instance_names(instance: object, reason: str) -> None:
    assert reason in reason_of(instance=instance)


@pytest.mark.parametrize("missing", [b"name", b"fp", b"v"])
def test_rejects_missing_txt_keys(missing: bytes) -> None:
    properties = props()
    del properties[missing]
    assert reason_of(properties) == f"TXT key {missing.decode()!r} missing"


@pytest.mark.parametrize("key", [b"name", b"fp", b"v"])
def test_rejects_txt_keys_without_value(key: bytes) -> None:
    properties: dict[bytes, bytes | None] = dict(props())
    properties[key] = None
    assert "has no value" in reason_of(properties)


@pytest.mark.parametrize("properties, reason", [
    (None, "not a key/value map"),
    ([(b"name", b"bob")], "not a key/value map"),
    (b"name=bob", "not a key/value map"),
    ({**props(), 7: b"x"}, "TXT key has type int"),
    ({**props(), b"fp": 7}, "has type int"),
    ({**props(), b"fp": [FP_A]}, "has type list"),
    ({**props(), b"": b"x"}, "empty"),
    ({**props(), b"a=b": b"x"}, "contains '='"),
    ({**props(), b"FP": FP_B.encode()}, "more than once"),
    ({**props(), b"junk": b"x" * 300}, "longer than 255 bytes"),
    ({**props(), "junk": "x" * 300}, "longer than 255 bytes"),
    ({**props(), **{f"k{i}".encode(): b"x" * 200 for i in range(8)}}, "TXT record longer than 1300 bytes"),
    ({**props(), **{f"k{i}".encode(): None for i in range(40)}}, "keys (at most 32)"),
])
def test_rejects_malformed_txt_records(properties: object, reason: str) -> None:
    assert reason in reason_of(properties)


@pytest.mark.parametrize("name, reason", [
    ("-bob", "invalid advertised name"),
    ("bob_1", "invalid advertised name"),
    ("bob.evil", "invalid advertised name"),
    ("a" * 64, "longer than 63 bytes"),
    ("b\u00f6b", "not ASCII"),
    ("bob\n", "control characters"),
    (" bob", "spaces"),
    ("", "invalid advertised name"),
])
def test_rejects_names_that_are_not_dns_labels(name: str, reason: str) -> None:
    properties = props()
    properties[b"name"] = name.encode()
    assert reason in reason_of(properties)


def test_upper_case_name_is_normalised() -> None:
    assert parse(props(name="BoB")).name == "bob"


@pytest.mark.parametrize("fp", [
    "pq1:short",
    "xx1:" + "a" * 32,
    "pq1:" + "1" * 32,  # '1' is not in the base32 alphabet
    "pq1:" + "a" * 33,
    "pq1:" + "a" * 60,
    FP_A + " ",
])
def test_rejects_bad_fingerprints(fp: str) -> None:
    reason = reason_of(props(fp=fp))
    assert "fingerprint" in reason or "longer than" in reason or "spaces" in reason


def test_rejects_non_ascii_fingerprint_bytes() -> None:
    properties = props()
    properties[b"fp"] = b"pq1:\xff\xfe" + b"a" * 30
    assert reason_of(properties) == "TXT 'fp' is not ASCII"


def test_unknown_protocol_version_is_kept_but_incompatible() -> None:
    sighting = parse(props(v="2"))
    assert sighting.versions == (2,) and not sighting.compatible
    both = parse(props(v="2,1,1"))
    assert both.versions == (1, 2) and both.compatible


@pytest.mark.parametrize("v", ["", "0", "256", "abc", "1.0", "1,", ",1", "+1", "1_0", "\u0661", " 1",
                               "1,2,3,4,5,6,7,8,9", "9" * 40])
def test_rejects_bad_versions(v: str) -> None:
    reason_of(props(v=v))


@pytest.mark.parametrize("port", [0, -1, 65536, "7000", 7000.0, True, None, b"\x1b\x58"])
def test_rejects_bad_ports(port: object) -> None:
    assert "port" in reason_of(port=port)


@pytest.mark.parametrize("addresses, reason", [
    ([], "no address"),
    (None, "not a list"),
    ("192.0.2.1", "not a list"),
    (b"\xc0\x00\x02\x01", "not a list"),
    (["not-an-ip"], "not an IP address"),
    (["192.0.2.1", "example.com"], "not an IP address"),
    ([b"\x7f\x00\x00"], "packed address has 3 bytes"),
    ([7], "has type int"),
    (["0.0.0.0"], "cannot be dialled"),
    (["::"], "cannot be dialled"),
    (["224.0.0.251"], "cannot be dialled"),
    (["ff02::fb"], "cannot be dialled"),
    (["192.0.2.1\n"], "not an IP address"),
    (["1" * 100], "not an IP address"),
    ([f"192.0.2.{i}" for i in range(1, 18)], "more than 16 addresses"),
])
def test_rejects_bad_addresses(addresses: object, reason: str) -> None:
    assert reason in reason_of(addresses=addresses)


def test_addresses_are_deduplicated_and_ordered() -> None:
    sighting = parse(addresses=["2001:db8::1", b"\xc0\x00\x02\x09", "192.0.2.1", "192.0.2.9", "fe80::1%eth0"])
    assert sighting.addresses == ("192.0.2.1", "192.0.2.9", "2001:db8::1", "fe80::1%eth0")


def test_invalid_advertisement_is_a_protocol_error_naming_the_instance() -> None:
    with pytest.raises(ProtocolError) as info:
        parse(props(fp="nope"), instance="evil\x00._pqtunnel._tcp.local.")
    assert isinstance(info.value, InvalidAdvertisement)
    assert "control characters" in info.value.reason and "\\x00" in str(info.value)
    with pytest.raises(InvalidAdvertisement) as info:
        parse(props(fp="nope"), instance="x" * 63)
    assert len(str(info.value)) < 200 and "fingerprint" in str(info.value)


# --- fuzzing ------------------------------------------------------------------------------------------------

_scalars = st.one_of(st.none(), st.binary(max_size=300), st.text(max_size=300), st.integers(), st.floats(),
                     st.booleans())
_values = st.one_of(_scalars, st.lists(_scalars, max_size=3))
_keys = st.one_of(st.binary(max_size=40), st.text(max_size=40), st.integers(), st.none(),
                  st.sampled_from([b"name", b"fp", b"v", "NAME", "Fp", b"V"]))
_good_values = {b"name": st.sampled_from([b"bob", b"BOB", b"-x", b"a" * 63, b"a" * 64, b"b\xc3\xb6b"]),
                b"fp": st.sampled_from([FP_A.encode(), FP_A.upper().encode(), b"pq1:", b"pq1:" + b"a" * 32]),
                b"v": st.sampled_from([b"1", b"2", b"1,2", b"0", b"x", b"1" * 40])}
_addresses = st.one_of(
    st.lists(st.one_of(st.ip_addresses().map(str), st.ip_addresses().map(lambda ip: ip.packed),
                       st.text(max_size=70), st.binary(max_size=20), st.integers(), st.none()), max_size=20),
    st.text(max_size=20), st.none(), st.integers(),
)
_ports = st.one_of(st.integers(min_value=-10, max_value=70000), st.text(max_size=6), st.none(), st.booleans(),
                   st.floats())
_instances = st.one_of(st.text(max_size=90), st.text(max_size=40).map(lambda t: t + "._pqtunnel._tcp.local."),
                       st.none(), st.binary(max_size=10))


@st.composite
def _near_valid_properties(draw: st.DrawFn) -> dict:
    """A real record with a few fields replaced: reaches the deep checks more often."""
    properties: dict = {key: draw(strategy) for key, strategy in _good_values.items()}
    for key in draw(st.lists(st.sampled_from(sorted(properties)), max_size=2, unique=True)):
        if draw(st.booleans()):
            del properties[key]
        else:
            properties[key] = draw(_values)
    properties.update(draw(st.dictionaries(_keys, _values, max_size=4)))
    return properties


def _assert_valid(sighting: Sighting) -> None:
    assert validate_name(sighting.name) == sighting.name
    assert normalise_fingerprint(sighting.fingerprint) == sighting.fingerprint
    assert 1 <= sighting.port <= 65535
    assert 1 <= len(sighting.addresses) <= 16
    assert sighting.versions and all(1 <= v <= 255 for v in sighting.versions)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(properties=st.one_of(st.dictionaries(_keys, _values, max_size=40), _near_valid_properties(), _values),
       addresses=_addresses, port=_ports, instance=_instances)
def test_fuzz_parse_only_raises_invalid_advertisement(properties: object, addresses: object, port: object,
                                                     instance: object) -> None:
    try:
        sighting = parse_advertisement(instance, properties, addresses, port)
    except InvalidAdvertisement as exc:
        assert exc.reason and len(str(exc)) < 400
    else:
        _assert_valid(sighting)


# --- PeerTable -------------------------------------------------------------------------------------------


def sighting(instance: str = "bob", name: str | None = None, fp: str = FP_A, port: int = 7000,
             addresses: tuple[str, ...] = ("192.0.2.1",), versions: tuple[int, ...] = (1,)) -> Sighting:
    return Sighting(instance=instance, name=name or instance, fingerprint=fp, addresses=addresses, port=port,
                    versions=versions)


def test_table_appear_refresh_change_leave() -> None:
    table = PeerTable()
    [appeared] = table.apply(sighting(), 0.0)
    assert isinstance(appeared, PeerAppeared) and appeared.peer.port == 7000 and not appeared.peer.conflict
    assert table.apply(sighting(), 1.0) == []  # a refresh is not an event
    [changed] = table.apply(sighting(port=7001, addresses=("192.0.2.2",)), 2.0)
    assert isinstance(changed, PeerChanged)
    assert changed.changes == ("addresses", "port") and changed.previous.port == 7000
    [left] = table.remove("bob", 4.0)
    assert left == PeerLeft(changed.peer, LeaveReason.REMOVED)
    assert table.remove("bob", 5.0) == [] and len(table) == 0 and "bob" not in table


def test_table_expires_entries_not_refreshed() -> None:
    table = PeerTable(ttl=10.0)
    table.apply(sighting("bob"), 0.0)
    table.apply(sighting("carol"), 5.0)
    assert table.next_deadline() == 10.0
    assert table.tick(9.9) == []
    table.apply(sighting("bob"), 9.9)  # refreshed just in time
    [left] = table.tick(15.0)
    assert left.peer.instance == "carol" and left.reason is LeaveReason.EXPIRED
    assert table.next_deadline() == pytest.approx(19.9)
    assert [e.peer.instance for e in table.tick(20.0)] == ["bob"]
    assert table.next_deadline() is None


def test_table_caps_its_size_under_a_flood() -> None:
    table = PeerTable(max_entries=8)
    events = [e for i in range(1000) for e in table.apply(sighting(f"n{i}"), float(i) / 1000)]
    assert len(events) == 8 and len(table) == 8 and table.stats.dropped_full == 992
    table.remove("n0", 2.0)
    assert [type(e) for e in table.apply(sighting("late"), 2.0)] == [PeerAppeared]
    assert "late" in table and len(table) == 8


def test_table_rate_limits_a_flapping_peer_but_delivers_its_latest_state() -> None:
    table = PeerTable(change_burst=2, change_interval=10.0)
    assert len(table.apply(sighting(port=1), 0.0)) == 1  # appearance takes a token
    assert len(table.apply(sighting(port=2), 0.1)) == 1  # second token
    for port in range(3, 50):  # flapping: everything else is held
        assert table.apply(sighting(port=port), 0.2) == []
    assert table.stats.throttled == 47
    assert [p.port for p in table.peers()] == [2]
    ready = table.next_deadline()
    assert ready == pytest.approx(10.0)
    assert table.tick(ready - 0.5) == []
    [changed] = table.tick(ready)
    assert isinstance(changed, PeerChanged) and (changed.previous.port, changed.peer.port) == (2, 49)
    assert table.tick(ready + 1) == []


def test_table_held_change_reverted_before_delivery_is_dropped() -> None:
    table = PeerTable(change_burst=1, change_interval=10.0)
    table.apply(sighting(port=1), 0.0)
    assert table.apply(sighting(port=2), 1.0) == []
    assert table.apply(sighting(port=1), 2.0) == []
    assert table.tick(30.0) == []


def test_table_rate_limits_leave_and_rejoin_flapping() -> None:
    table = PeerTable(change_burst=2, change_interval=10.0)
    events: list[PeerEvent] = []
    for step in range(20):
        now = step * 0.01
        events += table.apply(sighting(), now)
        events += table.remove("bob", now)
    assert [type(e) for e in events] == [PeerAppeared, PeerLeft, PeerAppeared, PeerLeft]


def test_table_held_appearance_that_leaves_is_never_reported() -> None:
    table = PeerTable(change_burst=1, change_interval=10.0)
    table.apply(sighting(), 0.0)
    table.remove("bob", 0.1)
    assert table.apply(sighting(), 0.2) == []  # held: no token
    assert table.peers() == []
    assert table.remove("bob", 0.3) == []
    assert table.tick(100.0) == []


def test_table_flags_two_fingerprints_claiming_one_name() -> None:
    table = PeerTable()
    table.apply(sighting("bob", fp=FP_A), 0.0)
    events = table.apply(sighting("bob-2", name="bob", fp=FP_B, addresses=("192.0.2.66",)), 1.0)
    appeared, flipped = events
    assert isinstance(appeared, PeerAppeared) and appeared.peer.conflict
    assert isinstance(flipped, PeerChanged) and flipped.peer.instance == "bob" and flipped.changes == ("conflict",)
    assert {p.fingerprint for p in table.candidates("bob")} == {FP_A, FP_B}
    assert all(p.conflict for p in table.candidates("bob"))
    assert table.conflicts() == {"bob": tuple(sorted([FP_A, FP_B]))} == {"bob": table.fingerprints("bob")}
    left, cleared = table.remove("bob-2", 2.0)
    assert isinstance(left, PeerLeft) and left.peer.conflict
    assert isinstance(cleared, PeerChanged) and not cleared.peer.conflict and cleared.peer.instance == "bob"
    assert table.conflicts() == {}


def test_table_same_fingerprint_on_two_instances_is_no_conflict() -> None:
    table = PeerTable()
    table.apply(sighting("bob"), 0.0)
    [appeared] = table.apply(sighting("bob-2", name="bob"), 0.0)
    assert not appeared.peer.conflict and len(table.candidates("bob")) == 2


def test_table_fingerprint_change_on_one_instance_keeps_both_candidates() -> None:
    """A new key on a known instance is not silently accepted: both are candidates until one goes."""
    table = PeerTable(ttl=10.0)
    table.apply(sighting("bob", fp=FP_A), 0.0)
    appeared, flipped = table.apply(sighting("bob", fp=FP_B, addresses=("192.0.2.66",)), 5.0)
    assert isinstance(appeared, PeerAppeared) and appeared.peer.fingerprint == FP_B and appeared.peer.conflict
    assert isinstance(flipped, PeerChanged) and flipped.peer.fingerprint == FP_A and flipped.changes == ("conflict",)
    assert [p.fingerprint for p in table.candidates("bob")] == sorted([FP_A, FP_B])
    table.apply(sighting("bob", fp=FP_B, addresses=("192.0.2.66",)), 12.0)  # only the new one is re-confirmed
    left, cleared = table.tick(12.0)
    assert isinstance(left, PeerLeft) and left.peer.fingerprint == FP_A and left.reason is LeaveReason.EXPIRED
    assert isinstance(cleared, PeerChanged) and cleared.peer.fingerprint == FP_B and not cleared.peer.conflict


def test_table_goodbye_removes_every_candidate_of_the_instance() -> None:
    table = PeerTable()
    table.apply(sighting("bob", fp=FP_A), 0.0)
    table.apply(sighting("bob", fp=FP_B), 0.0)
    events = table.remove("bob", 1.0)
    assert sorted(e.peer.fingerprint for e in events if isinstance(e, PeerLeft)) == sorted([FP_A, FP_B])
    assert len(table) == 0 and table.conflicts() == {}


def test_table_flood_of_fingerprints_on_one_instance_is_capped_and_rate_limited() -> None:
    table = PeerTable(change_burst=3, change_interval=10.0)
    events = [e for _ in range(200) for e in table.apply(sighting("bob", fp=random_fingerprint()), 1.0)]
    assert len([e for e in events if isinstance(e, PeerAppeared)]) == 3  # the 4th candidate is held
    assert len(table) == 4 and table.stats.dropped_fingerprints == 196
    assert table.apply(sighting("carol"), 1.0)  # other instances are unaffected


def test_table_instance_claiming_a_new_name_leaves_and_reappears() -> None:
    table = PeerTable()
    table.apply(sighting("bob"), 0.0)
    left, appeared = table.apply(sighting("bob", name="carol"), 1.0)
    assert isinstance(left, PeerLeft) and left.reason is LeaveReason.RENAMED and left.peer.name == "bob"
    assert isinstance(appeared, PeerAppeared) and appeared.peer.name == "carol"
    assert table.candidates("bob") == [] and len(table.candidates("carol")) == 1


def test_table_rejects_nonsense_limits() -> None:
    with pytest.raises(ValueError):
        PeerTable(ttl=0)
    with pytest.raises(ValueError):
        PeerTable(max_entries=0)


def test_peer_compatibility_follows_versions() -> None:
    assert not Peer.from_sighting(sighting(versions=(2,)), conflict=False).compatible


def test_log_limiter_counts_suppressed_lines() -> None:
    limiter = LogLimiter(burst=2, interval=10.0)
    assert [limiter.allow("x", 0.0) for _ in range(5)] == [(True, 0), (True, 0), (False, 0), (False, 0), (False, 0)]
    assert limiter.allow("other", 0.0) == (True, 0)
    assert limiter.allow("x", 10.0) == (True, 3)
    assert limiter.allow("x", 10.0) == (False, 0)



def test_events_are_described_for_one_line_logs() -> None:
    table = PeerTable()
    table.apply(sighting(port=7000, versions=(1,)), 0.0)
    [changed] = table.apply(sighting(port=7001, versions=(1, 2)), 1.0)
    assert describe_changes(changed) == "port 7000 -> 7001; versions 1 -> 1,2"
    assert compatibility_note(changed.peer) == ""
    assert compatibility_note(Peer.from_sighting(sighting(versions=(2, 3)), conflict=False)) == (
        "; incompatible: it speaks protocol 2,3, this node speaks 1")
