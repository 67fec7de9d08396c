"""The notify hook: an operator's executable run on every switch.

It gets argv and environment variables, never a shell, and a time limit.
Its failure is logged and never stops or delays a failover: the switch is
done before the hook starts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

HOOK_TIMEOUT = 10.0


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
    async def run(self, executable: Path, event: SwitchEvent) -> bool: ...


class SubprocessHookRunner:
    def __init__(self, timeout: float = HOOK_TIMEOUT) -> None:
        self._timeout = timeout

    async def run(self, executable: Path, event: SwitchEvent) -> bool:
        """True when the hook exited 0 in time; every failure is logged."""
        env = {**_base_environ(), **event.environ()}
        try:
            proc = await asyncio.create_subprocess_exec(
                *event.argv(executable),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            log.error("notify hook %s for %s could not start: %s", executable, event.service,
                      exc.strerror)
            return False
        try:
            output, _ = await asyncio.wait_for(proc.communicate(), self._timeout)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            await proc.wait()
            log.error("notify hook %s for %s killed after %g s", executable, event.service,
                      self._timeout)
            return False
        text = output.decode(errors="replace").strip().replace("\n", " | ")[:500]
        if proc.returncode != 0:
            log.error("notify hook %s for %s exited %s%s", executable, event.service,
                      proc.returncode, f": {text}" if text else "")
            return False
        if text:
            log.info("notify hook %s for %s: %s", executable, event.service, text)
        return True


def _base_environ() -> dict[str, str]:
    keep = ("PATH", "LANG", "LC_ALL", "TZ")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    return env
