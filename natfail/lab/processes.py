"""Running and killing processes in the lab's namespaces: one command at a time
(``ip netns exec``), long-running ones that the lab kills on close, and the
/proc look-ups that tell a live process from a recycled pid."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Final, Protocol

from natfail.oneline import one_line

STOP_GRACE: Final = 2.0


class LabError(RuntimeError):
    """A command of the lab failed; the message is one line with the command and its stderr."""

    def __init__(
        self, message: str, argv: Sequence[str] = (), returncode: int | None = None
    ) -> None:
        super().__init__(message)
        self.argv: tuple[str, ...] = tuple(argv)
        self.returncode = returncode


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 10.0,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Runs ``argv`` to its end; a failure (with ``check``) is a :class:`LabError`."""
    cmd = shlex.join(argv)
    try:
        cp = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise LabError(f"{cmd}: timed out after {timeout:g} s", argv) from None
    except OSError as e:
        raise LabError(f"{cmd}: {e.strerror or e}", argv) from None
    if check and cp.returncode != 0:
        detail = one_line(cp.stderr) or one_line(cp.stdout) or "no output"
        raise LabError(f"{cmd}: exit {cp.returncode}: {detail}", argv, cp.returncode)
    return cp


def ns_argv(ns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def ip_batch(ns: str, commands: Sequence[str]) -> None:
    """Runs ``ip`` commands in one namespace through one ``ip -batch``."""
    if commands:
        run(["ip", "-n", ns, "-batch", "-"], input="\n".join(commands) + "\n")


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.05) -> bool:
    """Polls ``predicate`` until it is true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def proc_starttime(pid: int) -> str | None:
    """The start time of a process (field 22 of /proc/PID/stat), None if it is gone or a
    zombie (a dead child that nobody has waited for yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    if len(fields) <= 19 or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def ns_pids(ns: str) -> list[int]:
    try:
        cp = run(["ip", "netns", "pids", ns], check=False, timeout=5.0)
    except LabError:
        return []
    return [int(p) for p in cp.stdout.split() if p.isdigit()]


def kill_pids(pids: Sequence[int], grace: float = STOP_GRACE) -> None:
    """SIGTERM (and SIGCONT, for paused ones), then SIGKILL whatever is left after ``grace``."""
    alive = {pid: proc_starttime(pid) for pid in pids if pid != os.getpid()}
    alive = {pid: st for pid, st in alive.items() if st is not None}
    for pid in alive:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGCONT)

    def gone() -> bool:
        return all(proc_starttime(pid) != st for pid, st in alive.items())

    if not wait_until(gone, grace):
        for pid, st in alive.items():
            if proc_starttime(pid) == st:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        wait_until(gone, 1.0)


class _HasNs(Protocol):
    @property
    def ns(self) -> str: ...


NsLike = str | _HasNs
"""A namespace by name, or anything of the lab that lives in one (``.ns``)."""


def ns_name(ns: NsLike) -> str:
    return ns if isinstance(ns, str) else ns.ns


class Namespaces:
    """A set of namespaces to run commands and processes in; the processes started
    with :meth:`popen` are killed by :meth:`kill_started`."""

    def __init__(self, label: str, namespaces: Sequence[str]) -> None:
        self.namespaces: list[str] = list(namespaces)
        self._label = label
        self._closed = False
        self._popens: list[subprocess.Popen[str]] = []

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self._label} is closed")

    def _member(self, ns: NsLike, argv: Sequence[str]) -> str:
        self._check_open()
        if isinstance(argv, str):
            raise TypeError("argv must be a sequence of arguments, not a string")
        name = ns_name(ns)
        if name not in self.namespaces:
            raise ValueError(f"{name} is not a namespace of {self._label}")
        return name

    def exec(
        self,
        ns: NsLike,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 10.0,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Runs ``argv`` in a namespace of this lab (``ip netns exec``; no shell). ``env``
        adds to (and overrides) the current environment."""
        name = self._member(ns, argv)
        full_env = None if env is None else {**os.environ, **env}
        return run(ns_argv(name, argv), check=check, timeout=timeout, input=input, env=full_env)

    def popen(
        self,
        ns: NsLike,
        argv: Sequence[str],
        *,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[str]:
        """Starts ``argv`` in a namespace (text mode, own session); the lab kills it on
        close. ``env`` adds to (and overrides) the current environment."""
        name = self._member(ns, argv)
        proc = subprocess.Popen(
            ns_argv(name, argv),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=None if env is None else {**os.environ, **env},
            text=True,
            start_new_session=True,
        )
        self._popens.append(proc)
        return proc

    def started_pids(self) -> list[int]:
        """Pids of the processes :meth:`popen` started that still run."""
        return [p.pid for p in self._popens if p.poll() is None]

    def reap_started(self) -> None:
        """Waits briefly for the killed :meth:`popen` processes, so none stays a zombie."""
        for p in self._popens:
            with contextlib.suppress(Exception):
                p.wait(0.5)
