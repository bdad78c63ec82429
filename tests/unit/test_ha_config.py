"""Spec for the ``[ha]`` table of config.toml (daemon/config.py): strict, one-line errors
that name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pqtunnel.errors import ConfigError
from pqtunneld.config import HaSettings, load_config

ETCD = '["http://127.0.0.1:2379", "http://127.0.0.1:22379", "https://etcd.example:32379/"]'


def config_with(tmp_path: Path, ha: str) -> Path:
    (tmp_path / "config.toml").write_text("[ha]\n" + ha + "\n")
    return tmp_path


def test_without_ha_the_store_is_local_in_the_home(tmp_path: Path) -> None:
    config = load_config(tmp_path)
    assert config.ha == HaSettings()
    assert config.ha.store == "local" and config.ha.replica == "r1"
    assert config.nonce_store_path == tmp_path / "nonces.sqlite"


def test_an_etcd_store_lists_its_client_urls(tmp_path: Path) -> None:
    home = config_with(tmp_path, f'store = "etcd"\netcd = {ETCD}\nreplica = "R2"')
    ha = load_config(home).ha
    assert ha.store == "etcd" and ha.replica == "r2"
    assert ha.etcd == ("http://127.0.0.1:2379", "http://127.0.0.1:22379", "https://etcd.example:32379")


def test_a_shared_local_file_is_relative_to_the_home(tmp_path: Path) -> None:
    config = load_config(config_with(tmp_path, 'path = "../shared/nonces.sqlite"'))
    assert config.nonce_store_path == tmp_path / "../shared/nonces.sqlite"


@pytest.mark.parametrize("ha, message", [
    ('store = "redis"', 'ha.store must be "local" or "etcd"'),
    ('store = "etcd"', "needs ha.etcd"),
    (f"etcd = {ETCD}", 'ha.etcd is set but ha.store is "local"'),
    ('store = "etcd"\netcd = []', "ha.etcd must be a non-empty list"),
    ('store = "etcd"\netcd = "http://127.0.0.1:2379"', "ha.etcd must be a non-empty list"),
    ('store = "etcd"\netcd = ["127.0.0.1:2379"]', "ha.etcd: '127.0.0.1:2379' is not an etcd client URL"),
    ('store = "etcd"\netcd = ["http://127.0.0.1"]', "is not an etcd client URL"),
    ('store = "etcd"\netcd = ["http://127.0.0.1:2379/v3"]', "is not an etcd client URL"),
    ('store = "etcd"\netcd = ["http://127.0.0.1:99999"]', "is not an etcd client URL"),
    ('replica = "no spaces"', "ha.replica: invalid replica name"),
    ("replica = 3", "ha.replica must be a name"),
    ('path = ""', "ha.path must be a file path"),
    ('stor = "local"', "unknown setting ha.stor (known: store, etcd, replica, path)"),
])
def test_mistakes_in_ha_are_one_line_errors_naming_file_and_key(tmp_path: Path, ha: str, message: str) -> None:
    home = config_with(tmp_path, ha)
    with pytest.raises(ConfigError) as error:
        load_config(home)
    text = str(error.value)
    assert message in text and str(home / "config.toml") in text and "\n" not in text


def test_ha_must_be_a_table(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('ha = "etcd"\n')
    with pytest.raises(ConfigError, match=r"ha must be a table \(\[ha\]\), not str 'etcd'"):
        load_config(tmp_path)
