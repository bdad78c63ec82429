"""Command-line interface: ``pqtunnel`` and ``pqtunneld`` (= ``pqtunnel up``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from pqtunnel.errors import PqtunnelError

from . import control
from .config import default_home, load_config
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
    home = _home(args)
    load_identity(home)  # the home must be a node home
    store = KnownPeersFile(home)
    if store.add(args.name, args.fingerprint):
        print(f"pinned {args.name.lower()} {store.table().fingerprint_for(args.name.lower())}")
    else:
        print(f"{args.name.lower()} was already pinned to that fingerprint")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    import trio

    from .logs import LOG, setup_logging
    from .node import Node

    home = _home(args)
    identity = load_identity(home)
    trust = load_trust(home)
    config = load_config(home, Path(args.config) if args.config else None, listen=args.listen, socks=args.socks,
                         peers=args.peer, mdns=False if args.no_mdns else None,
                         mdns_interfaces=args.mdns_interface)
    setup_logging(identity.name, config.log_level)
    node = Node(config, identity, trust)
    try:
        trio.run(node.run)
    except KeyboardInterrupt:
        pass
    LOG.info("stopped")
    return 0


def _ask(args: argparse.Namespace, request: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    return control.call(_home(args), request, timeout)


def cmd_status(args: argparse.Namespace) -> int:
    status = _ask(args, {"cmd": "status"})
    status.pop("ok", None)
    if args.json:
        _print_json(status)
        return 0
    print(f"{status['name']} {status['fingerprint']}")
    print(f"  listening on {status['listen']}, pid {status['pid']}, up {status['uptime_s']} s")
    print(f"  sessions: {status['sessions']}, static peers: {status['static_peers']}")
    print(f"  suites: {', '.join(status['suites'])}; AEADs: {', '.join(status['aeads'])}")
    print(f"  crypto backend: {status['crypto_backend']}; liboqs: {status['liboqs']}")
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
    return 0


def cmd_peers(args: argparse.Namespace) -> int:
    peers = _ask(args, {"cmd": "peers"})["peers"]
    if args.json:
        _print_json(peers)
        return 0
    if not peers:
        print("no peers")
    for p in peers:
        seen = f"seen {time.time() - p['last_seen']:.0f} s ago" if p.get("last_seen") else ""
        print(f"{p['name']:<16} {p['fingerprint'] or '-':<36} {p['trust']:<9} {p['source']:<7} session {p['session']:<4} "
              f"{' '.join(p['addresses']) or '-'} {seen} {p['last_error']}".rstrip())
    return 0


def cmd_ping(args: argparse.Namespace) -> int:
    reply = _ask(args, {"cmd": "ping", "peer": args.peer.lower(), "timeout": args.timeout}, args.timeout + 5)
    print(f"{reply['peer']} ({reply['fingerprint']}): {reply['rtt_ms']:.2f} ms over "
          f"{reply['kem']}, {reply['signature']}, {reply['aead']}")
    return 0


def parse_connect_target(text: str) -> tuple[str, dict[str, Any]]:
    """``PEER/SERVICE`` or ``PEER:PORT`` (the peer may carry a ``.pq`` suffix)."""
    from pqtunnel.errors import ConfigError
    from pqtunnel.names import validate_name

    if "/" in text:
        peer, _, service = text.partition("/")
        return validate_name(peer.removesuffix(".pq"), "peer name"), {"service": validate_name(service, "service name")}
    peer, sep, port = text.rpartition(":")
    if sep and port.isdigit() and 0 < int(port) < 65536:
        return validate_name(peer.removesuffix(".pq"), "peer name"), {"port": int(port)}
    raise ConfigError(f"connect target {text!r}: expected PEER/SERVICE or PEER:PORT")


def cmd_connect(args: argparse.Namespace) -> int:
    """stdin/stdout <-> a remote service; works as ssh ProxyCommand and as an MCP stdio transport."""
    import os
    import socket
    import threading

    peer, target = parse_connect_target(args.target)
    sock, early = control.open_pipe(_home(args), peer, target)
    out = sys.stdout.buffer

    def upload() -> None:
        try:
            while True:
                chunk = os.read(0, 65536)
                if not chunk:
                    break
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    threading.Thread(target=upload, daemon=True).start()
    try:
        if early:
            out.write(early)
            out.flush()
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            out.write(chunk)
            out.flush()
    finally:
        sock.close()
    return 0


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
    parser = argparse.ArgumentParser(prog=PROG, description="Post-quantum peer-to-peer tunnels for agents.")
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
    p = command("trust", cmd_trust, "pin a peer's fingerprint")
    p.add_argument("name")
    p.add_argument("fingerprint")
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
    _add_audit_commands(command("audit", cmd_audit, "show the audit file (hash-chained JSON lines); "
                                "works with the daemon stopped"))
    p = command("connect", cmd_connect, "splice stdin/stdout to a peer's service (PEER/SERVICE) or port (PEER:PORT)")
    p.add_argument("target", metavar="PEER/SERVICE|PEER:PORT")
    _add_home(p)
    p = command("ping", cmd_ping, "handshake if needed, then time a round trip through the tunnel")
    p.add_argument("peer")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (default 10)")
    _add_home(p)
    return parser


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
