"""End to end: examples/mcp, an MCP agent on alice calling MCP tools that bob serves over pqtunnel.

Runs the example's own ``run_scenario`` (real daemons, the real MCP SDK on both ends) and
checks that the answers were computed by a server process bob's daemon started, and that the
stream ended cleanly. A clean end means stdin EOF crossed the tunnel, the server exited by
itself, and bob reaped it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("mcp", reason="the MCP example needs the MCP Python SDK: pip install -e '.[test]'")

RUN_PY = Path(__file__).resolve().parents[2] / "examples" / "mcp" / "run.py"


def _load_example() -> ModuleType:
    """examples/ is not a package: load run.py from its path rather than copy its scenario."""
    spec = importlib.util.spec_from_file_location("mcp_example_run", RUN_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def test_agent_on_alice_calls_tools_served_by_bob(tmp_path: Path) -> None:
    outcome = _load_example().run_scenario(tmp_path)
    report = outcome.report

    assert set(report["tools"]) == {"add", "sha256", "whoami"}
    assert report["server"] == "pqtunnel-tools"
    assert report["command"][-4:] == ["connect", "bob/tools", "--home", str(tmp_path / "alice")]
    calls = {call["tool"]: call for call in report["calls"]}
    assert not any(call["is_error"] for call in calls.values()), calls
    assert calls["add"]["result"] == 42
    text = calls["sha256"]["arguments"]["text"]
    assert calls["sha256"]["result"] == hashlib.sha256(text.encode()).hexdigest()

    # whoami ran in the process bob's daemon spawned for this stream, and that process is gone.
    remote = calls["whoami"]["result"]
    assert remote["ppid"] == outcome.bob_pid
    opened = re.search(r"stream (\d+): alice -> service tools \(pid (\d+)\)", outcome.bob_log)
    assert opened is not None, outcome.bob_log
    assert int(opened.group(2)) == remote["pid"]
    assert f"stream {opened.group(1)}: alice -> service tools closed, exit status 0" in outcome.bob_log
    with pytest.raises(ProcessLookupError):
        os.kill(remote["pid"], 0)

    assert outcome.session["peer"] == "bob" and outcome.session["kem"] == "X25519+ML-KEM-768"
    assert "X25519+ML-KEM-768" in outcome.sessions_text
    for log in (outcome.bob_log, outcome.alice_log, outcome.agent_stderr):
        assert "Traceback" not in log, log
