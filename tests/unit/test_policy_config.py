"""Spec for reading [policy] from config.toml (daemon/policyconfig.py): what a valid section
becomes, and the one-line error, naming file, line, table and key, for each kind of mistake."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from pqtunnel.crypto.suites import CLASSICAL, HYBRID, PQ_STRONG
from pqtunnel.errors import ConfigError
from pqtunnel.policy import RateLimit
from pqtunneld.config import load_config
from pqtunneld.decisions import PolicyTestFailedError, build_policy
from pqtunneld.policycheck import check_from_config, describe

FULL = """
[node]
suites = ["hybrid", "pq-strong", "classical"]

[services]
web = "127.0.0.1:8080"
db = "127.0.0.1:5432"
status = "127.0.0.1:9000"

[policy]
[[policy.grant]]
src = ["Alice", "group:ops", "pq1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "*"]
dst = ["web", "port:8080", "*"]
min_suite = "pq-strong"
from = ["10.0.0.0/8", "fd00::/8", "192.0.2.7"]

[[policy.trigger]]
outside = ["10.0.0.0/8"]
min_suite = "pq-strong"

[policy.legacy]
services = ["status"]
rate = "256KiB/s"
burst = "1.5 MB"

[[policy.test]]
src = "alice"
accept = ["web"]
deny = ["nosuch"]
from = "10.0.0.1"
suite = "pq-strong"
"""


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "config.toml").write_text(text)
    return tmp_path


def test_a_full_policy_section_becomes_access_rules(tmp_path: Path) -> None:
    rules = load_config(write(tmp_path, FULL)).policy
    assert rules is not None and rules.source == str(tmp_path / "config.toml")
    (grant,) = rules.grants
    assert grant.src == ("alice", "group:ops", "pq1:" + "a" * 32, "*")
    assert grant.dst == ("web", "port:8080", "*") and grant.min_suite == "pq-strong" and grant.rule == "grant:1"
    assert grant.networks == tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "fd00::/8", "192.0.2.7/32"))
    (trigger,) = rules.triggers
    assert trigger.min_suite == "pq-strong" and trigger.rule == "trigger:1"
    assert rules.legacy.services == ("status",) and rules.legacy.limit == RateLimit(262144, 1_500_000)
    (test,) = rules.tests
    assert (test.src, test.accept, test.deny, test.address, test.suite) == ("alice", ("web",), ("nosuch",),
                                                                             "10.0.0.1", "pq-strong")


def test_no_policy_section_means_todays_behaviour(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "[services]\nweb = \"127.0.0.1:80\"\n")).policy is None
    assert load_config(tmp_path / "empty").policy is None


def test_an_empty_policy_section_denies_everything(tmp_path: Path) -> None:
    rules = load_config(write(tmp_path, "[policy]\n")).policy
    assert rules is not None and rules.grants == () and rules.triggers == ()


def test_a_rate_alone_gets_a_one_second_burst(tmp_path: Path) -> None:
    rules = load_config(write(tmp_path, '[policy.legacy]\nrate = 1000\n')).policy
    assert rules is not None and rules.legacy.limit == RateLimit(1000, 1000)


@pytest.mark.parametrize("section, message", [
    ('[policy]\nallow = 1\n', ":1: unknown setting policy.allow (known: grant, trigger, legacy, test)"),
    ('[policy]\ngrant = 1\n', ":1: policy.grant must be tables written [[policy.grant]], not int 1"),
    ('[[policy.grant]]\ndst = ["web"]\n', ":1: [[policy.grant]] #1: src: is missing"),
    ('[[policy.grant]]\nsrc = []\ndst = ["web"]\n', "[[policy.grant]] #1: src: must be a non-empty list of strings"),
    ('[[policy.grant]]\nsrc = ["*"]\ndst = ["*"]\n\n[[policy.grant]]\nsrc = ["grp:ops"]\ndst = ["web"]\n',
     ":5: [[policy.grant]] #2: src: 'grp:ops' is not a peer name, group:NAME, pq1:... or *"),
    ('[[policy.grant]]\nsrc = ["pq1:short"]\ndst = ["web"]\n', "src: 'pq1:short' is not a peer name"),
    ('[[policy.grant]]\nsrc = ["*"]\ndst = ["port:99999"]\n', "dst: 'port:99999' is not a service name, port:N or *"),
    ('[[policy.grant]]\nsrc = ["*"]\ndst = ["web"]\nmin_suite = "quantum"\n',
     "min_suite: 'quantum' is not a suite; choose one of: classical, hybrid, pq-strong"),
    ('[[policy.grant]]\nsrc = ["*"]\ndst = ["web"]\nfrom = ["10.0.0.0/33"]\n', "from: '10.0.0.0/33' is not a network"),
    ('[[policy.grant]]\nsrc = ["*"]\ndst = ["web"]\n\n[[policy.grant]]\nsrc = ["*"]\ndst = ["db"]\nto = ["x"]\n',
     ":5: unknown setting policy.grant[2].to (known: src, dst, min_suite, from)"),
    ('[[policy.trigger]]\noutside = ["10.0.0.0/8"]\n', "[[policy.trigger]] #1: min_suite: is missing"),
    ('[[policy.trigger]]\nmin_suite = "hybrid"\n', "[[policy.trigger]] #1: outside: is missing"),
    ('[policy.legacy]\nrate = "fast"\n', "[policy.legacy]: rate: 'fast' is not a size such as \"256KiB/s\""),
    ('[policy.legacy]\nburst = "1KiB"\n', "[policy.legacy]: burst: needs a rate"),
    ('[policy.legacy]\nrate = "0KiB/s"\n', "rate: '0KiB/s' must be at least 1 byte"),
    ('[policy.legacy]\nservices = ["bad name"]\n', "[policy.legacy]: services: invalid service name"),
    ('[[policy.test]]\nsrc = "alice"\n', "[[policy.test]] #1: needs accept or deny"),
    ('[[policy.test]]\nsrc = "alice"\naccept = ["*"]\n', "accept: '*' is not a service name or port:N"),
    ('[[policy.test]]\nsrc = "alice"\naccept = ["web"]\nfrom = "here"\n', "from: 'here' is not an IP address"),
    ('[[policy.test]]\nsrc = 7\naccept = ["web"]\n', ":1: policy.test[1].src must be a string, not int 7"),
])
def test_each_mistake_is_one_line_naming_file_table_and_key(tmp_path: Path, section: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, section))
    text = str(error.value)
    assert text.startswith(str(tmp_path / "config.toml")) and message in text and "\n" not in text


def test_a_trigger_above_every_allowed_suite_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"min_suite: pq-strong is above every suite in \[node\] suites \(hybrid\)"):
        load_config(write(tmp_path, '[node]\nsuites = ["hybrid"]\n[[policy.trigger]]\noutside = ["10.0.0.0/8"]\n'
                                    'min_suite = "pq-strong"\n'))


def test_a_failing_policy_test_refuses_the_policy_naming_the_test_and_its_line(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[services]\nweb = "127.0.0.1:1"\n[[policy.grant]]\nsrc = ["*"]\n'
                                         'dst = ["web"]\n\n[[policy.test]]\nsrc = "alice"\ndeny = ["web"]\n'))
    with pytest.raises(PolicyTestFailedError) as error:
        build_policy(config, "bob", None, None)
    assert str(error.value) == (f"{tmp_path / 'config.toml'}:7: policy test #1 (src 'alice'): alice -> web should be "
                                "denied, but is allowed by grant:1: grant:1 allows service web")


def test_the_preferred_suite_is_the_nodes_first_raised_by_triggers(tmp_path: Path) -> None:
    home = write(tmp_path, FULL)
    assert load_config(home).suites == (HYBRID, PQ_STRONG, CLASSICAL)
    inside = check_from_config(home, None, "alice", "web", address="10.0.0.1")
    assert inside.suite == "hybrid" and not inside.allowed  # grant:1 needs pq-strong
    outside = check_from_config(home, None, "alice", "web", address="192.0.2.7")
    assert outside.suite == "pq-strong" and outside.allowed and outside.decision.rule == "grant:1"
    assert describe(outside)[0] == "allowed: alice -> service web (grant:1: grant:1 allows service web)"


@pytest.mark.parametrize("address, suite, message", [("nowhere", None, "--from 'nowhere' is not an IP address"),
                                                     (None, "rot13", "--suite 'rot13' is not a suite")])
def test_policy_check_refuses_bad_flags(tmp_path: Path, address: str | None, suite: str | None, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_from_config(write(tmp_path, FULL), None, "alice", "web", address=address, suite=suite)
