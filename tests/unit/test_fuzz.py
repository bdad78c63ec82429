"""A short, deterministic pass of every fuzz target (scripts/fuzz.py): CI's bounded run.

Long runs are recorded in docs/security.md; this pass keeps every target working and
catches regressions that the seeds and their near mutations reach.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fuzz.py"


def _load_fuzz():
    spec = importlib.util.spec_from_file_location("pqtunnel_fuzz", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["pqtunnel_fuzz"] = module
    spec.loader.exec_module(module)
    return module


fuzz = _load_fuzz()


@pytest.mark.parametrize("name", sorted(fuzz.TARGETS))
def test_every_parser_survives_a_bounded_mutation_pass(name: str) -> None:
    runs = 400 if name in {"config", "response", "hello"} else 3000
    assert fuzz.run_mutation(fuzz.TARGETS[name], runs=runs, seconds=None, seed=1) == runs


def test_a_crash_is_reported_with_its_input() -> None:
    """The harness cannot pass vacuously: an exception escaping a target is a Crash."""
    def broken(data: bytes) -> None:
        raise KeyError("boom")

    target = fuzz.Target("broken", broken, (b"\x01\x02",))
    with pytest.raises(fuzz.Crash, match="broken: KeyError.*0102"):
        fuzz.run_mutation(target, runs=1, seconds=None)
