"""The probe's persisted TAI64N clock: what it does with a stamp file that
is corrupt, far ahead of the wall clock, or missing."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from natfail.core import tai64n
from natfail.io import timestamps
from natfail.io.timestamps import TimestampClock

NOW_NS = 1_700_000_000 * 10**9
DAY_NS = 86400 * 10**9


def _records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == timestamps.__name__]


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"\xff" * 12, "nanoseconds"),
        ((tai64n.TAI64_BASE + 5).to_bytes(8, "big") + (10**9).to_bytes(4, "big"), "nanoseconds"),
        (bytes(12), "before 1970"),
        ((tai64n.TAI64_BASE + 2**40).to_bytes(8, "big") + bytes(4), "beyond any clock"),
        (b"", "0 bytes"),
        (bytes(13), "13 bytes"),
        (b"x" * 5000, "13 bytes"),
    ],
)
def test_an_invalid_stamp_gives_one_warning_and_starts_from_the_clock(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, why: str
) -> None:
    path = tmp_path / timestamps.STATE_FILE
    path.write_bytes(content)
    caplog.set_level(logging.DEBUG, logger=timestamps.__name__)
    clock = TimestampClock(path, wall_ns=lambda: NOW_NS)
    [record] = _records(caplog)
    message = record.getMessage()
    assert record.levelno == logging.WARNING and "\n" not in message
    assert str(path) in message and why in message and "wall clock" in message
    first = clock.next()
    assert first == tai64n.tai64n(NOW_NS, whiten=True)
    assert clock.next() > first
    assert path.read_bytes() == clock.last
    # Every probe round works; nothing more is logged.
    for _ in range(5):
        clock.next()
    assert len(_records(caplog)) == 1


def test_a_far_future_stamp_warns_once_and_is_counted_from(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / timestamps.STATE_FILE
    ahead = tai64n.tai64n(NOW_NS + 10 * DAY_NS)
    path.write_bytes(ahead)
    caplog.set_level(logging.DEBUG, logger=timestamps.__name__)
    clock = TimestampClock(path, wall_ns=lambda: NOW_NS)
    [record] = _records(caplog)
    message = record.getMessage()
    assert record.levelno == logging.WARNING
    assert str(path) in message and "10 days ahead" in message
    stamp = clock.next()
    assert stamp == tai64n.successor(ahead) and stamp > ahead
    assert len(_records(caplog)) == 1


def test_a_stamp_a_little_ahead_is_silent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / timestamps.STATE_FILE
    path.write_bytes(tai64n.tai64n(NOW_NS + 3600 * 10**9))
    caplog.set_level(logging.DEBUG, logger=timestamps.__name__)
    TimestampClock(path, wall_ns=lambda: NOW_NS)
    assert _records(caplog) == []


def test_a_missing_file_says_where_probes_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / timestamps.STATE_FILE
    caplog.set_level(logging.DEBUG, logger=timestamps.__name__)
    clock = TimestampClock(path, wall_ns=lambda: NOW_NS)
    [record] = _records(caplog)
    message = record.getMessage()
    assert record.levelno == logging.INFO
    assert str(path) in message and "wall clock" in message and "timeout" in message
    clock.next()
    assert path.exists()
    # Once the file exists, a restart says nothing.
    caplog.clear()
    TimestampClock(path, wall_ns=lambda: NOW_NS)
    assert _records(caplog) == []


def test_a_fifo_in_its_place_does_not_hang(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / timestamps.STATE_FILE
    os.mkfifo(path)
    started = time.monotonic()
    clock = TimestampClock(path, wall_ns=lambda: NOW_NS)
    assert time.monotonic() - started < 5
    assert clock.last is None
    [record] = _records(caplog)
    assert "not a regular file" in record.getMessage()


def test_a_failing_save_is_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    caplog.set_level(logging.DEBUG, logger=timestamps.__name__)
    clock = TimestampClock(blocker / "stamp", wall_ns=lambda: NOW_NS)  # ENOTDIR
    caplog.clear()
    stamps = [clock.next() for _ in range(10)]
    assert stamps == sorted(set(stamps))
    assert len(_records(caplog)) == 1


@pytest.mark.parametrize("wall", [-(2**70), -1, 0, 2**63, 2**80])
def test_next_never_raises_whatever_the_wall_clock(tmp_path: Path, wall: int) -> None:
    clock = TimestampClock(tmp_path / "ts", wall_ns=lambda: wall)
    first = clock.next()
    assert tai64n.problem(first) is None
    assert clock.next() > first


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    content=st.one_of(st.binary(max_size=20), st.binary(min_size=12, max_size=12)),
    walls=st.lists(st.integers(min_value=-(2**66), max_value=2**66), min_size=1, max_size=8),
)
def test_any_stored_content_and_clock_never_raise_and_never_go_back(
    tmp_path: Path, content: bytes, walls: list[int]
) -> None:
    path = tmp_path / "ts"
    path.write_bytes(content)
    readings = iter(walls * 2)
    clock = TimestampClock(path, wall_ns=lambda: next(readings))
    # A stamp that may have been sent is never undercut.
    last = content if tai64n.problem(content) is None else None
    for _ in walls:
        stamp = clock.next()
        assert tai64n.problem(stamp) is None
        if last is not None:
            assert stamp > last
        last = stamp
        assert path.read_bytes() == stamp
