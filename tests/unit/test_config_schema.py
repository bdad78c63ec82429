"""config.toml against its declared schema (operations issue): every problem, one line each,
naming the file, the key and the expected type, before anything is used."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from pqtunneld.config import ConfigProblemsError, ResourceLimits, load_config
from pqtunneld.configcheck import config_problems
from pqtunneld.configschema import LIMIT_KEYS, problems

SOURCE = "config.toml"


@pytest.mark.parametrize("data, expected", [
    ({"node": {"mdns": "false"}}, "node.mdns must be true or false, not str 'false'"),
    ({"service": {"web": "x"}}, "unknown table or key 'service'"),
    ({"colour": "blue"}, "unknown table or key 'colour'"),
    ({"node": {"log_level": "verbose"}}, "node.log_level must be one of debug, info, warning, error"),
    ({"node": {"listen": 7330}}, "node.listen must be a string, not int 7330"),
    ({"node": {"socks": 1080}}, "node.socks must be a string, not int 1080"),
    ({"node": {"lisen": "x"}}, "unknown setting node.lisen"),
    ({"timers": {"keepalive": 40}}, "timers.keepalive (40 s) must be shorter than timers.dead_after (35 s)"),
    ({"peers": {"bob": 7330}}, "[peers] must be a table of NAME"),
    ({"node": "x"}, "node must be a table ([node]), not str 'x'"),
    ({"limits": {"streams": 5}}, "unknown setting limits.streams (known: streams_per_session,"),
    ({"limits": {"handshakes": 0}}, "limits.handshakes must be a positive integer, not int 0"),
    ({"limits": {"exec_processes": "64"}}, "limits.exec_processes must be a positive integer, not str '64'"),
    ({"ha": {"stor": "local"}}, "unknown setting ha.stor (known: store, etcd, replica, path)"),
    ({"ha": {"store": "redis"}}, 'ha.store must be "local" or "etcd", not str \'redis\''),
    ({"ha": {"etcd": "http://10.0.0.1:2379"}}, "ha.etcd must be a non-empty list of URLs"),
    ({"migration": {"accept_untill": "2027-06-30"}}, "unknown setting migration.accept_untill (known: accept_until)"),
    ({"migration": {"accept_until": 20270630}}, 'migration.accept_until must be a date like "2027-06-30", not int'),
    ({"policy": {"grants": []}}, "unknown setting policy.grants (known: grant, trigger, legacy, test)"),
    ({"policy": {"grant": [{"src": ["a"], "dst": ["web"]}, {"src": ["b"], "dst": ["web"], "to": ["db"]}]}},
     "unknown setting policy.grant[2].to (known: src, dst, min_suite, from)"),
    ({"policy": {"grant": {"src": ["a"]}}}, "policy.grant must be tables written [[policy.grant]], not dict"),
    ({"policy": {"grant": [{"src": "alice", "dst": ["web"]}]}}, "policy.grant[1].src must be a list of strings"),
    ({"policy": {"legacy": {"rate": True}}}, 'policy.legacy.rate must be a size like "256KiB"'),
    ({"policy": {"test": [{"src": "alice", "accept": ["web"], "expect": "x"}]}}, "unknown setting policy.test[1].expect"),
])
def test_each_mistake_is_named_with_its_key_and_expected_type(data: dict, expected: str) -> None:
    found = problems(data, SOURCE)
    assert len(found) == 1 and expected in found[0] and found[0].startswith(SOURCE), found


def test_every_problem_is_reported_not_only_the_first() -> None:
    found = problems({"node": {"mdns": "no", "log_level": 3}, "servces": {}}, SOURCE)
    assert len(found) == 3


def test_a_valid_file_has_no_problems() -> None:
    assert problems({"node": {"listen": "0.0.0.0:7330", "mdns": False, "log_level": "debug",
                              "allowed_ports": [8080]},
                     "peers": {"bob": ["10.0.0.2:7330", "10.0.0.3:7330"]},
                     "services": {"web": "127.0.0.1:8080", "tools": {"exec": ["x"]}},
                     "timers": {"keepalive": 5, "dead_after": 20},
                     "limits": {"streams_per_session": 64}, "ha": {"store": "etcd", "etcd": ["http://10.0.0.1:2379"]},
                     "migration": {"accept_until": "2027-06-30"},
                     "policy": {"grant": [{"src": ["alice"], "dst": ["web"], "min_suite": "hybrid"}],
                                "trigger": [{"outside": ["10.0.0.0/8"], "min_suite": "pq-strong"}],
                                "legacy": {"services": ["web"], "rate": "256KiB/s", "burst": 262144},
                                "test": [{"src": "alice", "accept": ["web"], "deny": ["db"]}]}},
                    SOURCE) == []


def test_the_schema_knows_every_limit_the_node_has() -> None:
    assert set(LIMIT_KEYS) == {f.name for f in fields(ResourceLimits)}


def test_check_config_also_asks_each_tables_own_reader_and_lists_every_answer(tmp_path: Path) -> None:
    """Well-typed values only a reader can judge: one line per table, none hiding another."""
    path = tmp_path / "config.toml"
    path.write_text('[limits]\nhandshake = 4\n'
                    '[ha]\netcd = ["http://10.0.0.1:2379"]\n'
                    '[migration]\naccept_until = "someday"\n'
                    '[[policy.grant]]\nsrc = ["grp:ops"]\ndst = ["web"]\n')
    found = config_problems(tmp_path)
    assert len(found) == 4 and all(line.startswith(str(path)) for line in found), found
    assert "unknown setting limits.handshake" in found[0]
    assert 'ha.etcd is set but ha.store is "local"' in found[1]
    assert "migration.accept_until 'someday' is not a date" in found[2]
    assert "[[policy.grant]] #1: src" in found[3] and "grp:ops" in found[3] and f"{path}:7:" in found[3]


def test_a_missing_default_file_has_no_problems(tmp_path: Path) -> None:
    assert config_problems(tmp_path) == []


def test_the_daemon_refuses_a_file_with_problems_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[node]\nmdns = "false"\nlisten = 7330\n')
    with pytest.raises(ConfigProblemsError) as caught:
        load_config(tmp_path)
    assert "\n" not in str(caught.value) and "1 more: pqtunnel check-config" in str(caught.value)
    assert len(caught.value.problems) == 2
