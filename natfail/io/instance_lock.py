"""One daemon per runtime directory.

Two daemons with one config would fight over the same rules (each repairs
what the other writes) and the second would take the control socket. The
first takes an exclusive flock on a file next to the socket and keeps it
while it runs; the kernel drops the lock when the process dies, however it
dies, so a stale lock never blocks a restart. The file holds the pid, for
the second daemon's message; the pid is informative, the lock decides."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import time
from pathlib import Path
from typing import Final

from natfail.oneline import error_line

LOCK_NAME: Final = "natfail.lock"
DIRECTORY_MODE: Final = 0o755
# How long to wait for the holder to write its pid (it locks, then writes).
PID_WAIT: Final = 1.0
_MAX_PID_TEXT: Final = 32


class LockError(Exception):
    """The lock cannot be taken; the message is one line for the operator."""


class AlreadyRunning(LockError):
    def __init__(self, path: Path, pid: int | None) -> None:
        self.path = path
        self.pid = pid
        if pid is None:
            super().__init__(f"another natfail is running (it holds {path})")
        else:
            super().__init__(f"another natfail (pid {pid}) is running")


def lock_path(socket_path: Path) -> Path:
    return socket_path.parent / LOCK_NAME


def _ensure_directory(directory: Path) -> None:
    if directory.is_dir():
        return
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        try:
            directory.mkdir(mode=DIRECTORY_MODE)
        except FileExistsError:
            return
        # mkdir's mode goes through the umask (0077 under the unit); the socket's
        # group must be able to reach the socket inside.
        os.chmod(directory, DIRECTORY_MODE)
    except OSError as exc:
        raise LockError(
            f"cannot create the runtime directory {directory}: {exc.strerror or error_line(exc)}"
        ) from None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, _MAX_PID_TEXT, 0)
    except OSError:
        return None
    try:
        pid = int(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None
    return pid if pid > 0 else None


def _holder_pid(fd: int) -> int | None:
    deadline = time.monotonic() + PID_WAIT
    while True:
        pid = _read_pid(fd)
        if pid is not None or time.monotonic() >= deadline:
            return pid
        time.sleep(0.02)


class InstanceLock:
    """An exclusive lock on ``directory/natfail.lock``, held until `release`
    or the end of the process."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd
        # A forked child (the iptables helper) shares the lock's open file;
        # if it outlived a killed daemon, it would hold the lock against the
        # restart. Closing its copy leaves the parent's lock in place (only
        # closing every copy, or LOCK_UN, drops a flock).
        os.register_at_fork(after_in_child=self._close_in_child)

    @classmethod
    def acquire(cls, directory: Path) -> InstanceLock:
        """Take the lock, creating the directory (0755) if it is missing.
        Raises AlreadyRunning when a live process holds it, LockError when the
        file cannot be used."""
        _ensure_directory(directory)
        path = directory / LOCK_NAME
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            raise LockError(
                f"cannot open the lock file {path}: {exc.strerror or error_line(exc)}"
            ) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise LockError(f"the lock file {path} is not a regular file")
            if info.st_uid != os.geteuid():
                # Whoever owns it could hold it forever and keep natfail from starting.
                raise LockError(
                    f"the lock file {path} is owned by uid {info.st_uid}, "
                    f"not by natfail's uid {os.geteuid()}"
                )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise AlreadyRunning(path, _holder_pid(fd)) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise LockError(f"cannot lock {path}: {exc.strerror or error_line(exc)}") from None
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock. The file stays: removing it would let a daemon that
        opened it just before lock a file nobody else can find."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _close_in_child(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
