"""Log lines cannot be forged (hardening issue, finding 7): whatever text a peer or a stranger
supplies (certificate names, service names, CLOSE reasons), each log record stays one line."""

from __future__ import annotations

import logging

from pqtunneld.logs import OneLineFormatter, one_line

FORGED = "bob\n2026-11-30 12:00:00 pqtunneld[bob] INFO session up: alice outbound 10.0.0.1:7330\r\x1b[2K"


def test_control_characters_in_peer_text_are_escaped() -> None:
    text = one_line(FORGED)
    assert "\n" not in text and "\r" not in text and "\x1b" not in text
    assert "\\n2026-11-30" in text, "the text stays readable, just escaped"


def test_the_formatter_keeps_every_record_on_one_line() -> None:
    formatter = OneLineFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord("pqtunneld", logging.WARNING, __file__, 1,
                               "certificate for %s is not valid", (FORGED,), None)
    assert formatter.format(record).count("\n") == 0
    for separator in ("\u2028", "\u2029", "\x85"):
        assert separator not in one_line(f"a{separator}b")


def test_json_log_lines_carry_the_events_fields() -> None:
    import json

    from pqtunneld.logs import JsonFormatter

    record = logging.LogRecord("pqtunneld", logging.INFO, __file__, 1, "session up: %s", (FORGED,), None)
    record.event_fields = {"event": "session_up", "peer": "bob", "kem": "X25519+ML-KEM-768"}
    line = JsonFormatter("alice").format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert data["event"] == "session_up" and data["kem"] == "X25519+ML-KEM-768" and data["node"] == "alice"
    assert data["level"] == "info" and data["message"].startswith("session up: bob\n")


def test_under_journald_lines_get_a_priority_and_no_timestamp() -> None:
    from pqtunneld.logs import JournalFormatter

    formatter = JournalFormatter("pqtunneld[alice] %(message)s")
    warning = logging.LogRecord("pqtunneld", logging.WARNING, __file__, 1, "careful", (), None)
    assert formatter.format(warning) == "<4>pqtunneld[alice] careful"
    info = logging.LogRecord("pqtunneld", logging.INFO, __file__, 1, "fine", (), None)
    assert formatter.format(info).startswith("<6>")
