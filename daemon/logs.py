"""One-line logs that say who, what and why."""

from __future__ import annotations

import logging
import sys

LOG = logging.getLogger("pqtunneld")


def setup_logging(node_name: str, level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s pqtunneld[{node_name}] %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.getLogger("zeroconf").setLevel(logging.WARNING)
