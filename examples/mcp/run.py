"""One command: an MCP agent on alice calls MCP tools served by bob, through pqtunnel.

    python3 examples/mcp/run.py

This builds two nodes in a temporary directory and pins their trust both ways. bob exposes
server.py as the exec service ``tools``. Both daemons start on loopback, and agent.py runs on
alice's node with ``pqtunnel connect bob/tools`` as its MCP stdio transport. The script then
shows the session's algorithms and bob's view of the stream, and shuts everything down.
tests/e2e/test_mcp_example.py runs the same ``run_scenario``.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SERVER = HERE / "server.py"
AGENT = HERE / "agent.py"
sys.path.insert(0, str(REPO))

from pqlab.process import CLI, Daemon, init_node, pq  # noqa: E402

AGENT_TIMEOUT = 120.0


@dataclass
class Nodes:
    alice_home: Path
    bob_home: Path
    alice: Daemon
    bob: Daemon


@dataclass
class Outcome:
    """Everything a reader (or a test) wants to check after the run."""

    report: dict[str, Any]  # agent.py --json: tools listed and results computed on bob
    agent_stderr: str
    sessions_text: str  # `pqtunnel sessions` on alice
    session: dict[str, Any]  # the same session, from `pqtunnel sessions --json`
    alice_log: str
    bob_log: str
    bob_pid: int  # bob's daemon, the parent of every server process it starts


def _check(result: subprocess.CompletedProcess[str]) -> str:
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(map(str, result.args))} failed:\n{result.stdout}{result.stderr}")
    return result.stdout


@contextmanager
def two_nodes(root: Path, say: Callable[[str], None] = lambda _: None) -> Iterator[Nodes]:
    """alice and bob pinned to each other; bob serves server.py as ``tools``. Stops both daemons afterwards."""
    alice_home, alice_fp = init_node(root, "alice")
    bob_home, bob_fp = init_node(root, "bob")
    say(f"pqtunnel init: alice {alice_fp}, bob {bob_fp}")
    _check(pq("trust", "bob", bob_fp, home=alice_home))
    _check(pq("trust", "alice", alice_fp, home=bob_home))
    say("pqtunnel trust: each pins the other's fingerprint")
    service = json.dumps([sys.executable, str(SERVER)])  # a JSON string list is a valid TOML array
    (bob_home / "config.toml").write_text(f"[services]\ntools = {{ exec = {service} }}\n")
    say(f"bob's config.toml: [services] tools = {{ exec = {service} }}")
    bob = Daemon(bob_home).start()
    try:
        alice = Daemon(alice_home, ["--peer", f"bob=127.0.0.1:{bob.port}"]).start()
    except BaseException:
        bob.kill()
        raise
    say(f"pqtunnel up: bob on 127.0.0.1:{bob.port}, alice dials it (--peer bob=127.0.0.1:{bob.port})")
    try:
        yield Nodes(alice_home, bob_home, alice, bob)
    finally:
        try:
            alice.stop()  # SIGTERM; stop() kills and raises if a daemon does not exit
        finally:
            bob.stop()


def run_scenario(root: Path, say: Callable[[str], None] = lambda _: None) -> Outcome:
    """Run the agent on alice against bob/tools and collect the results, the session and both logs."""
    with two_nodes(root, say) as nodes:
        command = [sys.executable, str(AGENT), "--peer", "bob", "--service", "tools",
                   "--home", str(nodes.alice_home), "--pqtunnel", shlex.join(CLI), "--json"]
        say(f"agent on alice: {shlex.join(command)}")
        # cwd=REPO keeps `python -m pqtunneld.cli` importable from a plain checkout: the SDK's stdio
        # client passes on only a minimal environment (no PYTHONPATH), but the child inherits the cwd.
        agent = subprocess.run(command, capture_output=True, text=True, timeout=AGENT_TIMEOUT, cwd=REPO)
        _check(agent)
        report = json.loads(agent.stdout)
        nodes.bob.wait_for_log("closed, exit status")  # bob logs once it has reaped the server
        sessions_text = _check(pq("sessions", home=nodes.alice_home))
        (session,) = nodes.alice.sessions()
    assert nodes.bob.process is not None
    return Outcome(report, agent.stderr, sessions_text, session, nodes.alice.logs(), nodes.bob.logs(),
                   nodes.bob.process.pid)


def main() -> None:
    """Run the scenario in a throwaway directory and show what happened."""
    sys.path.insert(0, str(HERE))
    from agent import print_report  # next to this file; needs the mcp package, like the agent itself

    with tempfile.TemporaryDirectory(prefix="pqtunnel-mcp-") as tmp:
        outcome = run_scenario(Path(tmp), say=lambda text: print(f"== {text}"))
    print("== agent report (every result was computed by bob's server process):")
    print_report(outcome.report)
    print("== pqtunnel sessions (alice):")
    print(outcome.sessions_text.rstrip())
    print("== bob's daemon log for the stream:")
    for line in outcome.bob_log.splitlines():
        if "service tools" in line:
            print(line)
    print("== both daemons stopped; temporary homes removed")


if __name__ == "__main__":
    main()
