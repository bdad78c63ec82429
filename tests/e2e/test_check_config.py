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


def test_check_config_lists_problems_in_limits_ha_migration_and_policy(tmp_path: Path) -> None:
    home, _ = init_node(tmp_path, "alice")
    path = home / "config.toml"
    path.write_text('[limits]\nstreams = 5\nhandshakes = "many"\n'
                    '[ha]\nstor = "local"\n'
                    '[migration]\naccept_until = "someday"\n'
                    '[[policy.grant]]\nsrc = ["bob"]\ndst = ["web"]\nto = ["db"]\n'
                    '[[policy.grant]]\nsrc = ["grp:ops"]\ndst = ["web"]\n')
    result = pq("check-config", home=home)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"{path}: unknown setting limits.streams (known: streams_per_session, exec_processes, "
        "exec_processes_per_peer, buffered_bytes, buffered_bytes_per_session, handshakes, handshakes_per_address)",
        f"{path}: limits.handshakes must be a positive integer, not str 'many'",
        f"{path}: unknown setting ha.stor (known: store, etcd, replica, path)",
        f"{path}:8: unknown setting policy.grant[1].to (known: src, dst, min_suite, from)",
        f"{path}: migration.accept_until 'someday' is not a date like \"2027-06-30\"",
    ]
    path.write_text('[[policy.grant]]\nsrc = ["grp:ops"]\ndst = ["web"]\n[ha]\netcd = ["http://10.0.0.1:2379"]\n')
    result = pq("check-config", home=home)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 2, lines
    assert lines[0] == f'{path}: ha.etcd is set but ha.store is "local" (add store = "etcd")'
    assert lines[1].startswith(f"{path}:1: [[policy.grant]] #1: src: 'grp:ops' is not a peer name")
