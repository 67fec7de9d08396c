"""Log lines for the journal: each line carries its syslog priority as a
``<N>`` prefix, which systemd reads from a service's stdout and stderr
(``SyslogLevelPrefix=``, on by default), so `journalctl -p warning` shows a
failover and a backend going down, and `-p err` a service left without a
healthy backend."""

from __future__ import annotations

import logging
from typing import Final

PRIORITIES: Final = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)
DEBUG_PRIORITY: Final = 7


def priority(levelno: int) -> int:
    """The syslog priority of a logging level."""
    for level, prio in PRIORITIES:
        if levelno >= level:
            return prio
    return DEBUG_PRIORITY


class JournalFormatter(logging.Formatter):
    """Every line of a record (a traceback too) starts with its priority."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))
