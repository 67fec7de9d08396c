"""The iptables helper process: restarted when it dies, quiet when the daemon goes.

Real forked processes and real pipes; only python-iptables is replaced, by a family
object that answers without touching any table (tests/netns/test_iptables_helper.py
runs the real one in a namespace)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

import pytest

from natfail.io import iptables
from natfail.io.dataplane import DataplaneError
from natfail.io.iptables import _FamilyProcess, _serve
from natfail.lab import wait_until


class FakeFamily:
    """Stands in for :class:`natfail.io.iptables._IptFamily` inside the helper."""

    def __init__(self, family: int) -> None:
        self.family = family

    def read(self) -> tuple[int, int]:
        return self.family, os.getpid()

    def slow(self, seconds: float) -> str:
        time.sleep(seconds)
        return "late"

    def exit_once(self, marker: str, code: int) -> str:
        """Dies in the middle of the first request (the helper killed while it works);
        the helper started after it finds the marker and answers."""
        path = Path(marker)
        if not path.exists():
            path.touch()
            os._exit(code)
        return "answered by the new helper"

    def exit_always(self, code: int) -> None:
        os._exit(code)

    def fail(self) -> None:
        raise ValueError("bad value\nsecond line")


class MissingLibrary:
    def __init__(self, family: int) -> None:
        raise ImportError("No module named 'iptc'")


def _dead(pid: int) -> bool:
    """Gone, or a zombie nobody has reaped yet: in either case it runs no more."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _kill(pid: int | None) -> None:
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: _dead(pid), 10)


@pytest.fixture
def helper() -> Iterator[_FamilyProcess]:
    p = _FamilyProcess(4, factory=FakeFamily)
    yield p
    p.close()


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == iptables.__name__ and r.levelno == logging.WARNING
    ]


def test_a_killed_helper_is_replaced_and_the_call_answered(
    helper: _FamilyProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, iptables.__name__)
    first = helper.pid
    assert helper.call("read") == (4, first)
    _kill(first)
    family, pid = helper.call("read")
    assert family == 4 and pid == helper.pid != first
    lines = _warnings(caplog)
    assert len(lines) == 1, lines
    assert f"pid {first}" in lines[0] and "killed by SIGKILL" in lines[0]
    assert f"pid {pid}" in lines[0] and "\n" not in lines[0]
    assert helper.call("read") == (4, pid)  # and it stays
    assert len(_warnings(caplog)) == 1


def test_a_helper_that_dies_in_the_middle_of_a_request_is_asked_again(
    helper: _FamilyProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, iptables.__name__)
    first = helper.pid
    assert helper.call("exit_once", str(tmp_path / "died"), 3) == "answered by the new helper"
    assert helper.pid != first
    lines = _warnings(caplog)
    assert len(lines) == 1 and "exit status 3" in lines[0], lines


def test_a_helper_that_dies_again_at_once_is_one_error_and_the_next_call_recovers(
    helper: _FamilyProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, iptables.__name__)
    with pytest.raises(DataplaneError) as err:
        helper.call("exit_always", 7)
    msg = str(err.value)
    assert "died at once" in msg and "exit status 7" in msg and "\n" not in msg
    assert helper.call("read")[0] == 4
    lines = _warnings(caplog)
    assert len(lines) == 2, lines  # one per new helper
    assert all("exit status 7" in line for line in lines), lines
    assert "died at once" in lines[1], lines


def test_an_interrupted_request_does_not_leave_its_reply_for_the_next_one(
    helper: _FamilyProcess, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, iptables.__name__)
    first = helper.pid
    conn = helper._conn
    assert conn is not None
    real_recv = conn.recv

    def interrupted() -> object:
        raise KeyboardInterrupt

    monkeypatch.setattr(conn, "recv", interrupted)
    with pytest.raises(KeyboardInterrupt):
        helper.call("read")
    monkeypatch.setattr(conn, "recv", real_recv)
    # a fresh helper's answer, not the stale one of the interrupted request
    assert helper.call("read") == (4, helper.pid)
    assert helper.pid != first
    lines = _warnings(caplog)
    assert len(lines) == 1 and "interrupted request" in lines[0], lines


def test_when_no_helper_can_be_started_the_call_fails_with_one_line_and_a_later_one_works(
    helper: _FamilyProcess, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, iptables.__name__)
    first = helper.pid
    tries: list[int] = []

    def no_fork(self: _FamilyProcess) -> None:
        tries.append(1)
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(iptables, "_START_PAUSE", 0.0)
    real_start = _FamilyProcess._start
    monkeypatch.setattr(_FamilyProcess, "_start", no_fork)
    _kill(first)
    for _ in range(2):  # the daemon keeps its state and calls again: same clear error
        with pytest.raises(DataplaneError) as err:
            helper.call("read")
        msg = str(err.value)
        assert "\n" not in msg
        assert f"(pid {first}) died: killed by SIGKILL" in msg, msg
        assert "cannot start a new one: " in msg and "Resource temporarily unavailable" in msg
    assert len(tries) == 2 * iptables._START_TRIES
    assert _warnings(caplog) == []
    monkeypatch.setattr(_FamilyProcess, "_start", real_start)
    assert helper.call("read")[0] == 4
    lines = _warnings(caplog)
    assert len(lines) == 1 and "killed by SIGKILL" in lines[0], lines


def test_errors_of_the_work_stay_errors_and_keep_the_helper(helper: _FamilyProcess) -> None:
    pid = helper.pid
    with pytest.raises(DataplaneError, match=r"^bad value second line$"):
        helper.call("fail")
    assert helper.pid == pid
    assert helper.call("read") == (4, pid)


def test_a_helper_that_cannot_load_python_iptables_says_so_and_is_not_restarted() -> None:
    p = _FamilyProcess(6, factory=MissingLibrary)
    try:
        pid = p.pid
        for _ in range(2):
            with pytest.raises(DataplaneError, match=r"^iptables: No module named 'iptc'$"):
                p.call("read")
        assert p.pid == pid
    finally:
        p.close()


def test_ctrl_c_in_the_terminal_does_not_kill_the_helper(helper: _FamilyProcess) -> None:
    pid = helper.pid
    assert pid is not None
    os.kill(pid, signal.SIGINT)  # the whole foreground group gets it, even at start-up
    time.sleep(0.1)
    assert helper.call("slow", 0.2) == "late"
    assert helper.pid == pid


def test_a_closed_dataplane_refuses_calls() -> None:
    p = _FamilyProcess(4, factory=FakeFamily)
    p.close()
    with pytest.raises(DataplaneError, match="closed"):
        p.call("read")
    assert p.pid is None


def test_a_helper_forked_later_does_not_keep_an_older_one_alive() -> None:
    """Each helper inherits the parent's end of the older helpers' channels; if it kept
    them, closing an older channel would not end that helper."""
    older = _FamilyProcess(4, factory=FakeFamily)
    newer = _FamilyProcess(6, factory=FakeFamily)
    try:
        proc = older._proc
        assert proc is not None
        older.close()
        assert proc.exitcode == 0  # ended by EOF, not killed after the wait
    finally:
        newer.close()


# --- the helper's side: the daemon goes away --------------------------------------------


def _bare_helper() -> tuple[Connection, BaseProcess]:
    ctx = multiprocessing.get_context("fork")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(4, theirs, os.getpid(), [ours], FakeFamily))
    proc.start()
    theirs.close()
    return ours, proc


def _ends_quietly(proc: BaseProcess, capfd: pytest.CaptureFixture[str]) -> None:
    proc.join(10)
    assert proc.exitcode == 0
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Error" not in err, err


def test_helper_ends_quietly_on_eof(capfd: pytest.CaptureFixture[str]) -> None:
    ours, proc = _bare_helper()
    ours.close()
    _ends_quietly(proc, capfd)


def test_helper_ends_quietly_when_the_daemon_left_its_reply_unread(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A daemon killed with a reply unread: the helper's next read is
    ConnectionResetError (the traceback seen at teardown of a SIGKILL test)."""
    ours, proc = _bare_helper()
    ours.send(("read", ()))
    assert ours.poll(10)  # the reply waits, unread
    ours.close()
    _ends_quietly(proc, capfd)


def test_helper_ends_quietly_when_the_daemon_goes_before_the_reply(
    capfd: pytest.CaptureFixture[str],
) -> None:
    ours, proc = _bare_helper()
    ours.send(("slow", (0.3,)))
    ours.close()  # its reply then meets a closed channel: BrokenPipeError
    _ends_quietly(proc, capfd)
