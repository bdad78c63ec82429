"""End to end: a daemon opens its HA nonce store at start and reports it (docs/ha.md).

``pqtunnel status --json`` names the store and its health in ``ha``; an etcd store that
does not answer at start is said in one log line, and the node will not send under shared
keys. Bad ``[ha]`` settings stop ``pqtunnel up`` with one line.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from pqlab.etcd import EtcdCluster, free_port
from tests.nodes import Daemon, init_node, pq


@pytest.fixture
def node(tmp_path: Path) -> Iterator[dict]:
    home, _ = init_node(tmp_path, "alice")
    daemons: list[Daemon] = []

    def start(config: str = "") -> Daemon:
        (home / "config.toml").write_text(config)
        daemon = Daemon(home).start()
        daemons.append(daemon)
        return daemon

    yield {"home": home, "start": start}
    for daemon in daemons:
        daemon.stop()


def test_by_default_the_node_keeps_its_nonce_state_in_a_local_store(node: dict) -> None:
    ha = node["start"]().status()["ha"]
    assert ha == {"store": "local", "replica": "r1", "healthy": True, "detail": str(node["home"] / "nonces.sqlite"),
                  "sending_under_shared_keys": True}
    with sqlite3.connect(node["home"] / "nonces.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    status = pq("status", home=node["home"])
    assert "nonce store: local (healthy" in status.stdout


def test_an_etcd_store_that_does_not_answer_at_start_is_reported_and_blocks_shared_sending(node: dict) -> None:
    dead = ", ".join(f'"http://127.0.0.1:{free_port()}"' for _ in range(2))  # nobody listens there
    daemon = node["start"](f'[ha]\nstore = "etcd"\netcd = [{dead}]\nreplica = "r2"\n')
    ha = daemon.status()["ha"]
    assert ha["store"] == "etcd" and ha["replica"] == "r2"
    assert ha["healthy"] is False and ha["detail"].startswith("0/2 endpoints healthy")
    assert ha["sending_under_shared_keys"] is False
    lines = [line for line in daemon.logs().splitlines() if "nonce store" in line]
    assert len(lines) == 1 and "etcd unreachable" in lines[0] and "refusing to send under shared keys" in lines[0]
    assert "Traceback" not in daemon.logs()


def test_an_etcd_store_that_answers_is_healthy(node: dict) -> None:
    with EtcdCluster() as cluster:
        urls = ", ".join(f'"{url}"' for url in cluster.endpoints)
        ha = node["start"](f'[ha]\nstore = "etcd"\netcd = [{urls}]\n').status()["ha"]
        assert ha["healthy"] is True and ha["detail"] == "3/3 endpoints healthy"
        assert ha["sending_under_shared_keys"] is True


@pytest.mark.parametrize("config, message", [
    ('[ha]\nstore = "redis"\n', 'ha.store must be "local" or "etcd"'),
    ('[ha]\npath = "notes.sqlite"\n', "is not a pqtunnel nonce store"),
])
def test_bad_ha_settings_stop_the_daemon_with_one_line(node: dict, config: str, message: str) -> None:
    home = node["home"]
    with sqlite3.connect(home / "notes.sqlite") as db:
        db.execute("CREATE TABLE IF NOT EXISTS notes (text TEXT)")
    (home / "config.toml").write_text(config)
    result = pq("up", "--no-mdns", "--socks", "off", "--listen", "127.0.0.1:0", home=home, timeout=30)
    assert result.returncode != 0
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
