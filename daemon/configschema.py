"""The shape of config.toml, declared once: which tables and keys exist and their types.

``problems(data, source)`` checks a parsed file against ``SCHEMA`` and returns every
problem, one line each naming the file, the key and the type expected (like `sshd -t`):
a typo such as ``[service]``, an unknown key, ``mdns = "false"`` (a string where a boolean
belongs), ``log_level = "verbose"``, ``keepalive`` longer than ``dead_after``. The loaders
in config.py then turn values into settings (addresses, suites, durations). Tables marked
None here have strict readers of their own, with their own precise messages: ``[policy]``
(policyconfig.py), ``[limits]``, ``[ha]`` and ``[migration]`` (config.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Check = Callable[[Any], bool]


def _string(value: Any) -> bool:
    return isinstance(value, str)


def _boolean(value: Any) -> bool:
    return isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _integers(value: Any) -> bool:
    return isinstance(value, list) and all(_integer(v) for v in value)


def _address_or_addresses(value: Any) -> bool:
    return _string(value) or (_strings(value) and bool(value))


def _service(value: Any) -> bool:
    return _string(value) or isinstance(value, dict)


def _table_of(check: Check) -> Check:
    return lambda value: isinstance(value, dict) and all(check(v) for v in value.values())


def one_of(*choices: str) -> Check:
    return lambda value: value in choices


STRING, BOOLEAN, INTEGER, NUMBER = (_string, "a string"), (_boolean, "true or false"), (_integer, "an integer"), \
    (_number, "a number")
STRINGS, INTEGERS = (_strings, "a list of strings"), (_integers, "a list of integers")
LOG_LEVELS = ("debug", "info", "warning", "error")

SCHEMA: dict[str, dict[str, tuple[Check, str]] | tuple[Check, str] | None] = {
    "node": {
        "listen": STRING, "socks": STRING, "suites": STRINGS, "aeads": STRINGS, "allowed_ports": INTEGERS,
        "mdns": BOOLEAN, "mdns_interfaces": STRINGS, "socks_allow_users": STRINGS,
        "log_level": (one_of(*LOG_LEVELS), "one of " + ", ".join(LOG_LEVELS)),
    },
    "peers": (_table_of(_address_or_addresses), 'a table of NAME = "HOST:PORT" or a list of them'),
    "services": (_table_of(_service), 'a table of NAME = "HOST:PORT" or { exec = [...] }'),
    "socks_users": (_table_of(_string), 'a table of USER = "PASSWORD"'),
    "timers": {"keepalive": NUMBER, "dead_after": NUMBER, "handshake_timeout": NUMBER, "rekey_after": NUMBER,
               "rekey_after_bytes": INTEGER},
    "ca": {"public": STRING, "certificate": STRING, "revoked": STRING},
    "limits": None,  # strict reader with its own messages: config._limits
    "audit": {"path": STRING, "required": BOOLEAN, "max_bytes": INTEGER},
    "metrics": {"listen": STRING},
    "ha": None,  # strict reader: config._ha_settings
    "migration": None,  # strict reader: config._migration_deadline
    "policy": None,  # its own strict reader: daemon/policyconfig.py
}


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def problems(data: dict[str, Any], source: str) -> list[str]:
    """Every way ``data`` departs from SCHEMA, one line each."""
    found: list[str] = []
    for table, value in data.items():
        if table not in SCHEMA:
            found.append(f"{source}: unknown table or key {table!r} (known: {', '.join(SCHEMA)})")
            continue
        spec = SCHEMA[table]
        if spec is None:
            continue
        if isinstance(spec, tuple):
            check, expected = spec
            if not check(value):
                found.append(f"{source}: [{table}] must be {expected}")
            continue
        if not isinstance(value, dict):
            found.append(f"{source}: {table} must be a table ([{table}]), not {_describe(value)}")
            continue
        for key, item in value.items():
            if key not in spec:
                found.append(f"{source}: unknown setting {table}.{key} (known: {', '.join(spec)})")
            elif not spec[key][0](item):
                found.append(f"{source}: {table}.{key} must be {spec[key][1]}, not {_describe(item)}")
    found += _cross_checks(data, source)
    return found


def _cross_checks(data: dict[str, Any], source: str) -> list[str]:
    timers = data.get("timers")
    if not isinstance(timers, dict):
        return []
    keepalive, dead_after = timers.get("keepalive", 10), timers.get("dead_after", 35)
    if _number(keepalive) and _number(dead_after) and keepalive >= dead_after:
        return [f"{source}: timers.keepalive ({keepalive} s) must be shorter than timers.dead_after "
                f"({dead_after} s), or a live peer is declared dead between two keepalives"]
    return []
