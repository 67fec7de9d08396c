"""Records into the journal's native protocol, read back by a datagram
socket standing in for journald's."""

from __future__ import annotations

import logging
import socket
import struct
from pathlib import Path

from natfail.io.journal import JournalHandler, encode


def _parse(datagram: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    rest = datagram
    while rest:
        line, _, after = rest.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            rest = after
        else:  # KEY\n, u64 length, bytes, \n
            (size,) = struct.unpack("<Q", after[:8])
            fields[line.decode()] = after[8 : 8 + size].decode()
            rest = after[8 + size + 1 :]
    return fields


def _record(level: int, message: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("natfail", level, __file__, 1, message, None, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_a_record_carries_priority_identifier_and_its_fields() -> None:
    record = _record(
        logging.WARNING, "x", journal={"NATFAIL_SERVICE": "wg0", "NATFAIL_BACKEND": None}
    )
    fields = _parse(encode(record, "switch service=wg0 from=a to=b"))
    assert fields == {
        "MESSAGE": "switch service=wg0 from=a to=b",
        "PRIORITY": "4",
        "SYSLOG_IDENTIFIER": "natfail",
        "NATFAIL_SERVICE": "wg0",
    }
    multi = _parse(encode(_record(logging.ERROR, "x"), "first\nsecond"))
    assert multi["MESSAGE"] == "first\nsecond" and multi["PRIORITY"] == "3"


def test_the_handler_sends_to_the_journal_socket(tmp_path: Path) -> None:
    path = tmp_path / "journal.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as journald:
        journald.bind(str(path))
        handler = JournalHandler(path)
        handler.setFormatter(logging.Formatter("%(message)s"))
        try:
            handler.emit(_record(logging.INFO, "backend a is up", journal={"NATFAIL_BACKEND": "a"}))
            fields = _parse(journald.recv(65536))
        finally:
            handler.close()
    assert fields["MESSAGE"] == "backend a is up"
    assert fields["PRIORITY"] == "6" and fields["NATFAIL_BACKEND"] == "a"
