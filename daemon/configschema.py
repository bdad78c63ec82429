"""The shape of config.toml, declared once: which tables and keys exist and their types.

``problems(data, source)`` checks a parsed file against ``SCHEMA`` and returns every
problem, one line each naming the file, the key and the type expected (like `sshd -t`):
a typo such as ``[service]``, an unknown key, ``mdns = "false"`` (a string where a boolean
belongs), ``log_level = "verbose"``, ``keepalive`` longer than ``dead_after``, an unknown
key anywhere, down to ``[[policy.grant]]``. The loaders in config.py then turn values into
settings (addresses, suites, durations); what only they can judge (an etcd URL, a date, a
policy name) is reported by their strict readers, which check-config runs one by one
(daemon/configcheck.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

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


def _positive_integer(value: Any) -> bool:
    return _integer(value) and value > 0


def _non_empty_strings(value: Any) -> bool:
    return _strings(value) and bool(value)


def _size(value: Any) -> bool:
    return _string(value) or _positive_integer(value)


def one_of(*choices: str) -> Check:
    return lambda value: value in choices


@dataclass(frozen=True)
class TablesOf:
    """An array of tables (``[[policy.grant]]``), each one checked against ``keys``."""

    keys: dict[str, Any]


STRING, BOOLEAN, INTEGER, NUMBER = (_string, "a string"), (_boolean, "true or false"), (_integer, "an integer"), \
    (_number, "a number")
STRINGS, INTEGERS = (_strings, "a list of strings"), (_integers, "a list of integers")
LOG_LEVELS = ("debug", "info", "warning", "error")
POSITIVE = (_positive_integer, "a positive integer")
LIMIT_KEYS = ("streams_per_session", "exec_processes", "exec_processes_per_peer", "buffered_bytes",
              "buffered_bytes_per_session", "handshakes", "handshakes_per_address")
"""config.ResourceLimits's fields (tests/unit/test_config_schema.py keeps them equal)."""
SUITE_NAME = (_string, 'a suite name ("classical", "hybrid", "pq-strong")')
SIZE = (_size, 'a size like "256KiB" or a number of bytes')

Spec = Union[dict[str, Any], tuple[Check, str], TablesOf, None]
"""A table (its keys and their specs), one value (a check and what it expects), an array of
tables, or None (anything: a table read only by its own reader)."""

POLICY: dict[str, Spec] = {
    "grant": TablesOf({"src": STRINGS, "dst": STRINGS, "min_suite": SUITE_NAME, "from": STRINGS}),
    "trigger": TablesOf({"outside": STRINGS, "min_suite": SUITE_NAME}),
    "legacy": {"services": STRINGS, "rate": SIZE, "burst": SIZE},
    "test": TablesOf({"src": STRING, "accept": STRINGS, "deny": STRINGS, "from": STRING, "suite": SUITE_NAME}),
}

SCHEMA: dict[str, Spec] = {
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
    "limits": {key: POSITIVE for key in LIMIT_KEYS},
    "audit": {"path": STRING, "required": BOOLEAN, "max_bytes": INTEGER},
    "metrics": {"listen": STRING},
    "ha": {"store": (one_of("local", "etcd"), '"local" or "etcd"'),
           "etcd": (_non_empty_strings, 'a non-empty list of URLs like "http://127.0.0.1:2379"'),
           "replica": (_string, 'a name like "r1"'), "path": (_string, "a file path")},
    "migration": {"accept_until": (_string, 'a date like "2027-06-30"')},
    "policy": POLICY,
}


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


Locate = Callable[[str], Union[int, None]]
"""The line of the file a key path (``policy.grant[2].to``) is written on, if known."""


def problems(data: dict[str, Any], source: str, locate: Locate | None = None) -> list[str]:
    """Every way ``data`` departs from SCHEMA, one line each; ``locate`` adds line numbers
    (policyconfig.schema_lines: the ``[[policy.*]]`` tables, as the policy's own errors have)."""
    found: list[tuple[str, str]] = []  # (key path, the problem)
    for table, value in data.items():
        if table not in SCHEMA:
            found.append((table, f"unknown table or key {table!r} (known: {', '.join(SCHEMA)})"))
            continue
        spec = SCHEMA[table]
        if isinstance(spec, tuple):
            check, expected = spec
            if not check(value):
                found.append((table, f"[{table}] must be {expected}"))
        elif spec is not None:
            found += _value_problems(value, spec, table)
    lines = [f"{source}{_line_of(path, locate)}: {problem}" for path, problem in found]
    return lines + _cross_checks(data, source)


def _line_of(path: str, locate: Locate | None) -> str:
    number = locate(path) if locate is not None else None
    return f":{number}" if number else ""


def _value_problems(value: Any, spec: Spec, path: str) -> list[tuple[str, str]]:
    """``value`` found at ``path`` (``policy.grant[2].src``) against ``spec``."""
    if spec is None:
        return []
    if isinstance(spec, tuple):
        check, expected = spec
        return [] if check(value) else [(path, f"{path} must be {expected}, not {_describe(value)}")]
    if isinstance(spec, TablesOf):
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            return [(path, f"{path} must be tables written [[{path}]], not {_describe(value)}")]
        return [problem for index, item in enumerate(value, 1)
                for problem in _value_problems(item, spec.keys, f"{path}[{index}]")]
    if not isinstance(value, dict):
        return [(path, f"{path} must be a table ([{path}]), not {_describe(value)}")]
    found: list[tuple[str, str]] = []
    for key, item in value.items():
        if key not in spec:
            found.append((f"{path}.{key}", f"unknown setting {path}.{key} (known: {', '.join(spec)})"))
        else:
            found += _value_problems(item, spec[key], f"{path}.{key}")
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
