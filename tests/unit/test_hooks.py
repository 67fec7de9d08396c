from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from natfail.io.hooks import KEEP_OUTPUT, SubprocessHookRunner, SwitchEvent

EVENT = SwitchEvent("wg0", "a", "b", "failover", "10.0.0.3:51820")


def _script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "hook"
    path.write_text(f"#!{sys.executable}\n{body}\n")
    path.chmod(0o755)
    return path


def test_hook_gets_argv_and_environment_without_a_shell(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    hook = _script(
        tmp_path,
        (
            "import json, os, sys\n"
            f"json.dump({{'argv': sys.argv[1:], 'env': {{k: v for k, v in os.environ.items()"
            f" if k.startswith('NATFAIL_')}}}}, open({str(out)!r}, 'w'))"
        ),
    )
    assert asyncio.run(SubprocessHookRunner().run(hook, EVENT))
    seen = json.loads(out.read_text())
    assert seen["argv"] == ["wg0", "a", "b", "failover"]
    assert seen["env"] == {
        "NATFAIL_SERVICE": "wg0",
        "NATFAIL_FROM": "a",
        "NATFAIL_TO": "b",
        "NATFAIL_TO_ADDRESS": "10.0.0.3:51820",
        "NATFAIL_REASON": "failover",
    }


def test_shell_metacharacters_stay_data(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    hook = _script(tmp_path, f"import json, sys\njson.dump(sys.argv[1:], open({str(out)!r}, 'w'))")
    event = SwitchEvent("wg0", None, "b; touch /tmp/pwned", "manual", "x")
    assert asyncio.run(SubprocessHookRunner().run(hook, event))
    assert json.loads(out.read_text()) == ["wg0", "", "b; touch /tmp/pwned", "manual"]


def test_failures_are_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    failing = _script(tmp_path, "import sys\nprint('no route to pager')\nsys.exit(3)")
    assert not asyncio.run(SubprocessHookRunner().run(failing, EVENT))
    assert "exited 3: no route to pager" in caplog.text
    assert not asyncio.run(SubprocessHookRunner().run(tmp_path / "missing", EVENT))
    assert "could not start" in caplog.text
    slow = _script(tmp_path, "import time\ntime.sleep(30)")
    assert not asyncio.run(SubprocessHookRunner(timeout=0.3).run(slow, EVENT))
    assert "killed after 0.3 s" in caplog.text


def _sh(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _gone(pid: int) -> bool:
    """Dead or a zombie: the container's init may never reap what we orphaned."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


async def _until(check: Callable[[], bool], limit: float = 10.0) -> bool:
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def test_endless_output_is_capped_and_the_hook_killed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hook = _sh(tmp_path, "hook", "exec yes")
    runner = SubprocessHookRunner(timeout=1.0)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    fds_before = _open_fds()
    outcome = asyncio.run(runner.execute(hook, EVENT))
    assert outcome.killed and not outcome.ok
    assert len(outcome.output) == KEEP_OUTPUT
    assert outcome.output.startswith(b"y\ny\n")
    assert outcome.discarded > 0  # read on, not left to block on a full pipe
    # Keeping it all grew the daemon by ~200 MB a second; the bound is loose on purpose.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 64 * 1024
    assert _open_fds() == fds_before
    caplog.set_level(logging.INFO)
    assert not asyncio.run(SubprocessHookRunner(timeout=0.3).run(hook, EVENT))
    line = next(r.getMessage() for r in caplog.records if "killed after 0.3 s" in r.getMessage())
    assert "more bytes not kept" in line
    assert len(line) < KEEP_OUTPUT + 500


def test_a_background_child_holding_stdout_does_not_hold_the_verdict(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    hook = _sh(tmp_path, "hook", f"echo started\nsleep 30 &\necho $! > {pidfile}\nexit 0")
    timeout = 5.0
    fds_before = _open_fds()
    started = time.monotonic()
    try:
        outcome = asyncio.run(SubprocessHookRunner(timeout=timeout).execute(hook, EVENT))
        elapsed = time.monotonic() - started
        assert outcome.ok and not outcome.killed
        assert outcome.output == b"started\n"
        assert elapsed < timeout
        assert _open_fds() == fds_before  # our end of the pipe is closed
        child = int(pidfile.read_text())
        assert not _gone(child)  # an operator may start something in the background
    finally:
        with contextlib.suppress(Exception):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_a_background_child_does_not_hide_a_failure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pidfile = tmp_path / "child.pid"
    hook = _sh(tmp_path, "hook", f"sleep 30 &\necho $! > {pidfile}\necho no pager\nexit 4")
    try:
        assert not asyncio.run(SubprocessHookRunner(timeout=5.0).run(hook, EVENT))
        assert "exited 4: no pager" in caplog.text
    finally:
        with contextlib.suppress(Exception):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_a_hook_past_its_time_limit_is_killed_with_its_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    hook = _sh(tmp_path, "hook", f"sleep 30 &\necho $! > {pidfile}\nsleep 30")
    fds_before = _open_fds()
    try:
        outcome = asyncio.run(SubprocessHookRunner(timeout=0.5).execute(hook, EVENT))
        assert outcome.killed and not outcome.ok
        child = int(pidfile.read_text())
        assert asyncio.run(_until(lambda: _gone(child)))
        assert _open_fds() == fds_before
    finally:
        with contextlib.suppress(Exception):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
