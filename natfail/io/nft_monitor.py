"""Ruleset change events from nftables, so a `nft flush ruleset` is repaired
at once instead of at the daemon's next periodic check.

`nft monitor` prints one line per change of any table; the daemon only needs
to know that something changed, then compares what is installed with what it
wants (its own changes compare equal and cost one read)."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Callable

log = logging.getLogger(__name__)


async def watch(changed: Callable[[], None]) -> None:
    nft = shutil.which("nft") or "/usr/sbin/nft"
    while True:
        try:
            proc = await asyncio.create_subprocess_exec(
                nft,
                "monitor",
                "ruleset",
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
        try:
            # A monitor that starts after a change would miss it: look once.
            changed()
            while line := await proc.stdout.readline():
                if line.strip():
                    changed()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        log.warning("nft monitor exited (%s); restarting it", proc.returncode)
        await asyncio.sleep(1.0)


def start(changed: Callable[[], None]) -> asyncio.Future[None]:
    return asyncio.ensure_future(watch(changed))
