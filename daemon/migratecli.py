"""``pqtunnel migrate ssh|status`` and ``pqtunnel trust --ssh-known-hosts``: the command-line
half of docs/migration.md (the work itself is ``pqtunneld.migration``)."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from pqtunnel.errors import TransitionError
from pqtunnel.transition import classical_fingerprint, decode_transition

from .config import default_home, load_config
from .migration import (DEFAULT_VALIDITY_DAYS, RECORD_FILE, X509_CA_FILE, import_known_hosts, import_x509_ca,
                        load_anchors, migrate_ssh, migrate_x509, migrated_peers)
from .x509trust import read_pem_certificates
from .stores import load_identity


def _home(args: argparse.Namespace) -> Path:
    return Path(args.home).expanduser() if args.home else default_home()


def cmd_migrate_ssh(args: argparse.Namespace) -> int:
    home = _home(args)
    identity = load_identity(home)
    passphrase = Path(args.passphrase_file) if args.passphrase_file else None
    record = migrate_ssh(home, identity, Path(args.key), passphrase, days=args.days)
    until = datetime.fromtimestamp(record.not_after, timezone.utc).strftime("%Y-%m-%d")
    print(f"wrote {home / RECORD_FILE}: the holder of {classical_fingerprint(record.classical_key)} "
          f"({args.key}) is {record.name} {record.fingerprint}, until {until}")
    print("pqtunnel reload (or a restart) presents it; peers that list this host key in known_hosts will pin you")
    return 0


def cmd_migrate_x509(args: argparse.Namespace) -> int:
    home = _home(args)
    identity = load_identity(home)
    passphrase = Path(args.passphrase_file) if args.passphrase_file else None
    record = migrate_x509(home, identity, Path(args.cert), Path(args.key), Path(args.chain) if args.chain else None,
                          passphrase)
    until = datetime.fromtimestamp(record.not_after, timezone.utc).strftime("%Y-%m-%d")
    print(f"wrote {home / RECORD_FILE}: the holder of the certificate {args.cert} is {record.name} "
          f"{record.fingerprint}, until {until} (the certificate's end)")
    print("pqtunnel reload (or a restart) presents it; peers that trust this certificate's CA will pin you")
    return 0


def cmd_trust_x509_ca(args: argparse.Namespace) -> int:
    home = _home(args)
    load_identity(home)
    count = import_x509_ca(home, Path(args.x509_ca))
    print(f"imported {count} CA certificate(s) from {args.x509_ca} as legacy anchors; "
          "run pqtunnel reload if the daemon is running")
    return 0


def cmd_trust_known_hosts(args: argparse.Namespace) -> int:
    home = _home(args)
    load_identity(home)  # the home must be a node home
    anchors = import_known_hosts(home, Path(args.ssh_known_hosts))
    print(f"imported {len(anchors.anchors)} host key line(s) and {len(anchors.revoked)} @revoked line(s) "
          f"from {args.ssh_known_hosts} as legacy anchors; run pqtunnel reload if the daemon is running")
    return 0


def migration_status(home: Path) -> dict[str, Any]:
    """What has migrated: this node's record, each anchor's names, peers pinned through migration."""
    own: dict[str, Any] | None = None
    path = home / RECORD_FILE
    if path.exists():
        try:
            own = decode_transition(path.read_bytes()).describe()
        except TransitionError as exc:
            own = {"error": f"{path}: {exc}"}
    migrated = migrated_peers(home)
    anchors = load_anchors(home)
    rows = []
    for anchor in anchors.anchors:
        done = sorted(name for name in migrated if anchor.lists(name))
        rows.append({"names": list(anchor.names), "hashed_names": len(anchor.hashed),
                     "key": classical_fingerprint(anchor.spki), "migrated": done,
                     "state": "migrated" if done else "not seen yet"})
    deadline = load_config(home).migration_accept_until
    cas = read_pem_certificates(home / X509_CA_FILE, "X.509 CA") if (home / X509_CA_FILE).exists() else []
    return {"own_record": own, "anchors": rows, "revoked_keys": len(anchors.revoked),
            "x509_cas": [ca.subject.rfc4514_string() for ca in cas],
            "migrated_peers": [{"name": n, "fingerprint": fp, "method": m} for n, (fp, m) in sorted(migrated.items())],
            "accept_until": deadline}


def cmd_migrate_status(args: argparse.Namespace) -> int:
    status = migration_status(_home(args))
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    own = status["own_record"]
    if own is None:
        print("this node: no transition record (pqtunnel migrate ssh --key FILE)")
    elif "error" in own:
        print(f"this node: {own['error']}")
    else:
        print(f"this node: migrated ({own['kind']}, {own['classical_key']})")
    for row in status["anchors"]:
        names = ",".join(row["names"]) or f"{row['hashed_names']} hashed name(s)"
        print(f"anchor {names:<24} {row['key']:<45} {row['state']} {','.join(row['migrated'])}".rstrip())
    for subject in status["x509_cas"]:
        print(f"X.509 CA {subject}")
    for peer in status["migrated_peers"]:
        print(f"pinned {peer['name']:<24} {peer['fingerprint']} ({peer['method']})")
    deadline = status["accept_until"]
    ends = datetime.fromtimestamp(deadline, timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if deadline else "no deadline"
    print(f"legacy trust accepted until: {ends} ([migration] accept_until)")
    return 0


def add_migrate_commands(sub: Any, add_home: Callable[[argparse.ArgumentParser], None]) -> None:
    migrate = sub.add_parser("migrate", help="hand classical trust (SSH host keys) over to this node's hybrid identity",
                             description="Migration from classical keys to hybrid identities (docs/migration.md).")
    migrate_sub = migrate.add_subparsers(dest="migrate_command", required=True, metavar="MIGRATE_COMMAND")
    text = ("sign a transition record with an OpenSSH private key (Ed25519, ECDSA P-256/P-384, RSA >= 2048) and "
            "this node's identity; written to HOME/transition.rec and presented in every handshake")
    p = migrate_sub.add_parser("ssh", help=text, description=text)
    p.add_argument("--key", required=True, metavar="FILE", help="e.g. /etc/ssh/ssh_host_ed25519_key")
    p.add_argument("--passphrase-file", metavar="FILE", help="the key's passphrase (first line) if it is encrypted")
    p.add_argument("--days", type=int, default=DEFAULT_VALIDITY_DAYS,
                   help=f"how long the record is valid (default {DEFAULT_VALIDITY_DAYS})")
    p.set_defaults(handler=cmd_migrate_ssh)
    add_home(p)
    text = ("sign a transition record with a TLS certificate's key (ECDSA P-256/P-384, RSA >= 2048, Ed25519); the "
            "certificate must name this node (SAN DNS name, or CN without SAN); presented with its chain")
    p = migrate_sub.add_parser("x509", help=text, description=text)
    p.add_argument("--cert", required=True, metavar="FILE", help="the node's certificate (PEM)")
    p.add_argument("--key", required=True, metavar="FILE", help="its private key (PEM)")
    p.add_argument("--chain", metavar="FILE", help="intermediate certificates (PEM), presented with the certificate")
    p.add_argument("--passphrase-file", metavar="FILE", help="the key's passphrase (first line) if it is encrypted")
    p.set_defaults(handler=cmd_migrate_x509)
    add_home(p)
    text = "which legacy anchors have migrated, which are not seen yet, and this node's own record"
    p = migrate_sub.add_parser("status", help=text, description=text)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_migrate_status)
    add_home(p)
