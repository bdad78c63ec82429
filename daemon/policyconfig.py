"""The ``[policy]`` section of ``config.toml``, read into ``pqtunnel.policy.AccessRules``.

Every mistake is one ConfigError naming the file, the line of the table when it can be
found, the table and the key, and what was expected, e.g.::

    /home/bob/config.toml:14: [[policy.grant]] #2: src: "grp:ops" is not a peer name, group:NAME, pq1:... or *

The evaluation itself is ``pqtunnel.policy``'s; this module only turns text into data and
checks what can be checked before a single peer connects (suite names, networks, sizes,
and that a trigger does not demand a suite the node never allows).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pqtunnel.crypto.suites import SUITES, Suite
from pqtunnel.errors import ConfigError, IdentityError
from pqtunnel.identity import normalise_fingerprint
from pqtunnel.names import validate_name
from pqtunnel.policy import (
    ANYONE,
    GROUP_PREFIX,
    AccessRules,
    Grant,
    LegacyRules,
    Network,
    PolicyTest,
    RateLimit,
    Trigger,
    parse_destination,
    parse_subject,
    suite_rank,
)

SECTION_KEYS = {"grant", "trigger", "legacy", "test"}
GRANT_KEYS = {"src", "dst", "min_suite", "from"}
TRIGGER_KEYS = {"outside", "min_suite"}
LEGACY_KEYS = {"services", "rate", "burst"}
TEST_KEYS = {"src", "accept", "deny", "from", "suite"}
UNITS = {"": 1, "b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2, "gb": 1000**3, "gib": 1024**3}
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


class PolicyConfigError(ConfigError):
    """The ``[policy]`` section cannot be used as written."""


class _Where:
    """Names a place in the file for error messages: ``FILE:LINE: [[policy.grant]] #2: KEY``."""

    def __init__(self, path: Path | None, source: str, table: str, index: int | None = None) -> None:
        self.path, self.source, self.table, self.index = path, source, table, index

    def error(self, key: str | None, message: str) -> PolicyConfigError:
        line = header_line(self.path, self.table, self.index or 1)
        where = f"{self.source}:{line}" if line else self.source
        table = f"{self.table} #{self.index}" if self.index is not None else self.table
        return PolicyConfigError(f"{where}: {table}: {key + ': ' if key else ''}{message}")


def header_line(path: Path | None, table: str, index: int) -> int | None:
    """The line of the ``index``-th ``table`` header (``[[policy.grant]]``), if the file says so plainly."""
    if path is None:
        return None
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    header = re.compile(r"^\s*" + re.escape(table).replace(r"\ ", r"\s*") + r"\s*(#.*)?$")
    seen = 0
    for number, line in enumerate(lines, 1):
        if header.match(line):
            seen += 1
            if seen == index:
                return number
    return None


_ARRAY_PATH = re.compile(r"^policy\.(grant|trigger|test)\[(\d+)\]")


def schema_lines(path: Path | None) -> Callable[[str], int | None]:
    """For configschema: the line of the ``[[policy.grant]]`` (``[policy.legacy]``, ``[policy]``)
    header a schema problem's key path points into; None elsewhere or when not found."""

    def locate(key: str) -> int | None:
        if match := _ARRAY_PATH.match(key):
            return header_line(path, f"[[policy.{match[1]}]]", int(match[2]))
        if key.startswith("policy.legacy"):
            return header_line(path, "[policy.legacy]", 1)
        return header_line(path, "[policy]", 1) if key.startswith("policy") else None

    return locate


def parse_policy(data: dict[str, Any], source: str, path: Path | None,
                 node_suites: tuple[Suite, ...]) -> AccessRules | None:
    """``AccessRules`` from the whole parsed config file (None when it has no ``[policy]``)."""
    if "policy" not in data:
        return None
    section = data["policy"]
    where = _Where(path, source, "[policy]")
    if not isinstance(section, dict):
        raise where.error(None, "must be a table")
    unknown = set(section) - SECTION_KEYS
    if unknown:
        raise where.error(None, f"unknown setting(s) {', '.join(sorted(unknown))} "
                                "(expected [[policy.grant]], [[policy.trigger]], [policy.legacy], [[policy.test]])")
    grants = tuple(_grant(item, _Where(path, source, "[[policy.grant]]", i), i)
                   for i, item in enumerate(_array(section, "grant", where), 1))
    triggers = tuple(_trigger(item, _Where(path, source, "[[policy.trigger]]", i), i, node_suites)
                     for i, item in enumerate(_array(section, "trigger", where), 1))
    legacy = _legacy(section.get("legacy", {}), _Where(path, source, "[policy.legacy]"))
    tests = tuple(_test(item, _Where(path, source, "[[policy.test]]", i), i)
                  for i, item in enumerate(_array(section, "test", where), 1))
    return AccessRules(grants=grants, triggers=triggers, legacy=legacy, tests=tests, source=source)


def _array(section: dict[str, Any], key: str, where: _Where) -> list[dict[str, Any]]:
    value = section.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise where.error(key, f"write each one as a [[policy.{key}]] table")
    return value


def _known(table: dict[str, Any], keys: set[str], where: _Where) -> None:
    unknown = set(table) - keys
    if unknown:
        raise where.error(None, f"unknown setting(s) {', '.join(sorted(unknown))} (expected {', '.join(sorted(keys))})")


def _strings(table: dict[str, Any], key: str, where: _Where, *, required: bool = True,
             empty: bool = False) -> list[str]:
    if key not in table:
        if required:
            raise where.error(key, "is missing")
        return []
    value = table[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or (not value and not empty):
        raise where.error(key, f"must be a {'' if empty else 'non-empty '}list of strings")
    return value


def _grant(table: dict[str, Any], where: _Where, index: int) -> Grant:
    _known(table, GRANT_KEYS, where)
    src = tuple(_source_item(item, where) for item in _strings(table, "src", where))
    dst = tuple(_destination_item(item, where) for item in _strings(table, "dst", where))
    networks = _networks(table, "from", where) if "from" in table else None
    return Grant(src, dst, min_suite=_suite(table, "min_suite", where, required=False), networks=networks,
                 index=index)


def _source_item(item: str, where: _Where) -> str:
    """``*``, ``group:NAME``, ``pq1:...`` or a peer name, normalised (lower case)."""
    text = item.strip()
    try:
        if text == ANYONE:
            return ANYONE
        if text.lower().startswith(GROUP_PREFIX):
            return GROUP_PREFIX + validate_name(text[len(GROUP_PREFIX):], "group name")
        if text.lower().startswith("pq1:"):
            return normalise_fingerprint(text)
        return validate_name(text, "peer name")
    except (ConfigError, IdentityError) as exc:
        raise where.error("src", f"{item!r} is not a peer name, group:NAME, pq1:... or * ({exc})") from None


def _destination_item(item: str, where: _Where) -> str:
    """``*``, ``port:N`` or a service name, normalised."""
    if item.strip() == ANYONE:
        return ANYONE
    try:
        target = parse_destination(item)
    except ConfigError as exc:
        raise where.error("dst", f"{item!r} is not a service name, port:N or * ({exc})") from None
    return f"port:{target['port']}" if "port" in target else target["service"]


def _networks(table: dict[str, Any], key: str, where: _Where) -> tuple[Network, ...]:
    networks = []
    for item in _strings(table, key, where):
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise where.error(key, f"{item!r} is not a network (e.g. 10.0.0.0/8, fd00::/8, 192.0.2.7)") from None
    return tuple(networks)


def _suite(table: dict[str, Any], key: str, where: _Where, *, required: bool) -> str | None:
    value = table.get(key)
    if value is None:
        if required:
            raise where.error(key, "is missing")
        return None
    if not isinstance(value, str) or value.lower() not in SUITES:
        raise where.error(key, f"{value!r} is not a suite; choose one of: {', '.join(SUITES)}")
    return value.lower()


def _trigger(table: dict[str, Any], where: _Where, index: int, node_suites: tuple[Suite, ...]) -> Trigger:
    _known(table, TRIGGER_KEYS, where)
    minimum = _suite(table, "min_suite", where, required=True)
    assert minimum is not None
    if not any(s.rank >= suite_rank(minimum) for s in node_suites):
        raise where.error("min_suite", f"{minimum} is above every suite in [node] suites "
                                       f"({', '.join(s.name for s in node_suites)}): every session it covers would fail")
    return Trigger(_networks(table, "outside", where), minimum, index)


def _legacy(table: Any, where: _Where) -> LegacyRules:
    if not isinstance(table, dict):
        raise where.error(None, "must be a table")
    _known(table, LEGACY_KEYS, where)
    services = []
    for name in _strings(table, "services", where, required=False, empty=True):
        try:
            services.append(validate_name(name, "service name"))
        except ConfigError as exc:
            raise where.error("services", str(exc)) from None
    if "burst" in table and "rate" not in table:
        raise where.error("burst", "needs a rate")
    limit = None
    if "rate" in table:
        rate = parse_size(table["rate"], where, "rate", per_second=True)
        burst = parse_size(table["burst"], where, "burst") if "burst" in table else rate
        limit = RateLimit(rate, burst)
    return LegacyRules(tuple(services), limit)


def parse_size(value: Any, where: _Where, key: str, *, per_second: bool = False) -> int:
    """``262144``, ``"256KiB"``, ``"1.5 MB"`` (and ``"256KiB/s"`` for a rate) as a positive number of bytes."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    example = '"256KiB/s"' if per_second else '"256KiB"'
    if not isinstance(text, str):
        raise where.error(key, f"must be a size such as {example}")
    if per_second:
        text = text.strip().removesuffix("/s")
    match = SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in UNITS:
        raise where.error(key, f"{value!r} is not a size such as {example} (units: B, kB, KiB, MB, MiB, GB, GiB)")
    size = int(float(match.group(1)) * UNITS[unit])
    if size < 1:
        raise where.error(key, f"{value!r} must be at least 1 byte")
    return size


def _test(table: dict[str, Any], where: _Where, index: int) -> PolicyTest:
    _known(table, TEST_KEYS, where)
    src = table.get("src")
    if not isinstance(src, str) or not src.strip():
        raise where.error("src", "must be a peer: NAME, pq1:..., group:NAME (or several, comma-separated)")
    accept = _strings(table, "accept", where, required=False, empty=True)
    deny = _strings(table, "deny", where, required=False, empty=True)
    if not accept and not deny:
        raise where.error(None, "needs accept or deny (what src must and must not reach)")
    try:
        parse_subject(src)
    except ConfigError as exc:
        raise where.error("src", str(exc)) from None
    for key, items in (("accept", accept), ("deny", deny)):
        for item in items:
            try:
                parse_destination(item)
            except ConfigError as exc:
                raise where.error(key, f"{item!r} is not a service name or port:N ({exc})") from None
    address = table.get("from")
    if address is not None:
        try:
            ipaddress.ip_address(str(address))
        except ValueError:
            raise where.error("from", f"{address!r} is not an IP address") from None
    return PolicyTest(src.strip(), tuple(accept), tuple(deny), address=address,
                      suite=_suite(table, "suite", where, required=False), index=index)
