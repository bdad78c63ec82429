"""Command-line interface: ``pqtunnel`` and ``pqtunneld`` (= ``pqtunnel up``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from pqtunnel.errors import PqtunnelError, TrustStoreError

from . import control
from .config import NodeConfig, default_home, load_config
from .migratecli import add_migrate_commands, cmd_trust_known_hosts, cmd_trust_x509_ca
from .stores import (
    PUB_FILE,
    CaDirectory,
    KnownPeersFile,
    create_identity,
    load_identity,
    load_trust,
    read_certificate_file,
    write_certificate_file,
)

PROG = "pqtunnel"
EXIT_INTERRUPTED = 130


def _home(args: argparse.Namespace) -> Path:
    return Path(args.home).expanduser() if args.home else default_home()


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


# --- commands ---------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    identity = create_identity(_home(args), args.name)
    print(f"created identity {identity.name} in {_home(args)}")
    print(identity.fingerprint)
    return 0


def cmd_id(args: argparse.Namespace) -> int:
    identity = load_identity(_home(args))
    if args.json:
        _print_json({"name": identity.name, "fingerprint": identity.fingerprint,
                     "signature": "Ed25519+ML-DSA-65 (ML-DSA-87 for pq-strong)", "home": str(_home(args))})
    else:
        print(f"{identity.name} {identity.fingerprint}")
    return 0


def cmd_trust(args: argparse.Namespace) -> int:
    if args.ssh_known_hosts or args.x509_ca:
        if args.name or args.fingerprint or (args.ssh_known_hosts and args.x509_ca):
            raise TrustStoreError("pqtunnel trust: give one of NAME FINGERPRINT, --ssh-known-hosts FILE, --x509-ca FILE")
        return cmd_trust_known_hosts(args) if args.ssh_known_hosts else cmd_trust_x509_ca(args)
    if not (args.name and args.fingerprint):
        raise TrustStoreError("pqtunnel trust: give NAME FINGERPRINT (or --ssh-known-hosts FILE, --x509-ca FILE)")
    home = _home(args)
    load_identity(home)  # the home must be a node home
    store = KnownPeersFile(home)
    if store.add(args.name, args.fingerprint):
        print(f"pinned {args.name.lower()} {store.table().fingerprint_for(args.name.lower())}")
    else:
        print(f"{args.name.lower()} was already pinned to that fingerprint")
    _pin_in_running_daemon(home, args.name, args.fingerprint)
    return 0


def _pin_in_running_daemon(home: Path, name: str, fingerprint: str) -> None:
    """A running node uses a new pin for its next handshake at once (no reload needed)."""
    try:
        control.call(home, {"cmd": "trust", "name": name, "fingerprint": fingerprint}, timeout=10)
    except control.DaemonNotRunningError:
        return
    print("the running daemon uses it now")


def cmd_up(args: argparse.Namespace) -> int:
    import trio

    from .logs import LOG, setup_logging
    from .node import Node

    home = _home(args)
    identity = load_identity(home)
    trust = load_trust(home)
    def read_config() -> NodeConfig:  # at start, and again at every reload (same flags)
        return load_config(home, Path(args.config) if args.config else None, listen=args.listen, socks=args.socks,
                           peers=args.peer, mdns=False if args.no_mdns else None,
                           mdns_interfaces=args.mdns_interface)

    config = read_config()
    control.refuse_if_running(config.home)
    setup_logging(identity.name, config.log_level, args.log_format)
    node = Node(config, identity, trust)
    node.load_config = read_config
    try:
        trio.run(node.run)
    except KeyboardInterrupt:
        pass
    except BaseExceptionGroup as group:  # trio's nursery wraps e.g. "cannot listen on ...: in use"
        raise _user_error_in(group) from None
    LOG.info("stopped")
    return 0


def _user_error_in(group: BaseExceptionGroup) -> BaseException:
    """The first UserError inside a (nested) exception group, so it prints as one line;
    the group itself if it holds none (a bug keeps its traceback)."""
    for error in group.exceptions:
        if isinstance(error, PqtunnelError):
            return error
        if isinstance(error, BaseExceptionGroup):
            found = _user_error_in(error)
            if found is not error:
                return found
    return group


def _ask(args: argparse.Namespace, request: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    return control.call(_home(args), request, timeout)


def cmd_status(args: argparse.Namespace) -> int:
    status = _ask(args, {"cmd": "status"})
    status.pop("ok", None)
    if args.json:
        _print_json(status)
        return 0
    print(f"{status['name']} {status['fingerprint']}")
    print(f"  pqtunnel {status.get('version')} (protocol {status.get('protocol')})")
    print(f"  listening on {status['listen']}, pid {status['pid']}, up {status['uptime_s']} s")
    print(f"  SOCKS: {status.get('socks') or 'off'}; mDNS: {(status.get('mdns') or {}).get('state', '?')}")
    services = ", ".join(f"{service['name']} ({service['kind']})" for service in status.get("services") or [])
    print(f"  services: {services or 'none'}")
    print(f"  sessions: {status['sessions']}, static peers: {status['static_peers']}")
    print(f"  suites: {', '.join(status['suites'])}; AEADs: {', '.join(status['aeads'])}")
    print(f"  crypto backend: {status['crypto_backend']}; liboqs: {status['liboqs']}")
    shakes = status.get("handshakes")
    if shakes:
        print(f"  inbound handshakes: {shakes['admitted']} answered, {shakes['retried_for_cookie']} asked for a cookie, "
              f"{shakes['busy'] + shakes['refused_at_accept']} refused as busy; signing budget {shakes['budget']}")
    ha = status.get("ha") or {}
    if ha:
        state = {True: "healthy", False: "UNREACHABLE", None: "not checked"}[ha["healthy"]]
        print(f"  nonce store: {ha['store']} ({state}: {ha['detail']}), replica {ha['replica']}")
    return 0


def cmd_sessions(args: argparse.Namespace) -> int:
    sessions = _ask(args, {"cmd": "sessions"})["sessions"]
    if args.json:
        _print_json(sessions)
        return 0
    if not sessions:
        print("no sessions")
    for s in sessions:
        print(f"{s['peer']:<16} {s['fingerprint']}  {s['direction']:<8} {s['remote']}")
        print(f"  {s['kem']} | {s['signature']} | {s['aead']} | sent {s['bytes_sent']} B, "
              f"received {s['bytes_received']} B | age {s['age_s']:.0f} s | rekeys {s['rekeys']}")
        print(f"  latest handshake: {_ago(s.get('latest_handshake'))}; "
              f"last received: {_ago(s.get('last_received'))}")
        print(f"  session {s['session_id']}{_replica_line(s)}")
    return 0


def _replica_line(session: dict) -> str:
    """`` | replica r2 | moved 1 time | counter block [65536, 131072)`` for HA sessions."""
    parts = []
    if session.get("replica"):
        parts.append(f"replica {session['replica']}")
    if session.get("migrations"):
        moves = session["migrations"]
        parts.append(f"moved {moves} time{'s' if moves != 1 else ''}")
    if session.get("block"):
        start, end = session["block"]
        parts.append(f"counter block [{start}, {end})")
    return "".join(f" | {part}" for part in parts)


def _ago(stamp: str | None) -> str:
    """``12 s ago (2026-12-01T10:15:02.123Z)``, as ``wg show`` puts it."""
    from datetime import datetime

    if not stamp:
        return "never"
    seconds = time.time() - datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    return f"{max(seconds, 0):.0f} s ago ({stamp})"


def cmd_peers(args: argparse.Namespace) -> int:
    peers = _ask(args, {"cmd": "peers"})["peers"]
    if args.json:
        _print_json(peers)
        return 0
    if not peers:
        print("no peers")
    for p in peers:
        seen = f"seen {time.time() - p['last_seen']:.0f} s ago" if p.get("last_seen") else ""
        print(f"{p['name']:<16} {p['fingerprint'] or '-':<36} {p['trust']:<13} {p['source']:<7} session {p['session']:<4} "
              f"{' '.join(p['addresses']) or '-'} {seen} {p['last_error']}".rstrip())
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    reply = _ask(args, {"cmd": "reload"})
    print(f"reloaded; policy: {reply['policy']}")
    print(f"closed {reply['closed_sessions']} session(s) and {reply['closed_streams']} stream(s) "
          "that the policy no longer allows")
    if reply["restart_needed"]:
        print(f"changed, applied at the next start: {', '.join(reply['restart_needed'])}")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """Like ``sshd -t``: load everything ``up`` would (config, policy and its tests, pins, CA
    material, identity); exit 0, or print one line per problem and exit 1."""
    from pqtunnel.errors import UserError as Problem

    from .backends import open_backend
    from .config import ConfigProblemsError
    from .configcheck import config_problems
    from .decisions import build_policy
    from .trustpolicy import load_ca_setup

    home = _home(args)
    try:
        found = config_problems(home, Path(args.config) if args.config else None)
        if found:  # the schema's and each table's strict reader's, not only the first
            print("\n".join(found), file=sys.stderr)
            return 1
        config = load_config(home, Path(args.config) if args.config else None)
        identity = load_identity(home)
        ca, _ = load_ca_setup(config, identity, open_backend(config.crypto_backend))
        build_policy(config, identity.name, load_trust(home), ca)
    except ConfigProblemsError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 1
    except Problem as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"{config.home / 'config.toml' if args.config is None else args.config}: OK")
    return 0


def cmd_policy_check(args: argparse.Namespace) -> int:
    from .policycheck import EXIT_ALLOWED, EXIT_DENIED, check_from_config, describe

    check = check_from_config(_home(args), Path(args.config) if args.config else None, args.src, args.dst,
                              address=args.source_address, suite=args.suite)
    if args.json:
        _print_json(check.fields())
    else:
        print("\n".join(describe(check)))
    return EXIT_ALLOWED if check.allowed else EXIT_DENIED


def cmd_ping(args: argparse.Namespace) -> int:
    """``--count N`` round trips, ``--interval`` apart (like ping); any lost one is an error."""
    from pqtunnel.errors import ConfigError

    if args.count < 1 or args.interval < 0:
        raise ConfigError("ping: --count must be at least 1 and --interval at least 0")
    rtts: list[float] = []
    reply: dict[str, Any] = {}
    for seq in range(1, args.count + 1):
        if seq > 1:
            time.sleep(args.interval)
        reply = _ask(args, {"cmd": "ping", "peer": args.peer.lower(), "timeout": args.timeout}, args.timeout + 5)
        rtts.append(reply["rtt_ms"])
        if not args.json:
            _print_ping(reply, seq, args.count)
    summary = {"min_ms": min(rtts), "avg_ms": round(sum(rtts) / len(rtts), 3), "max_ms": max(rtts)}
    if args.json:
        _print_json({key: reply[key] for key in ("peer", "fingerprint", "kem", "signature", "aead")}
                    | {"count": len(rtts), "rtt_ms": rtts, **summary})
    elif args.count > 1:
        print(f"{len(rtts)} round trips: min/avg/max {summary['min_ms']:.2f}/{summary['avg_ms']:.2f}/"
              f"{summary['max_ms']:.2f} ms")
    return 0


def _print_ping(reply: dict[str, Any], seq: int, count: int) -> None:
    over = f"over {reply['kem']}, {reply['signature']}, {reply['aead']}"
    if count == 1:
        print(f"{reply['peer']} ({reply['fingerprint']}): {reply['rtt_ms']:.2f} ms {over}")
    elif seq == 1:
        print(f"{reply['peer']} ({reply['fingerprint']}) {over}")
    if count > 1:
        print(f"  seq {seq}: {reply['rtt_ms']:.2f} ms", flush=True)


def _connect_target(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """``PEER/SERVICE``, ``PEER:PORT``, or the two-argument ``HOST PORT`` of ProxyCommand styles."""
    from .targets import parse_host_port, parse_target

    return parse_target(args.target) if args.port is None else parse_host_port(args.target, args.port)


def cmd_connect(args: argparse.Namespace) -> int:
    """stdin/stdout <-> a remote service; works as ssh ProxyCommand and as an MCP stdio transport.
    Exits 0 only if the stream ended cleanly; a reset or a lost session is a one-line error."""
    from .pipe import RemoteStreamError, relay_stdio
    from .targets import describe

    peer, target = _connect_target(args)
    sock, early = control.open_pipe(_home(args), peer, target)
    try:
        relay_stdio(sock, early)
    except RemoteStreamError as exc:
        raise RemoteStreamError(f"{describe(peer, target)}: {exc}") from None
    finally:
        sock.close()
    return 0


def cmd_forward(args: argparse.Namespace) -> int:
    """``ssh -L``: 127.0.0.1:LOCAL_PORT -> a peer's service, one stream per connection."""
    from .forward import run_forward
    from .targets import parse_target

    peer, target = parse_target(args.target)
    return run_forward(_home(args), args.local_port, peer, target)


def cmd_ca_init(args: argparse.Namespace) -> int:
    ca = CaDirectory.create(Path(args.ca_dir).expanduser(), args.name)
    print(f"created CA {ca.identity.name} in {args.ca_dir}")
    print(f"public key for nodes' [ca] public = ...: {Path(args.ca_dir) / PUB_FILE}")
    print(ca.identity.fingerprint)
    return 0


def cmd_ca_sign(args: argparse.Namespace) -> int:
    import time

    ca = CaDirectory.load(Path(args.ca_dir).expanduser())
    now = int(time.time())
    groups = tuple(g for g in (args.groups or "").split(",") if g)
    cert = ca.sign(args.name, args.fingerprint, groups=groups, not_before=now - 60,
                   not_after=now + int(args.days * 86400))
    if args.out:
        write_certificate_file(Path(args.out), cert)
        print(f"wrote certificate for {cert.name} (serial {cert.serial}) to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(cert.armor())
    return 0


def cmd_ca_revoke(args: argparse.Namespace) -> int:
    ca = CaDirectory.load(Path(args.ca_dir).expanduser())
    added = ca.revoke(args.serial)
    print(f"{'revoked' if added else 'already revoked'} {args.serial.lower()}; distribute {Path(args.ca_dir) / 'revoked'}")
    return 0


def cmd_ca_show(args: argparse.Namespace) -> int:
    _print_json(read_certificate_file(Path(args.certificate)).describe())
    return 0


# --- audit: reads the files, so it works with the daemon stopped -------------------------------------


def _audit_path(args: argparse.Namespace) -> Path:
    """``--file``, else the node's ``[audit] path`` (default HOME/audit.jsonl)."""
    if args.file:
        return Path(args.file).expanduser()
    return load_config(_home(args), Path(args.config) if args.config else None).audit_path


def _audit_records(args: argparse.Namespace) -> list[Any]:
    from . import audit

    since = audit.parse_since(args.since) if args.since else None
    records = audit.since_filter(audit.read_records(audit.read_chain(_audit_path(args))), since)
    for record in records:
        if isinstance(record, audit.Unreadable):
            print(f"{PROG}: warning: {record.where}: {record.reason} (pqtunnel audit verify)", file=sys.stderr)
    return [r for r in records if not isinstance(r, audit.Unreadable)]


def cmd_audit(args: argparse.Namespace) -> int:
    from . import audit

    records = _audit_records(args)
    if args.json:
        _print_json(records)
    for record in records if not args.json else ():
        print(audit.render_record(record))
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from pqtunnel.audit import verify

    from . import audit

    path = _audit_path(args)
    result = verify(audit.read_chain(path))
    files = audit.chain_files(path)
    if args.json:
        _print_json({**result.as_dict(), "files": [str(f) for f in files]})
    elif result.ok:
        print(audit.render_verification(result, files))
    else:
        print(f"{PROG}: audit chain broken: {result.problem}", file=sys.stderr)
    return 0 if result.ok else 1


def cmd_audit_report(args: argparse.Namespace) -> int:
    from pqtunnel.audit import build_report, verify

    from . import audit

    result = verify(audit.read_chain(_audit_path(args)))
    report = build_report(_audit_records(args))
    if args.json:
        _print_json({**report, "chain": result.as_dict()})
    else:
        verdict = "chain intact" if result.ok else f"CHAIN BROKEN: {result.problem}"
        print("\n".join(audit.render_report(report, verdict)))
    return 0 if result.ok else 1


# --- parser ------------------------------------------------------------------------------------------


def _add_home(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", help="node home directory (default: $PQTUNNEL_HOME or ~/.local/state/pqtunnel)")


def _add_up_options(parser: argparse.ArgumentParser) -> None:
    _add_home(parser)
    parser.add_argument("--config", help="configuration file (default: HOME/config.toml)")
    parser.add_argument("--listen", help="tunnel listen address HOST:PORT (default 0.0.0.0:7330)")
    parser.add_argument("--socks", help="SOCKS5 listen address HOST:PORT (default 127.0.0.1:1080, 'off' to disable)")
    parser.add_argument("--peer", action="append", metavar="NAME=HOST:PORT[,HOST:PORT]", help="static peer (repeatable); several addresses are replicas of one node, dialled in a staggered race")
    parser.add_argument("--no-mdns", action="store_true", help="do not use mDNS discovery")
    parser.add_argument("--log-format", choices=["text", "json"], default="text",
                        help="text lines (default; <N> priorities without timestamps under systemd's journal) "
                             "or one JSON object per line with the event's fields")
    parser.add_argument("--mdns-interface", action="append", metavar="IP",
                        help="advertise and browse only on the interface with this address (repeatable)")


def _add_audit_options(parser: argparse.ArgumentParser, *, since: bool) -> None:
    _add_home(parser)
    parser.add_argument("--config", help="configuration file naming [audit] path (default: HOME/config.toml)")
    parser.add_argument("--file", help="read this audit file and its rotated FILE.1, FILE.2, ... instead")
    parser.add_argument("--json", action="store_true")
    if since:
        parser.add_argument("--since", metavar="TIME",
                            help="only records from TIME on: ISO 8601 (UTC unless it says) or a duration (30m, 2h, 7d)")


def _add_audit_commands(audit: argparse.ArgumentParser) -> None:
    _add_audit_options(audit, since=True)
    sub = audit.add_subparsers(dest="audit_command", metavar="[verify|report]")
    p = sub.add_parser("verify", help="check the hash chain across rotated files: exit 0 if intact, else name "
                       "the first changed, inserted, removed, reordered or truncated line",
                       description="Check the audit hash chain. --json also prints the last hash: keep it "
                       "off this host to detect a rewritten file later.")
    _add_audit_options(p, since=False)
    p.set_defaults(handler=cmd_audit_verify)
    p = sub.add_parser("report", help="compliance summary: sessions and bytes per KEM, signature and AEAD, "
                       "post-quantum share, legacy sessions, denials by rule, peers never seen with PQ")
    _add_audit_options(p, since=True)
    p.set_defaults(handler=cmd_audit_report)


def build_parser() -> argparse.ArgumentParser:
    from .version import version_line

    parser = argparse.ArgumentParser(prog=PROG, description="Post-quantum peer-to-peer tunnels for agents.")
    parser.add_argument("--version", action="version", version=version_line(),
                        help="print the package and protocol version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    p = command("init", cmd_init, "create a new hybrid identity (refuses to overwrite)")
    p.add_argument("--name", required=True, help="this node's name (a DNS label)")
    _add_home(p)
    p = command("id", cmd_id, "print this node's name and fingerprint")
    p.add_argument("--json", action="store_true")
    _add_home(p)
    p = command("trust", cmd_trust, "pin a peer's fingerprint, or import SSH known_hosts as legacy anchors")
    p.add_argument("name", nargs="?")
    p.add_argument("fingerprint", nargs="?")
    p.add_argument("--ssh-known-hosts", metavar="FILE", help="import this known_hosts file's host keys: a peer "
                   "whose transition record is signed by a key listed for its name is pinned (docs/migration.md)")
    p.add_argument("--x509-ca", metavar="FILE", help="trust this X.509 CA (PEM): a peer whose transition record is "
                   "signed by the key of a certificate that chains to it and names the peer is pinned")
    _add_home(p)
    _add_up_options(command("up", cmd_up, "run the daemon in the foreground"))
    for name, handler, text in (("status", cmd_status, "show the running daemon's status"),
                                ("sessions", cmd_sessions, "list live sessions and their algorithms"),
                                ("peers", cmd_peers, "list known peers and their trust")):
        p = command(name, handler, text)
        p.add_argument("--json", action="store_true")
        _add_home(p)
    ca = sub.add_parser("ca", help="network CA: init, sign, revoke, show", description="A hybrid-signed network CA.")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True, metavar="CA_COMMAND")
    p = ca_sub.add_parser("init", help="create a CA key pair in a directory (refuses to overwrite)")
    p.add_argument("--name", required=True)
    p.add_argument("--ca-dir", required=True)
    p.set_defaults(handler=cmd_ca_init)
    p = ca_sub.add_parser("sign", help="certify a node's fingerprint under a name")
    p.add_argument("--ca-dir", required=True)
    p.add_argument("--name", required=True, help="the node name the certificate proves")
    p.add_argument("--fingerprint", required=True, help="the node's fingerprint (pqtunnel id)")
    p.add_argument("--groups", help="comma-separated groups")
    p.add_argument("--days", type=float, default=365.0, help="validity in days (default 365)")
    p.add_argument("--out", help="write the certificate here (e.g. NODE_HOME/node.cert) instead of stdout")
    p.set_defaults(handler=cmd_ca_sign)
    p = ca_sub.add_parser("revoke", help="add a certificate serial to the CA's revocation list")
    p.add_argument("--ca-dir", required=True)
    p.add_argument("serial")
    p.set_defaults(handler=cmd_ca_revoke)
    p = ca_sub.add_parser("show", help="print a certificate's contents")
    p.add_argument("certificate")
    p.set_defaults(handler=cmd_ca_show)
    _add_audit_commands(command("audit", cmd_audit, "show the audit file (hash-chained JSON lines), verify its "
                                "chain or report on it; reads the files, so works with the daemon stopped"))
    p = command("connect", cmd_connect, "splice stdin/stdout to a peer's service (PEER/SERVICE) or port "
                "(PEER:PORT); also HOST PORT for ProxyCommand styles (GIT_PROXY_COMMAND, ssh's ProxyCommand). "
                "Exits 0 when the stream ended cleanly, 1 with the reason after a reset or a lost session")
    p.add_argument("target", metavar="PEER/SERVICE|PEER:PORT|HOST",
                   help="bob/web, bob:8080, or with PORT: web.bob.pq (service web), bob.pq or bob (port PORT)")
    p.add_argument("port", nargs="?", metavar="PORT", help="with HOST: the port (ignored for SERVICE.PEER.pq)")
    _add_home(p)
    p = command("forward", cmd_forward, "like ssh -L: listen on 127.0.0.1:LOCAL_PORT and forward each connection "
                "through a new stream to PEER/SERVICE or PEER:PORT, until Ctrl-C")
    p.add_argument("local_port", type=int, metavar="LOCAL_PORT", help="local port (0: any free port, printed)")
    p.add_argument("target", metavar="PEER/SERVICE|PEER:PORT")
    _add_home(p)
    p = command("ping", cmd_ping, "handshake if needed, then time round trips through the tunnel")
    p.add_argument("peer", help="a peer name; one that is pinned (or any, with a network CA) but not found by "
                   "mDNS yet is queried for first, for up to 8 s, as for connect and SOCKS")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each answer (default 10)")
    p.add_argument("--count", type=int, default=1, metavar="N", help="round trips (default 1)")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                   help="pause between round trips (default 1)")
    p.add_argument("--json", action="store_true", help="print every round-trip time and min/avg/max as JSON")
    _add_home(p)
    p = command("reload", cmd_reload, "re-read config, [policy], pins, CA material, migration anchors and record, and services in the running "
                "daemon (also on SIGHUP); a broken policy or a failing policy test is refused and the old one stays")
    _add_home(p)
    p = command("check-config", cmd_check_config, "check the configuration like sshd -t: config.toml (every "
                "problem, one line each), [policy] and its tests, pins, CA material and the identity; exit 0 if all is well")
    _add_home(p)
    p.add_argument("--config", help="configuration file (default: HOME/config.toml)")
    _add_policy_commands(sub)
    add_migrate_commands(sub, _add_home)
    return parser


def _add_policy_commands(sub: Any) -> None:
    policy = sub.add_parser("policy", help="check the [policy] section of config.toml",
                            description="Questions about the [policy] section (docs/policy.md).")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True, metavar="POLICY_COMMAND")
    text = ("would SRC reach DST on this node, and by which grant or trigger (or why not)? Answers from the "
            "config file and pins, without a running daemon. Exit status: 0 allowed, 3 denied, 1 error.")
    p = policy_sub.add_parser("check", help=text, description=text)
    p.add_argument("src", metavar="SRC", help="the peer: NAME, pq1:FINGERPRINT, group:GROUP, or several joined by "
                   "commas (carol,group:ops); a pinned name brings its fingerprint")
    p.add_argument("dst", metavar="DST", help="a service name or port:N")
    p.add_argument("--from", dest="source_address", metavar="IP",
                   help="the peer's source address (for from = [...] grants and triggers; default: unknown)")
    p.add_argument("--suite", help="the session's suite: classical, hybrid, pq-strong (default: this node's "
                   "first suite, raised to what the triggers demand)")
    p.add_argument("--json", action="store_true", help="print the decision, its rule and the session as JSON")
    p.add_argument("--config", help="configuration file (default: HOME/config.toml)")
    _add_home(p)
    p.set_defaults(handler=cmd_policy_check)


def run(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except PqtunnelError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1
    except KeyboardInterrupt:  # Ctrl-C during connect, ping, ...: like a shell, 128 + SIGINT
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def main() -> None:
    sys.exit(run())


def daemon_main() -> None:
    """``pqtunneld``: the same as ``pqtunnel up``."""
    parser = argparse.ArgumentParser(prog="pqtunneld", description="Run the pqtunnel daemon in the foreground.")
    _add_up_options(parser)
    args = parser.parse_args()
    args.command = "up"
    try:
        sys.exit(cmd_up(args))
    except PqtunnelError as exc:
        print(f"pqtunneld: error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
