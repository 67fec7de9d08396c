"""The probe's persisted TAI64N clock: what it does with a stamp file that
is corrupt, far ahead of the wall clock, or missing, and the lease it keeps
there (written ahead of time, never per probe)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from natfail.core import tai64n
from natfail.io import statefile, timestamps
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
    assert path.read_bytes() == clock.lease and clock.lease > (clock.last or b"")
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
        # The file covers every stamp handed out: a restart starts above it.
        assert path.read_bytes() >= stamp


class _Wall:
    """A wall clock the test sets."""

    def __init__(self, ns: int = NOW_NS) -> None:
        self.ns = ns

    def __call__(self) -> int:
        return self.ns


def _count_writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    written: list[bytes] = []
    real = statefile.write_atomic

    def counting(path: Path, data: bytes, mode: int = 0o600, *, fsync: bool = True) -> None:
        written.append(data)
        real(path, data, mode, fsync=fsync)

    monkeypatch.setattr(timestamps, "write_atomic", counting)
    return written


def _seconds(stamp: bytes | None) -> float:
    assert stamp is not None
    seconds, nanoseconds = tai64n.decode(stamp)
    return seconds + nanoseconds / 1e9 - NOW_NS / 1e9


def test_no_write_per_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = _count_writes(monkeypatch)
    path = tmp_path / timestamps.STATE_FILE
    wall = _Wall()
    clock = TimestampClock(path, wall_ns=wall)
    stamps = []
    for _ in range(3000):
        wall.ns += 10**6  # 3000 probes over 3 s
        stamps.append(clock.next())
    assert stamps == sorted(set(stamps))
    # One lease, LEASE ahead of the first stamp, covers them all.
    assert len(written) == 1 and path.read_bytes() == written[0] == clock.lease
    assert _seconds(clock.lease) == pytest.approx(_seconds(stamps[0]) + timestamps.LEASE)
    assert clock.lease is not None and clock.lease > stamps[-1]


def test_the_lease_is_renewed_before_it_runs_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = _count_writes(monkeypatch)
    path = tmp_path / timestamps.STATE_FILE
    wall = _Wall()
    clock = TimestampClock(path, wall_ns=wall)
    clock.next()
    first_lease = clock.lease
    wall.ns = NOW_NS + int((timestamps.LEASE - timestamps.RENEW - 0.1) * 1e9)
    clock.next()
    assert len(written) == 1
    # Less than RENEW left: renewed before this stamp is handed out.
    wall.ns = NOW_NS + int((timestamps.LEASE - timestamps.RENEW + 0.1) * 1e9)
    stamp = clock.next()
    assert len(written) == 2 and clock.lease is not None and first_lease is not None
    assert clock.lease > first_lease and path.read_bytes() == clock.lease
    assert _seconds(clock.lease) == pytest.approx(_seconds(stamp) + timestamps.LEASE)
    # An hour of probes, one a second: a write every LEASE - RENEW seconds
    # (one more, as the renewal comes at the first probe past that point).
    for _ in range(3600):
        wall.ns += 10**9
        assert clock.next() <= path.read_bytes()
    gap = timestamps.LEASE - timestamps.RENEW
    assert 3600 / (gap + 1) - 2 <= len(written) - 2 <= 3600 / gap + 2


def test_a_restart_starts_above_the_lease(tmp_path: Path) -> None:
    path = tmp_path / timestamps.STATE_FILE
    wall = _Wall()
    before = TimestampClock(path, wall_ns=wall)
    sent = [before.next() for _ in range(100)]
    # The same wall clock, a moment later: the new process must not reuse a
    # stamp, so it starts at the lease, LEASE ahead of the clock.
    after = TimestampClock(path, wall_ns=wall)
    first = after.next()
    assert first > max(sent) and first == tai64n.successor(path_lease := before.lease or b"")
    assert _seconds(first) == pytest.approx(timestamps.LEASE, abs=0.01)
    assert after.lease is not None and after.lease > path_lease
    # Stamps stay ahead until the wall clock catches up, then follow it.
    wall.ns = NOW_NS + 60 * 10**9
    assert after.next() == tai64n.tai64n(wall.ns, whiten=True)


def test_a_clock_stepped_back_keeps_counting_from_the_last_stamp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = _count_writes(monkeypatch)
    path = tmp_path / timestamps.STATE_FILE
    wall = _Wall()
    clock = TimestampClock(path, wall_ns=wall)
    last = clock.next()
    wall.ns = NOW_NS - 3600 * 10**9
    for _ in range(1000):
        stamp = clock.next()
        assert stamp == tai64n.successor(last)
        last = stamp
    # 1000 ns of stamps use nothing of the lease: no write.
    assert len(written) == 1
    # A restart with the clock still an hour behind starts above the lease.
    restarted = TimestampClock(path, wall_ns=wall)
    assert restarted.next() > (clock.lease or b"") > last


def test_the_file_never_goes_back(tmp_path: Path) -> None:
    """A later lease another process wrote (natfailctl probe with another
    key) is kept: the next process to start is above both."""
    path = tmp_path / timestamps.STATE_FILE
    wall = _Wall()
    clock = TimestampClock(path, wall_ns=wall)
    clock.next()
    other = tai64n.tai64n(NOW_NS + 3600 * 10**9)
    path.write_bytes(other)
    wall.ns = NOW_NS + 6 * 10**9  # past the renewal point
    clock.next()
    assert path.read_bytes() == other == clock.lease


def test_a_failed_save_is_tried_again_a_second_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / timestamps.STATE_FILE
    wall = _Wall()
    attempts: list[bytes] = []
    failing = [True]
    real = statefile.write_atomic

    def flaky(target: Path, data: bytes, mode: int = 0o600, *, fsync: bool = True) -> None:
        attempts.append(data)
        if failing[0]:
            raise OSError(28, "No space left on device")
        real(target, data, mode, fsync=fsync)

    monkeypatch.setattr(timestamps, "write_atomic", flaky)
    caplog.set_level(logging.DEBUG, logger=timestamps.__name__)
    clock = TimestampClock(path, wall_ns=wall)
    caplog.clear()
    for _ in range(100):
        wall.ns += 5 * 10**6  # half a second of probes
        clock.next()
    assert len(attempts) == 1 and clock.lease is None
    failing[0] = False
    wall.ns += 6 * 10**8
    clock.next()
    assert len(attempts) == 2 and path.read_bytes() == clock.lease
    messages = [r.getMessage() for r in _records(caplog)]
    assert len(messages) == 2 and "No space left" in messages[0]
    assert "again, after 1 failed saves" in messages[1]


def test_without_a_file_nothing_is_written(tmp_path: Path) -> None:
    clock = TimestampClock(None, wall_ns=_Wall())
    assert clock.next() < clock.next() and clock.lease is None
