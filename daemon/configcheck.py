"""``pqtunnel check-config``: every problem in config.toml, one line each, like ``sshd -t``.

The declared schema (configschema.py) names every unknown key and wrong type in every
table, ``[limits]``, ``[ha]``, ``[migration]`` and ``[[policy.*]]`` included. What only a
table's own strict reader can judge (an etcd URL, a date, a peer name or network in a
grant, ``etcd`` without ``store = "etcd"``) is then asked of each reader on its own, so a
mistake in ``[ha]`` does not hide one in ``[policy]``. The daemon itself stops at the
first problem (config.load_config); this module is for listing them all.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pqtunnel.crypto.suites import DEFAULT_ALLOWED_SUITES, Suite, suite_by_name
from pqtunnel.errors import ConfigError

from .config import CONFIG_FILE, _ha_settings, _limits, _migration_deadline, read_config_file
from .configschema import problems as schema_problems
from .policyconfig import parse_policy, schema_lines

Reader = Callable[[dict[str, Any], str, Path, Path | None], object]

READERS: dict[str, Reader] = {
    "limits": lambda data, source, home, path: _limits(data["limits"], source),
    "ha": lambda data, source, home, path: _ha_settings(data["ha"], source, home),
    "migration": lambda data, source, home, path: _migration_deadline(data["migration"], source),
    "policy": lambda data, source, home, path: parse_policy(data, source, path, _node_suites(data)),
}
"""The tables whose strict readers check-config runs one by one (each after its schema check)."""


def config_problems(home: Path, config_path: Path | None = None) -> list[str]:
    """Every problem in the configuration file, one line each (empty: nothing found).

    An unreadable file (missing, not TOML, writable by others) raises ConfigError instead.
    """
    path = config_path or home / CONFIG_FILE
    if config_path is None and not path.exists():
        return []
    data = read_config_file(path)
    source = str(path)
    found = schema_problems(data, source, schema_lines(path))
    for table, read in READERS.items():
        if table in data and not schema_problems({table: data[table]}, source):
            found += _reader_problem(read, data, source, home, path)
    return found


def _reader_problem(read: Reader, data: dict[str, Any], source: str, home: Path, path: Path) -> list[str]:
    try:
        read(data, source, home, path)
    except ConfigError as exc:
        return [str(exc)]
    return []


def _node_suites(data: dict[str, Any]) -> tuple[Suite, ...]:
    """The suites ``[node]`` allows (a trigger may not demand another); the defaults when
    ``[node] suites`` is itself wrong (reported on its own line)."""
    names = data.get("node", {}).get("suites") if isinstance(data.get("node"), dict) else None
    try:
        return tuple(suite_by_name(name) for name in names) if isinstance(names, list) else DEFAULT_ALLOWED_SUITES
    except (ConfigError, AttributeError):  # a typo, or not a string
        return DEFAULT_ALLOWED_SUITES
