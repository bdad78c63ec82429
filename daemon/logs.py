"""One-line logs that say who, what and why."""

from __future__ import annotations

import logging
import re
import sys

LOG = logging.getLogger("pqtunneld")

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """Escape control characters (newlines included): a peer's text never forges a log line."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class OneLineFormatter(logging.Formatter):
    """Messages carry peer-supplied text (CLOSE/GOAWAY/RST reasons, stream targets): one line each.

    Only the message is escaped; a traceback attached by ``exc_info`` is ours and stays readable.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = one_line(record.message)
        return super().formatMessage(record)


def setup_logging(node_name: str, level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(f"%(asctime)s pqtunneld[{node_name}] %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.getLogger("zeroconf").setLevel(logging.WARNING)
