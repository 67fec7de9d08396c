"""Ruleset change events from nftables, so a `nft flush ruleset` is repaired
at once instead of at the daemon's next periodic check.

`nft monitor` prints the changes of each transaction, then one line
``# new generation N by process PID (comm)``. The daemon hears of a change
once per transaction (a flush of a big table is one event, not thousands),
and never of its own transactions: the caller says which process ids are
its own (the kernel reports the id of the thread that sent the batch)."""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
from collections.abc import Callable

log = logging.getLogger(__name__)

_GENERATION = re.compile(rb"^# new generation \d+ by process (\d+) ")


class Batches:
    """Folds monitor lines into one verdict per transaction (pure)."""

    def __init__(self, own: Callable[[int], bool]) -> None:
        self._own = own
        self._pending = False

    def line(self, raw: bytes) -> bool:
        """True when this line closes a transaction that someone else made."""
        text = raw.strip()
        if not text or text.startswith(b"trace "):
            return False
        match = _GENERATION.match(text)
        if match is None:
            self._pending = True
            return False
        pending, self._pending = self._pending, False
        return pending and not self._own(int(match.group(1)))


async def watch(changed: Callable[[], None], own: Callable[[int], bool]) -> None:
    nft = shutil.which("nft") or "/usr/sbin/nft"
    while True:
        try:
            proc = await asyncio.create_subprocess_exec(
                nft,
                "monitor",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
        except OSError as exc:
            log.warning(
                "cannot run %s monitor (%s); the periodic check alone finds changes",
                nft,
                exc.strerror,
            )
            return
        assert proc.stdout is not None
        batches = Batches(own)
        try:
            # A monitor that starts after a change would miss it: look once.
            changed()
            while line := await proc.stdout.readline():
                if batches.line(line):
                    changed()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        log.warning("nft monitor exited (%s); restarting it", proc.returncode)
        await asyncio.sleep(1.0)


def start(changed: Callable[[], None], own: Callable[[int], bool]) -> asyncio.Future[None]:
    return asyncio.ensure_future(watch(changed, own))
