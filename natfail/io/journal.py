"""Log records straight into systemd's journal, with fields: its native
protocol is one datagram a record, ``KEY=value`` lines, on
``/run/systemd/journal/socket``. Besides ``MESSAGE`` and ``PRIORITY`` a record
carries the fields its ``extra={"journal": {...}}`` names, such as
``NATFAIL_SERVICE`` and ``NATFAIL_BACKEND``, so `journalctl
NATFAIL_SERVICE=wg0` shows one service's story. Used only under systemd
(``JOURNAL_STREAM`` set and the socket there); a record the journal refuses
goes to stderr instead."""

from __future__ import annotations

import logging
import socket
import struct
import sys
from pathlib import Path
from typing import Final

from natfail.logformat import priority

SOCKET: Final = Path("/run/systemd/journal/socket")
IDENTIFIER: Final = "natfail"


def _field(key: str, value: str) -> bytes:
    data = value.encode("utf-8", "replace")
    if b"\n" in data:
        # A value with a newline goes as KEY\n, its length (u64 LE), the bytes.
        return key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return key.encode() + b"=" + data + b"\n"


def encode(record: logging.LogRecord, message: str, identifier: str = IDENTIFIER) -> bytes:
    fields = {
        "MESSAGE": message,
        "PRIORITY": str(priority(record.levelno)),
        "SYSLOG_IDENTIFIER": identifier,
    }
    extra = getattr(record, "journal", None)
    if isinstance(extra, dict):
        for key, value in extra.items():
            if isinstance(key, str) and key.isupper() and value is not None:
                fields[key] = str(value)
    return b"".join(_field(k, v) for k, v in fields.items())


class JournalHandler(logging.Handler):
    def __init__(self, path: Path = SOCKET, identifier: str = IDENTIFIER) -> None:
        super().__init__()
        self.path = path
        self.identifier = identifier
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.fallback = logging.StreamHandler(sys.stderr)

    def setFormatter(self, fmt: logging.Formatter | None) -> None:
        super().setFormatter(fmt)
        self.fallback.setFormatter(fmt)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sock.sendto(encode(record, self.format(record), self.identifier), str(self.path))
        except OSError:
            self.fallback.emit(record)

    def close(self) -> None:
        self.sock.close()
        super().close()


def available(path: Path = SOCKET) -> bool:
    return path.is_socket()
