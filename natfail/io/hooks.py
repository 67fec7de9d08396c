"""The notify hook: an operator's executable run on every switch.

It gets argv and environment variables, never a shell, and a time limit.
Its failure is logged and never stops or delays a failover: the switch is
done before the hook starts.

Hooks run one at a time, in the order of the switches, from a bounded FIFO
queue served by one worker task. What a hook prints is kept only up to
``KEEP_OUTPUT`` bytes; the rest is read and thrown away so that the hook never
blocks on a full pipe and the daemon's memory stays bounded. The verdict comes
from the hook process's own exit: children it leaves running in the background
are neither waited for nor killed, unless the hook itself overruns its time
limit, when its whole process group is killed."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

HOOK_TIMEOUT = 10.0
KEEP_OUTPUT = 4096  # bytes of a hook's output kept for the log line
MAX_PENDING = 1000  # queued hook runs; beyond this the oldest are dropped
# After the hook exits, a child it forked may still hold the pipe open; read
# what is already there for this long, then stop.
OUTPUT_GRACE = 0.2
_CHUNK = 65536


@dataclass(frozen=True, slots=True)
class SwitchEvent:
    service: str
    previous: str | None
    active: str
    reason: str
    address: str  # the new active backend's address

    def argv(self, executable: Path) -> list[str]:
        return [str(executable), self.service, self.previous or "", self.active, self.reason]

    def environ(self) -> dict[str, str]:
        return {
            "NATFAIL_SERVICE": self.service,
            "NATFAIL_FROM": self.previous or "",
            "NATFAIL_TO": self.active,
            "NATFAIL_TO_ADDRESS": self.address,
            "NATFAIL_REASON": self.reason,
        }


class HookRunner(Protocol):
    def submit(self, executable: Path, event: SwitchEvent) -> None:
        """Queue one hook run; never blocks, never raises."""

    async def close(self) -> None:
        """Take no more; let the running hook finish (or be killed), drop the queued ones."""


@dataclass(frozen=True, slots=True)
class HookOutcome:
    """What one hook run came to. ``returncode`` is None when it could not start."""

    returncode: int | None
    killed: bool  # overran the time limit; its process group was killed
    output: bytes  # at most KEEP_OUTPUT bytes, the first ones
    discarded: int  # bytes read past ``output`` and thrown away
    error: str | None = None  # why it could not start

    @property
    def ok(self) -> bool:
        return not self.killed and self.returncode == 0


class _OutputReader:
    """Drains a non-blocking pipe on the event loop, keeping only the first bytes."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, keep: int) -> None:
        self._loop = loop
        self._fd = fd
        self._keep = keep
        self.kept = bytearray()
        self.discarded = 0
        self.eof = loop.create_future()
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        # One chunk per wake-up: a hook printing without end cannot starve the loop.
        try:
            data = os.read(self._fd, _CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._loop.remove_reader(self._fd)
            if not self.eof.done():
                self.eof.set_result(None)
            return
        room = self._keep - len(self.kept)
        if room > 0:
            self.kept += data[:room]
        self.discarded += max(0, len(data) - max(room, 0))

    def close(self) -> None:
        """Stop reading and close our end. A child still writing gets EPIPE: its problem."""
        self._loop.remove_reader(self._fd)
        with contextlib.suppress(OSError):
            os.close(self._fd)
        if not self.eof.done():
            self.eof.cancel()


class SubprocessHookRunner:
    def __init__(
        self,
        timeout: float = HOOK_TIMEOUT,
        *,
        max_pending: int = MAX_PENDING,
        keep_output: int = KEEP_OUTPUT,
        grace: float = OUTPUT_GRACE,
    ) -> None:
        self._timeout = timeout
        self._max_pending = max(1, max_pending)
        self._keep = keep_output
        self._grace = grace
        self._queue: collections.deque[tuple[Path, SwitchEvent]] = collections.deque()
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self._overflowed = 0  # dropped for a full queue, not yet logged

    # -- the queue ---------------------------------------------------------

    def submit(self, executable: Path, event: SwitchEvent) -> None:
        """Queue a hook run behind the earlier ones; starts the worker if it is idle."""
        try:
            self._submit(executable, event)
        except Exception as exc:  # a hook is never worth a failed switch
            log.error("notify hook %s for %s not queued: %s", executable, event.service, exc)

    def _submit(self, executable: Path, event: SwitchEvent) -> None:
        if self._closed:
            log.warning(
                "notify hook %s for %s not run: the daemon is stopping", executable, event.service
            )
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            log.error("notify hook %s for %s not run: no event loop", executable, event.service)
            return
        if len(self._queue) >= self._max_pending:
            # The newest switch tells where traffic is now, so the oldest go.
            self._queue.popleft()
            self._overflowed += 1
        self._queue.append((executable, event))
        worker = self._worker
        # A worker only ever returns with the queue empty (there is no await between
        # its last check and its end), so a done worker means nobody will take this one.
        if worker is None or worker.done() or worker.get_loop() is not loop:
            self._worker = loop.create_task(self._work(), name="natfail-notify-hooks")

    async def _work(self) -> None:
        while self._queue:
            self._report_overflow()
            executable, event = self._queue.popleft()
            try:
                await self.run(executable, event)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep serving the queue whatever one hook did
                log.error("notify hook %s for %s failed: %r", executable, event.service, exc)

    def _report_overflow(self) -> None:
        if self._overflowed:
            log.warning(
                "notify hooks: queue full (%d pending), dropped the %d oldest hook runs",
                self._max_pending,
                self._overflowed,
            )
            self._overflowed = 0

    async def idle(self) -> None:
        """Until the queue is empty and no hook runs."""
        while self._worker is not None and not self._worker.done():
            await asyncio.wait({self._worker})

    async def close(self) -> None:
        """At daemon stop: take no more, drop the queued, let the running hook end."""
        self._closed = True
        self._report_overflow()
        if self._queue:
            log.warning(
                "notify hooks: daemon stopping, dropped %d queued hook runs", len(self._queue)
            )
            self._queue.clear()
        worker = self._worker
        if worker is None or worker.done():
            return
        try:
            # run() bounds it: the time limit, then a kill of its process group.
            await asyncio.shield(worker)
        except asyncio.CancelledError:
            worker.cancel()  # run() kills the hook on its way out
            raise

    # -- one hook ----------------------------------------------------------

    async def run(self, executable: Path, event: SwitchEvent) -> bool:
        """Runs one hook now. True when it exited 0 in time; every failure is logged."""
        outcome = await self.execute(executable, event)
        if outcome.error is not None:
            log.error(
                "notify hook %s for %s could not start: %s",
                executable,
                event.service,
                outcome.error,
            )
            return False
        text = outcome.output.decode(errors="replace").strip().replace("\n", " | ")
        text = text[: self._keep]  # the separators must not let the line outgrow the cap
        if outcome.discarded:
            text += f" ... ({outcome.discarded} more bytes not kept)"
        if outcome.killed:
            log.error(
                "notify hook %s for %s killed after %g s%s",
                executable,
                event.service,
                self._timeout,
                f": {text}" if text else "",
            )
            return False
        if outcome.returncode != 0:
            log.error(
                "notify hook %s for %s exited %s%s",
                executable,
                event.service,
                outcome.returncode,
                f": {text}" if text else "",
            )
            return False
        if text:
            log.info("notify hook %s for %s: %s", executable, event.service, text)
        return True

    async def execute(self, executable: Path, event: SwitchEvent) -> HookOutcome:
        """Runs one hook and tells how it ended, logging nothing."""
        loop = asyncio.get_running_loop()
        env = {**_base_environ(), **event.environ()}
        # Our own pipe rather than asyncio's: Process.wait() then means the hook's exit,
        # not the end of every process that inherited its stdout.
        read_fd, write_fd = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                *event.argv(executable),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=write_fd,
                stderr=write_fd,
                start_new_session=True,
            )
        except OSError as exc:
            os.close(read_fd)
            return HookOutcome(None, False, b"", 0, exc.strerror or str(exc))
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        reader = _OutputReader(loop, read_fd, self._keep)
        killed = False
        try:
            exited = asyncio.ensure_future(proc.wait())
            try:
                done, _ = await asyncio.wait({exited}, timeout=self._timeout)
            finally:
                if not exited.done():
                    exited.cancel()
            if not done:
                killed = True
                _kill_group(proc.pid)
                await proc.wait()
            await asyncio.wait({reader.eof}, timeout=self._grace)
        except asyncio.CancelledError:
            if proc.returncode is None:
                _kill_group(proc.pid)
            raise
        finally:
            reader.close()
        return HookOutcome(proc.returncode, killed, bytes(reader.kept), reader.discarded)


def _kill_group(pid: int) -> None:
    # start_new_session made the hook the leader of its own process group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _base_environ() -> dict[str, str]:
    keep = ("PATH", "LANG", "LC_ALL", "TZ")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    return env
