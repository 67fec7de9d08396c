"""The notify hook queue: one hook at a time, in the order of the switches, bounded."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from natfail.io.hooks import HookRunner, SubprocessHookRunner, SwitchEvent


def _event(i: int) -> SwitchEvent:
    return SwitchEvent(f"s{i}", "a", "b", "failover", "10.0.0.3:51820")


def _recorder(tmp_path: Path, pause: float = 0.01) -> tuple[Path, Path]:
    """A hook that appends its service name to a file, holding a lock dir meanwhile."""
    out = tmp_path / "out"
    lock = tmp_path / "lock"
    hook = tmp_path / "hook"
    hook.write_text(
        "#!/bin/sh\n"
        f"mkdir {lock} 2>/dev/null || echo overlap >> {out}\n"
        f'echo "$NATFAIL_SERVICE" >> {out}\n'
        f"sleep {pause}\n"
        f"rmdir {lock}\n"
    )
    hook.chmod(0o755)
    return hook, out


def _lines(out: Path) -> list[str]:
    return out.read_text().split() if out.exists() else []


async def _until(check: Callable[[], bool], limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_the_subprocess_runner_is_a_hook_runner() -> None:
    runner: HookRunner = SubprocessHookRunner()
    assert runner is not None


def test_hooks_run_one_at_a_time_in_the_order_of_submission(tmp_path: Path) -> None:
    hook, out = _recorder(tmp_path)

    async def main() -> None:
        runner = SubprocessHookRunner(timeout=10.0)
        for i in range(40):
            runner.submit(hook, _event(i))  # never blocks: all 40 are queued at once
        await runner.idle()
        await runner.close()

    asyncio.run(main())
    assert _lines(out) == [f"s{i}" for i in range(40)]  # no "overlap", none lost, in order


def test_submissions_while_a_hook_runs_queue_behind_it(tmp_path: Path) -> None:
    hook, out = _recorder(tmp_path, pause=0.05)

    async def main() -> None:
        runner = SubprocessHookRunner(timeout=10.0)
        for i in range(10):
            runner.submit(hook, _event(i))
            await asyncio.sleep(0.01 * (i % 3))  # some land while the worker is busy
        await runner.idle()
        runner.submit(hook, _event(10))  # an idle worker has ended: a new one starts
        await runner.idle()

    asyncio.run(main())
    assert _lines(out) == [f"s{i}" for i in range(11)]


def test_a_full_queue_drops_the_oldest_with_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hook, out = _recorder(tmp_path)

    async def main() -> None:
        runner = SubprocessHookRunner(timeout=10.0, max_pending=3)
        for i in range(10):
            runner.submit(hook, _event(i))
        await runner.idle()

    asyncio.run(main())
    assert _lines(out) == ["s7", "s8", "s9"]
    drops = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert drops == ["notify hooks: queue full (3 pending), dropped the 7 oldest hook runs"]


def test_close_lets_the_running_hook_finish_and_drops_the_queued(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hook, out = _recorder(tmp_path, pause=2.0)

    async def main() -> None:
        runner = SubprocessHookRunner(timeout=10.0)
        for i in range(4):
            runner.submit(hook, _event(i))
        await _until(lambda: _lines(out) == ["s0"])  # the first one is running
        await runner.close()
        assert not (tmp_path / "lock").exists()  # it ran to its end, not killed
        runner.submit(hook, _event(9))  # taken no more; neither blocks nor raises
        await asyncio.sleep(0.3)

    asyncio.run(main())
    assert _lines(out) == ["s0"]
    drops = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert drops == ["notify hooks: daemon stopping, dropped 3 queued hook runs"]
    assert "the daemon is stopping" in caplog.text


def test_close_kills_a_running_hook_at_its_time_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hook = tmp_path / "hook"
    started = tmp_path / "started"
    hook.write_text(f"#!/bin/sh\ntouch {started}\nexec sleep 30\n")
    hook.chmod(0o755)
    timeout = 0.5

    async def main() -> float:
        runner = SubprocessHookRunner(timeout=timeout)
        runner.submit(hook, _event(0))
        await _until(started.exists)
        begun = time.monotonic()
        await runner.close()
        return time.monotonic() - begun

    assert asyncio.run(main()) < 10.0  # bounded by the time limit, not by the hook
    assert f"killed after {timeout:g} s" in caplog.text


def test_close_with_nothing_submitted_and_twice() -> None:
    async def main() -> None:
        runner = SubprocessHookRunner()
        await runner.close()
        await runner.close()

    asyncio.run(main())


def test_submit_outside_a_running_loop_neither_raises_nor_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hook, out = _recorder(tmp_path)
    caplog.set_level(logging.WARNING)
    SubprocessHookRunner().submit(hook, _event(0))
    assert "no event loop" in caplog.text
    assert _lines(out) == []


def test_a_hook_that_cannot_start_does_not_stop_the_queue(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hook, out = _recorder(tmp_path)

    async def main() -> None:
        runner = SubprocessHookRunner(timeout=10.0)
        runner.submit(tmp_path / "missing", _event(0))
        runner.submit(hook, _event(1))
        await runner.idle()

    asyncio.run(main())
    assert "could not start" in caplog.text
    assert _lines(out) == ["s1"]
