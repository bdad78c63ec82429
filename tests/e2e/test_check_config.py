"""`pqtunnel check-config` (operations issue): like `sshd -t`, exit 0 or one line per problem."""

from __future__ import annotations

from pathlib import Path

from tests.nodes import init_node, pq


def test_check_config_lists_every_problem_one_line_each(tmp_path: Path) -> None:
    home, _ = init_node(tmp_path, "alice")
    (home / "config.toml").write_text('[node]\nmdns = "false"\nlog_level = "verbose"\n[service]\nweb = "x"\n')
    result = pq("check-config", home=home)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith(str(home / "config.toml")) for line in lines)
    up = pq("up", "--no-mdns", "--listen", "127.0.0.1:0", home=home, timeout=20)
    assert up.returncode != 0 and len(up.stderr.strip().splitlines()) == 1 and "2 more" in up.stderr


def test_check_config_passes_a_good_file_and_runs_the_policy_tests(tmp_path: Path) -> None:
    home, _ = init_node(tmp_path, "alice")
    (home / "config.toml").write_text('[services]\nweb = "127.0.0.1:8080"\n')
    ok = pq("check-config", home=home)
    assert ok.returncode == 0 and "OK" in ok.stdout
    (home / "config.toml").write_text(
        '[services]\nweb = "127.0.0.1:8080"\n[[policy.grant]]\nsrc = ["bob"]\ndst = ["web"]\n'
        '[[policy.test]]\nsrc = "carol"\naccept = ["web"]\n')
    failing = pq("check-config", home=home)
    assert failing.returncode == 1 and "carol" in failing.stderr and len(failing.stderr.strip().splitlines()) == 1
