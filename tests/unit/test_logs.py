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
