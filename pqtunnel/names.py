"""Node names: DNS labels, because peers are reached as ``SERVICE.PEER.pq``."""

from __future__ import annotations

import re

from .errors import ConfigError

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def validate_name(name: str, what: str = "node name") -> str:
    """Return the normalised (lower-case) name or raise ConfigError saying what is wrong."""
    normalised = name.strip().lower()
    if not _LABEL.match(normalised):
        raise ConfigError(
            f"invalid {what} {name!r}: use 1-63 letters, digits or '-', not starting or ending with '-'"
        )
    return normalised
