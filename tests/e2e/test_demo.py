"""The README's demo keeps working: it is what a new user runs first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_shows_a_hybrid_session_and_traffic_both_ways() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py")], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "kem             X25519+ML-KEM-768" in out
    assert "signature       Ed25519+ML-DSA-65" in out
    assert "hello from bob's web service" in out       # curl through SOCKS, alice -> bob -> alice
    assert "POST-QUANTUM HELLO\n   FROM ALICE" in out   # stdin -> bob's process -> stdout
    assert "Traceback" not in out + result.stderr
