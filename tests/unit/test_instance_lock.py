"""One daemon per runtime directory: the lock between two real processes,
and `natfail` refusing to start beside a running one without touching
anything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from natfail.io.instance_lock import LOCK_NAME, AlreadyRunning, InstanceLock, LockError
from tests.unit.test_cli import write_valid

REPO = Path(__file__).resolve().parents[2]

# Takes the lock, says so, and holds it until killed; with "fork", a child
# that shares the lock's file outlives it.
_HOLDER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from natfail.io.instance_lock import InstanceLock
    lock = InstanceLock.acquire(Path(sys.argv[1]))
    child = 0
    if sys.argv[2] == "fork":
        ready, tell = os.pipe()
        child = os.fork()
        if child == 0:
            # the fork hooks have run by now: say so, then outlive the parent
            os.write(tell, b"x")
            time.sleep(120)
            os._exit(0)
        os.read(ready, 1)
    print(os.getpid(), child, flush=True)
    time.sleep(120)
""")


def _holder(directory: Path, mode: str = "plain") -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(directory), mode],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None
    pid, child = proc.stdout.readline().split()
    assert int(pid) == proc.pid
    return proc, int(child)


@pytest.fixture
def holders() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_second_process_is_refused_with_the_first_ones_pid(
    tmp_path: Path, holders: list[subprocess.Popen[str]]
) -> None:
    first, _ = _holder(tmp_path)
    holders.append(first)
    with pytest.raises(AlreadyRunning) as refused:
        InstanceLock.acquire(tmp_path)
    assert refused.value.pid == first.pid
    assert str(refused.value) == f"another natfail (pid {first.pid}) is running"
    assert (tmp_path / LOCK_NAME).read_text() == f"{first.pid}\n"


def test_a_dead_holder_leaves_no_stale_lock(
    tmp_path: Path, holders: list[subprocess.Popen[str]]
) -> None:
    first, _ = _holder(tmp_path)
    holders.append(first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    lock = InstanceLock.acquire(tmp_path)  # the pid file is still there; the lock is not
    try:
        assert lock.held and (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        # and it holds against the next process
        probe = (
            "import sys; from pathlib import Path; "
            "from natfail.io.instance_lock import InstanceLock, LockError\n"
            "try:\n    InstanceLock.acquire(Path(sys.argv[1]))\n"
            "except LockError as e:\n    print(e)"
        )
        second = subprocess.run(
            [sys.executable, "-c", probe, str(tmp_path)],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert second.stdout == f"another natfail (pid {os.getpid()}) is running\n"
    finally:
        lock.release()
    assert not lock.held
    InstanceLock.acquire(tmp_path).release()


def test_a_forked_child_does_not_keep_the_lock(
    tmp_path: Path, holders: list[subprocess.Popen[str]]
) -> None:
    """The iptables helper is forked: if it outlived a killed daemon it must
    not block the restart."""
    first, child = _holder(tmp_path, "fork")
    holders.append(first)
    try:
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert os.path.exists(f"/proc/{child}")
        InstanceLock.acquire(tmp_path).release()
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_missing_directory_is_created_0755(tmp_path: Path) -> None:
    directory = tmp_path / "run" / "natfail"
    old = os.umask(0o077)  # the unit's UMask
    try:
        lock = InstanceLock.acquire(directory)
    finally:
        os.umask(old)
    lock.release()
    assert directory.stat().st_mode & 0o777 == 0o755


def test_an_unusable_lock_file_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(LockError, match="cannot open the lock file"):
        InstanceLock.acquire(tmp_path)
    (tmp_path / LOCK_NAME).unlink()
    os.mkfifo(tmp_path / LOCK_NAME)
    with pytest.raises(LockError, match="not a regular file"):
        InstanceLock.acquire(tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_a_lock_file_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).write_text("")
    os.chown(tmp_path / LOCK_NAME, 65534, 65534)
    with pytest.raises(LockError, match="owned by uid 65534"):
        InstanceLock.acquire(tmp_path)


def test_natfail_refuses_to_start_beside_a_running_one(
    tmp_path: Path, holders: list[subprocess.Popen[str]]
) -> None:
    conf = write_valid(tmp_path)
    run = tmp_path / "run"
    state = tmp_path / "state"
    conf.write_text(
        f'[daemon]\nsocket = "{run / "natfail.sock"}"\nstate_dir = "{state}"\n' + conf.read_text()
    )
    run.mkdir()
    first, _ = _holder(run)
    holders.append(first)
    proc = subprocess.run(
        [sys.executable, "-m", "natfail", "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"natfail: another natfail (pid {first.pid}) is running"]
    assert proc.stdout == ""
    # it touched nothing: no state directory, no socket
    assert not state.exists()
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]
    assert first.poll() is None
