"""One-line logs that say who, what and why."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time

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


JOURNAL_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
"""syslog priorities journald reads from a ``<N>`` line prefix (sd-daemon(3))."""


class JournalFormatter(OneLineFormatter):
    """Under systemd: ``<N>`` priority prefixes and no timestamp (journald stamps each line)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{JOURNAL_PRIORITY.get(record.levelno, 6)}>" + super().format(record)


class JsonFormatter(logging.Formatter):
    """``--log-format json``: one JSON object per line; an event's fields come along whole."""

    def __init__(self, node_name: str) -> None:
        super().__init__()
        self.node_name = node_name

    def format(self, record: logging.LogRecord) -> str:
        data = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                "level": record.levelname.lower(), "node": self.node_name, "message": record.getMessage()}
        data.update(getattr(record, "event_fields", None) or {})
        if record.exc_info:
            data["traceback"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=True, default=str)  # JSON escapes every control character


LOG_FORMATS = ("text", "json")


def under_journald() -> bool:
    """systemd sets JOURNAL_STREAM when stderr goes to the journal."""
    return bool(os.environ.get("JOURNAL_STREAM"))


def setup_logging(node_name: str, level: str = "info", log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(node_name))
    elif under_journald():
        handler.setFormatter(JournalFormatter(f"pqtunneld[{node_name}] %(message)s"))
    else:
        handler.setFormatter(OneLineFormatter(f"%(asctime)s pqtunneld[{node_name}] %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.getLogger("zeroconf").setLevel(logging.WARNING)
