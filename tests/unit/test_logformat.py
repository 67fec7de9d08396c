"""The journal's priorities from natfail's log levels."""

from __future__ import annotations

import logging

from natfail.logformat import JournalFormatter, priority


def _record(level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord("natfail", level, __file__, 1, message, None, None)


def test_levels_map_to_syslog_priorities() -> None:
    assert priority(logging.CRITICAL) == 2
    assert priority(logging.ERROR) == 3
    assert priority(logging.WARNING) == 4
    assert priority(logging.INFO) == 6
    assert priority(logging.DEBUG) == 7


def test_every_line_of_a_record_carries_the_prefix() -> None:
    formatter = JournalFormatter("%(levelname)s %(message)s")
    line = formatter.format(_record(logging.WARNING, "switch service=wg0 from=a to=b"))
    assert line == "<4>WARNING switch service=wg0 from=a to=b"
    two = formatter.format(_record(logging.ERROR, "first\nsecond"))
    assert two.split("\n") == ["<3>ERROR first", "<3>second"]
