"""``[migration] accept_until``: the day the legacy (classical) path closes, read with the config."""

from __future__ import annotations

from pathlib import Path

import pytest

from pqtunnel.errors import ConfigError
from pqtunneld.config import load_config

pytestmark = pytest.mark.unit


def config_with(tmp_path: Path, text: str):
    (tmp_path / "config.toml").write_text(text)
    return load_config(tmp_path)


def test_a_date_counts_until_the_end_of_that_day_utc(tmp_path: Path) -> None:
    config = config_with(tmp_path, '[migration]\naccept_until = "2027-06-30"\n')
    assert config.migration_accept_until == 1_814_400_000  # 2027-07-01T00:00:00Z


def test_an_iso_date_time_is_taken_as_written(tmp_path: Path) -> None:
    config = config_with(tmp_path, '[migration]\naccept_until = "2027-06-30T12:00:00+02:00"\n')
    assert config.migration_accept_until == 1_814_349_600


def test_without_the_section_the_legacy_path_has_no_deadline(tmp_path: Path) -> None:
    assert config_with(tmp_path, "").migration_accept_until is None


@pytest.mark.parametrize("text, reason", [
    ('accept_until = "30/06/2027"', "is not a date"),
    ("accept_until = 2027", "must be a date"),
    ('until = "2027-06-30"', "unknown setting migration.until (known: accept_until)"),
])
def test_a_bad_deadline_is_a_one_line_config_error(tmp_path: Path, text: str, reason: str) -> None:
    with pytest.raises(ConfigError) as error:
        config_with(tmp_path, f"[migration]\n{text}\n")
    assert reason in str(error.value) and "\n" not in str(error.value)
