"""config.toml against its declared schema (operations issue): every problem, one line each,
naming the file, the key and the expected type, before anything is used."""

from __future__ import annotations

from pathlib import Path

import pytest

from pqtunneld.config import ConfigProblemsError, load_config
from pqtunneld.configschema import problems

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
                     "timers": {"keepalive": 5, "dead_after": 20}, "policy": {"anything": "policyconfig"}},
                    SOURCE) == []


def test_the_daemon_refuses_a_file_with_problems_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[node]\nmdns = "false"\nlisten = 7330\n')
    with pytest.raises(ConfigProblemsError) as caught:
        load_config(tmp_path)
    assert "\n" not in str(caught.value) and "1 more: pqtunnel check-config" in str(caught.value)
    assert len(caught.value.problems) == 2
