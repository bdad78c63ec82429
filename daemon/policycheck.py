"""``pqtunnel policy check SRC DST``: would SRC reach DST, and which grant or trigger says so?

Works without a running daemon: it reads the node's configuration and pins exactly as
``pqtunnel up`` would (a policy whose own tests fail is refused here too, with the same
one-line error) and asks the same ``Policy`` the daemon would build. Like ``sshd -T``, it
answers from the files, so a policy can be checked before it is reloaded.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pqtunnel.crypto.suites import SUITES
from pqtunnel.errors import ConfigError, IdentityError
from pqtunnel.policy import Check

from .config import load_config
from .decisions import build_policy, preferred_suite
from .stores import load_identity, load_trust

EXIT_ALLOWED = 0
EXIT_DENIED = 3
"""``policy check`` exits 0 when allowed, 3 when denied, 1 when it cannot answer (an error)."""


def check_from_config(home: Path, config_path: Path | None, src: str, dst: str, *,
                      address: str | None = None, suite: str | None = None) -> Check:
    """The decision the node at ``home`` would take, from its files alone."""
    if address is not None:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ConfigError(f"--from {address!r} is not an IP address") from None
    if suite is not None and suite.lower() not in SUITES:
        raise ConfigError(f"--suite {suite!r} is not a suite; choose one of: {', '.join(SUITES)}")
    config = load_config(home, config_path)
    policy = build_policy(config, _node_name(home), load_trust(home), None)
    return policy.check(src, dst, address=address, suite=suite.lower() if suite else None,
                        preferred_suite=preferred_suite(config))


def _node_name(home: Path) -> str:
    """Our own name for messages; a home without an identity can still have its policy checked."""
    try:
        return load_identity(home).name
    except IdentityError:
        return "this node"


def describe(check: Check) -> list[str]:
    """The answer for people: the verdict with its rule, then the imagined session."""
    who = check.subject.describe()
    target = " ".join(f"{k} {v}" for k, v in check.target.items())
    verdict = "allowed" if check.allowed else "denied"
    lines = [f"{verdict}: {who} -> {target} ({check.decision.rule}: {check.decision.reason})"]
    origin = f"from {check.address}" if check.address else "from an unknown address"
    trigger = check.trigger.reason if check.trigger.min_suite else "no trigger applies"
    lines.append(f"  session: suite {check.suite} {origin}; {trigger}")
    if not check.subject.fingerprint and not check.subject.groups:
        lines.append(f"  note: {who} is not pinned here, so grants by fingerprint cannot match it")
    return lines
