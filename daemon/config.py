"""Node configuration: ``HOME/config.toml`` (or ``--config``) merged with command-line flags.

Every mistake becomes a ConfigError naming the file, the key and what is expected.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pqtunnel.crypto.suites import DEFAULT_ALLOWED_SUITES, Aead, Suite, suite_by_name
from pqtunnel.errors import ConfigError
from pqtunnel.names import validate_name
from pqtunnel.policy import AccessRules
from pqtunnel.session import SessionTimers

from .configschema import problems as schema_problems
from .cpufeatures import hardware_aeads
from .policyconfig import parse_policy, schema_lines
from .migration import parse_deadline
from .stores import refuse_writable_by_others

DEFAULT_PORT = 7330
DEFAULT_LISTEN = f"0.0.0.0:{DEFAULT_PORT}"
DEFAULT_SOCKS = "127.0.0.1:1080"
CONFIG_FILE = "config.toml"
CONTROL_SOCKET = "control.sock"
AUDIT_FILE = "audit.jsonl"
NONCE_STORE_FILE = "nonces.sqlite"
HA_STORES = ("local", "etcd")
DEFAULT_REPLICA = "r1"
DEFAULT_AUDIT_MAX_BYTES = 64 * 1024 * 1024
BACKEND_ENV = "PQTUNNEL_CRYPTO_BACKEND"
DEFAULT_BACKEND = "cryptography"


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, what: str, default_port: int | None = None) -> Address:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` for IPv6) with a message that says what was wrong."""
    if not isinstance(text, str):
        raise ConfigError(f"{what}: expected a string \"HOST:PORT\", not {type(text).__name__} {text!r}")
    value = text.strip()
    host, sep, port_text = value.rpartition(":")
    if not sep:
        if default_port is None:
            raise ConfigError(f"{what}: {text!r} is not HOST:PORT")
        host, port_text = value, str(default_port)
    host = host.strip("[]")
    if not host:
        raise ConfigError(f"{what}: {text!r} has no host")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{what}: port {port_text!r} in {text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{what}: port {port} in {text!r} is out of range")
    return Address(host, port)


def default_home() -> Path:
    """``$PQTUNNEL_HOME``, else a per-user state directory (XDG)."""
    if os.environ.get("PQTUNNEL_HOME"):
        return Path(os.environ["PQTUNNEL_HOME"]).expanduser()
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "pqtunnel"


def crypto_backend_from_environment() -> str:
    """``$PQTUNNEL_CRYPTO_BACKEND`` (``cryptography`` or ``liboqs``), else ``cryptography``."""
    return os.environ.get(BACKEND_ENV) or DEFAULT_BACKEND


@dataclass(frozen=True)
class ExecService:
    """A stdio service: ``argv`` runs once per stream, with only ``env`` added to a minimal
    environment (``services.exec_environment``), never the daemon's own."""

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ResourceLimits:
    """``[limits]``: what peers and strangers may make this node hold at once (docs/security.md)."""

    streams_per_session: int = 256
    exec_processes: int = 64
    exec_processes_per_peer: int = 16
    buffered_bytes: int = 256 * 1024 * 1024
    buffered_bytes_per_session: int = 64 * 1024 * 1024
    handshakes: int = 128
    handshakes_per_address: int = 8


@dataclass(frozen=True)
class AuditSettings:
    """``[audit]``: where the hash-chained audit file lives, whether the node may run without
    it (``required``: refuse new sessions and streams while it cannot be written), and the
    size at which the file is rotated (``max_bytes``)."""

    path: Path | None = None
    required: bool = False
    max_bytes: int = DEFAULT_AUDIT_MAX_BYTES


@dataclass(frozen=True)
class HaSettings:
    """``[ha]``: the nonce store this node's replicas share (docs/ha.md): ``local`` (a SQLite
    file, ``path``, default HOME/nonces.sqlite; one file can serve processes on one host) or
    ``etcd`` (the cluster's client URLs in ``etcd``); ``replica`` names this replica."""

    store: str = "local"
    etcd: tuple[str, ...] = ()
    replica: str = DEFAULT_REPLICA
    path: Path | None = None
    enabled: bool = False
    """``[ha]`` is in the config: this node is a replica, its answered sessions are shared."""


@dataclass(frozen=True)
class NodeConfig:
    home: Path
    listen: Address = field(default_factory=lambda: parse_address(DEFAULT_LISTEN, "listen"))
    socks: Address | None = field(default_factory=lambda: parse_address(DEFAULT_SOCKS, "socks"))
    peers: dict[str, tuple[Address, ...]] = field(default_factory=dict)
    """Static peers: several addresses for one name are replicas of one node (dialled in a race)."""
    services: dict[str, Address | ExecService] = field(default_factory=dict)
    allowed_ports: frozenset[int] = frozenset()
    suites: tuple[Suite, ...] = DEFAULT_ALLOWED_SUITES
    aeads: tuple[Aead, ...] = field(default_factory=hardware_aeads)
    """In preference order; by default the faster one on this CPU first (cpufeatures.py)."""
    timers: SessionTimers = field(default_factory=SessionTimers)
    mdns: bool = True
    mdns_interfaces: list[str] | None = None
    log_level: str = "info"
    socks_users: dict[str, str] = field(default_factory=dict)
    socks_allow_users: tuple[str, ...] = ()
    """Local users (names or uids) besides the daemon's own user and root who may use SOCKS; "*" = anyone."""
    ca_public: Path | None = None
    certificate: Path | None = None
    revocation_list: Path | None = None
    crypto_backend: str = DEFAULT_BACKEND
    limits: ResourceLimits = field(default_factory=ResourceLimits)
    audit: AuditSettings = field(default_factory=lambda: AuditSettings())
    ha: HaSettings = field(default_factory=HaSettings)
    metrics: Address | None = None
    """``[metrics] listen``: where /metrics is served (None: off)."""
    policy: AccessRules | None = None
    """``[policy]`` (None: every admitted peer reaches every service and allowed port)."""
    migration_accept_until: int | None = None
    """``[migration] accept_until`` as unix seconds: from then on transition records prove nothing."""

    @property
    def control_socket(self) -> Path:
        return self.home / CONTROL_SOCKET

    @property
    def nonce_store_path(self) -> Path:
        """The ``local`` nonce store's file: ``[ha] path`` (relative to the home), else HOME/nonces.sqlite."""
        return self.ha.path if self.ha.path is not None else self.home / NONCE_STORE_FILE

    @property
    def audit_path(self) -> Path:
        """The current audit file: ``[audit] path`` (relative to the home), else HOME/audit.jsonl."""
        return self.audit.path if self.audit.path is not None else self.home / AUDIT_FILE


def _table(data: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: [{key}] must be a table")
    return value


def _peers(table: dict[str, Any], source: str) -> dict[str, tuple[Address, ...]]:
    peers = {}
    for name, value in table.items():
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, str) for v in values):
            raise ConfigError(f"{source}: peers.{name} must be \"HOST:PORT\" or a list of them")
        peers[validate_name(name, "peer name")] = tuple(
            parse_address(v, f"{source}: peers.{name}", DEFAULT_PORT) for v in values)
    return peers


def _services(table: dict[str, Any], source: str) -> dict[str, Address | ExecService]:
    services: dict[str, Address | ExecService] = {}
    for name, value in table.items():
        key = validate_name(name, "service name")
        if isinstance(value, str):
            services[key] = parse_address(value, f"{source}: services.{name}")
        elif isinstance(value, dict) and isinstance(value.get("exec"), list) and value["exec"] \
                and all(isinstance(a, str) for a in value["exec"]):
            services[key] = ExecService(tuple(value["exec"]), _exec_env(value, f"{source}: services.{name}"))
        else:
            raise ConfigError(f"{source}: services.{name} must be \"HOST:PORT\" or {{ exec = [\"cmd\", ...] }}")
    return services


def _exec_env(service: dict[str, Any], what: str) -> tuple[tuple[str, str], ...]:
    """An exec service's ``env = { KEY = "value" }``: added to the minimal environment."""
    unknown = set(service) - {"exec", "env"}
    if unknown:
        raise ConfigError(f"{what}: unknown setting(s) {', '.join(sorted(unknown))} (expected exec and env)")
    env = service.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise ConfigError(f"{what}.env must be a table of strings, e.g. {{ LANG = \"C.UTF-8\" }}")
    for key in env:
        if not key or "=" in key or "\0" in key or "\0" in env[key]:
            raise ConfigError(f"{what}.env: {key!r} is not a valid environment variable name")
    return tuple(sorted(env.items()))


def _limits(table: dict[str, Any], source: str) -> ResourceLimits:
    """``[limits]``: positive integers; unknown keys are mistakes."""
    known = {f.name for f in fields(ResourceLimits)}
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) in [limits]: {', '.join(sorted(unknown))}")
    for key, value in table.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{source}: limits.{key} must be a positive integer")
    return ResourceLimits(**table)


def _socks_users(table: dict[str, Any], source: str) -> dict[str, str]:
    """Optional RFC 1929 accounts for the SOCKS endpoint (hosts shared by several users)."""
    for user, password in table.items():
        if not isinstance(password, str) or not password:
            raise ConfigError(f"{source}: socks_users.{user} must be a non-empty password string")
    return dict(table)


def _ca_settings(table: dict[str, Any], source: str, home: Path) -> dict[str, Path | None]:
    """``[ca]``: the network CA's public key, this node's certificate, the revocation list."""
    unknown = set(table) - {"public", "certificate", "revoked"}
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) in [ca]: {', '.join(sorted(unknown))}")
    paths: dict[str, Path | None] = {}
    for key, field_name in (("public", "ca_public"), ("certificate", "certificate"), ("revoked", "revocation_list")):
        value = table.get(key)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{source}: ca.{key} must be a file path")
        paths[field_name] = (home / value).resolve() if value else None
    if paths["certificate"] is None and (home / "node.cert").exists():
        paths["certificate"] = home / "node.cert"
    if paths["ca_public"] is not None and not paths["ca_public"].exists():
        raise ConfigError(f"{source}: ca.public {paths['ca_public']} does not exist")
    return paths


def _mdns_interfaces(value: Any, source: str) -> list[str] | None:
    """Interface IP addresses mDNS uses (None: zeroconf's default choice)."""
    if value is None:
        return None
    import ipaddress

    if not isinstance(value, list) or not value:
        raise ConfigError(f"{source}: node.mdns_interfaces must be a non-empty list of IP addresses")
    for item in value:
        try:
            ipaddress.ip_address(item)
        except (ValueError, TypeError):
            raise ConfigError(f"mDNS interface {item!r} is not an IP address") from None
    return list(value)


def _string_list(value: Any, key: str, source: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{source}: {key} must be a non-empty list of strings")
    return value


def _timers(table: dict[str, Any], source: str) -> SessionTimers:
    names = {"keepalive": "keepalive_ms", "dead_after": "dead_after_ms", "handshake_timeout": "handshake_timeout_ms",
             "rekey_after": "rekey_after_ms"}
    values: dict[str, int] = {}
    for key, value in table.items():
        if key == "rekey_after_bytes":
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{source}: timers.rekey_after_bytes must be a positive integer")
            values["rekey_after_bytes"] = value
        elif key in names:
            if not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{source}: timers.{key} must be a positive number of seconds")
            values[names[key]] = int(value * 1000)
        else:
            raise ConfigError(f"{source}: unknown setting timers.{key}")
    return SessionTimers(**values)


def _metrics_listen(table: dict[str, Any], source: str) -> Address | None:
    """``[metrics] listen = "HOST:PORT"``; absent: no metrics endpoint."""
    unknown = set(table) - {"listen"}
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) in [metrics]: {', '.join(sorted(unknown))}")
    if "listen" not in table:
        return None
    return parse_address(table["listen"], f"{source}: metrics.listen")


def _audit_settings(table: dict[str, Any], source: str, home: Path) -> AuditSettings:
    """``[audit] path = "..."`` (relative to the home), ``required = true|false``, ``max_bytes = N``."""
    unknown = set(table) - {"path", "required", "max_bytes"}
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) in [audit]: {', '.join(sorted(unknown))}")
    path = table.get("path")
    if path is not None and (not isinstance(path, str) or not path):
        raise ConfigError(f"{source}: audit.path must be a file path")
    required = table.get("required", False)
    if not isinstance(required, bool):
        raise ConfigError(f"{source}: audit.required must be true or false")
    max_bytes = table.get("max_bytes", DEFAULT_AUDIT_MAX_BYTES)
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 4096:
        raise ConfigError(f"{source}: audit.max_bytes must be a number of bytes, at least 4096")
    return AuditSettings(home / Path(path).expanduser() if path else None, required, max_bytes)


def _ha_settings(table: dict[str, Any], source: str, home: Path) -> HaSettings:
    """``[ha] store = "local"|"etcd"``, ``etcd = [URLs]``, ``replica = "r1"``, ``path = "..."``.

    ``etcd`` without ``store = "etcd"`` is refused: a node meant to share state through etcd
    must never quietly fall back to a store only it can see.
    """
    unknown = set(table) - {"store", "etcd", "replica", "path"}
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) in [ha]: {', '.join(sorted(unknown))}")
    store = table.get("store", "local")
    if store not in HA_STORES:
        raise ConfigError(f"{source}: ha.store must be \"local\" or \"etcd\", not {store!r}")
    etcd = _etcd_urls(table["etcd"], source) if "etcd" in table else ()
    if store == "etcd" and not etcd:
        raise ConfigError(f"{source}: ha.store = \"etcd\" needs ha.etcd = [\"http://HOST:PORT\", ...]")
    if etcd and store != "etcd":
        raise ConfigError(f"{source}: ha.etcd is set but ha.store is \"{store}\" (add store = \"etcd\")")
    replica = table.get("replica", DEFAULT_REPLICA)
    if not isinstance(replica, str):
        raise ConfigError(f"{source}: ha.replica must be a name like \"r1\"")
    try:
        replica = validate_name(replica, "replica name")
    except ConfigError as exc:
        raise ConfigError(f"{source}: ha.replica: {exc}") from None
    path = table.get("path")
    if path is not None and (not isinstance(path, str) or not path):
        raise ConfigError(f"{source}: ha.path must be a file path")
    return HaSettings(store, etcd, replica, home / Path(path).expanduser() if path else None, enabled=True)


def _etcd_urls(value: Any, source: str) -> tuple[str, ...]:
    """etcd client URLs: ``http(s)://HOST:PORT`` each, no path."""
    from urllib.parse import urlsplit

    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{source}: ha.etcd must be a non-empty list of URLs like \"http://127.0.0.1:2379\"")
    for url in value:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            parts, port = None, None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or port is None \
                or parts.path not in ("", "/") or parts.query or parts.username:
            raise ConfigError(f"{source}: ha.etcd: {url!r} is not an etcd client URL like \"http://127.0.0.1:2379\"")
    return tuple(url.rstrip("/") for url in value)


class ConfigProblemsError(ConfigError):
    """The file does not fit the schema; ``problems`` lists every departure, one line each."""

    def __init__(self, problems: list[str]) -> None:
        more = f" (and {len(problems) - 1} more: pqtunnel check-config lists them)" if len(problems) > 1 else ""
        super().__init__(problems[0] + more)
        self.problems = problems


def read_config_file(path: Path) -> dict[str, Any]:
    """The parsed file; refused when group or others may write it (it names commands to run)."""
    try:
        refuse_writable_by_others(path, "config file", ConfigError)
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} is nested too deeply") from None
    except UnicodeDecodeError as exc:  # tomllib decodes lazily and raises this for non-UTF-8 bytes
        raise ConfigError(f"config file {path} is not valid UTF-8 (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None


def load_config(home: Path, config_path: Path | None = None, *, listen: str | None = None, socks: str | None = None,
                peers: list[str] | None = None, mdns: bool | None = None,
                mdns_interfaces: list[str] | None = None) -> NodeConfig:
    """Build the effective configuration; flags override the file."""
    path = config_path or home / CONFIG_FILE
    data = read_config_file(path) if (config_path is not None or path.exists()) else {}
    source = str(path)
    found = schema_problems(data, source, schema_lines(path if path.exists() else None))
    if found:
        raise ConfigProblemsError(found)
    node = _table(data, "node", source)
    known = {"listen", "socks", "suites", "aeads", "allowed_ports", "mdns", "mdns_interfaces", "log_level",
             "socks_allow_users"}
    unknown = set(node) - known
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) in [node]: {', '.join(sorted(unknown))}")
    suites = tuple(suite_by_name(s) for s in _string_list(node.get("suites", [s.name for s in DEFAULT_ALLOWED_SUITES]), "node.suites", source))
    aeads = (tuple(Aead.from_label(a) for a in _string_list(node["aeads"], "node.aeads", source))
             if "aeads" in node else hardware_aeads())
    ports = node.get("allowed_ports", [])
    if not isinstance(ports, list) or not all(isinstance(p, int) and 0 < p < 65536 for p in ports):
        raise ConfigError(f"{source}: node.allowed_ports must be a list of port numbers")
    static_peers = _peers(_table(data, "peers", source), source)
    for spec in peers or []:
        name, sep, address = spec.partition("=")
        if not sep:
            raise ConfigError(f"--peer {spec!r}: expected NAME=HOST:PORT")
        static_peers[validate_name(name, "peer name")] = tuple(
            parse_address(part, f"--peer {spec}", DEFAULT_PORT) for part in address.split(","))
    socks_text = socks if socks is not None else node.get("socks", DEFAULT_SOCKS)
    return NodeConfig(
        home=home,
        listen=parse_address(listen or node.get("listen", DEFAULT_LISTEN), "listen address"),
        socks=None if socks_text in ("", "off", "none") else parse_address(socks_text, "socks address"),
        peers=static_peers,
        services=_services(_table(data, "services", source), source),
        allowed_ports=frozenset(ports),
        suites=suites,
        aeads=aeads,
        timers=_timers(_table(data, "timers", source), source),
        mdns=node.get("mdns", True) if mdns is None else mdns,
        mdns_interfaces=_mdns_interfaces(mdns_interfaces or node.get("mdns_interfaces"), source),
        socks_users=_socks_users(_table(data, "socks_users", source), source),
        **_ca_settings(_table(data, "ca", source), source, home),
        log_level=str(node.get("log_level", "info")),
        socks_allow_users=(tuple(_string_list(node["socks_allow_users"], "node.socks_allow_users", source))
                           if "socks_allow_users" in node else ()),
        crypto_backend=crypto_backend_from_environment(),
        limits=_limits(_table(data, "limits", source), source),
        audit=_audit_settings(_table(data, "audit", source), source, home),
        metrics=_metrics_listen(_table(data, "metrics", source), source),
        ha=_ha_settings(_table(data, "ha", source), source, home) if "ha" in data else HaSettings(),
        policy=parse_policy(data, source, path if path.exists() else None, suites),
        migration_accept_until=_migration_deadline(_table(data, "migration", source), source),
    )


def _migration_deadline(table: dict, source: str) -> int | None:
    """``[migration] accept_until = "2027-06-30"``: the last day legacy anchors count (UTC)."""
    unknown = set(table) - {"accept_until"}
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) in [migration]: {', '.join(sorted(unknown))}")
    return parse_deadline(table["accept_until"], source) if "accept_until" in table else None
