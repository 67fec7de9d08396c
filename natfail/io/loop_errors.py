"""Errors that repeat, logged once and then counted.

A flood (of connections past the file descriptor limit, of bad requests)
makes the same error many times a second; a line, let alone a traceback, for
each would fill the journal and burn the CPU the daemon needs for probing.
`RepeatLog` logs the first of a kind at once and then, at most once a
`interval`, how many more came; `install` puts one in front of the event
loop's own error reporting, which asyncio's accept loop goes through."""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from natfail.oneline import error_line

log = logging.getLogger(__name__)

INTERVAL: Final = 60.0
# Keys come from error messages, which a peer may vary: the table is bounded.
MAX_KINDS: Final = 64
OTHER: Final = "other repeated errors"
MAX_KEY: Final = 300


@dataclass(slots=True)
class _Kind:
    logged_at: float
    suppressed: int = 0


class RepeatLog:
    """Log the first report of a key at once, then a count of the repeats at
    most every `interval` seconds: one line each.

    With a `loop`, a pending count is also written by a timer on that loop
    (report must then be called from the loop's thread); without one, the
    owner calls `flush` now and then."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._log = logger
        self.interval = interval
        self._clock = clock
        self._loop = loop
        self._kinds: dict[str, _Kind] = {}
        self._levels: dict[str, int] = {}
        self._timer: asyncio.TimerHandle | None = None

    def report(
        self,
        key: str,
        message: str | None = None,
        *,
        level: int = logging.WARNING,
        exc_info: BaseException | None = None,
    ) -> None:
        """`key` names the kind (and starts the count line); `message`, the
        first occurrence's own line, defaults to the key."""
        key = key[:MAX_KEY]
        now = self._clock()
        kind = self._kinds.get(key)
        if kind is None and len(self._kinds) >= MAX_KINDS:
            key, message, exc_info = OTHER, None, None
            kind = self._kinds.get(key)
        if kind is None:
            self._kinds[key] = _Kind(now)
            self._levels[key] = level
            self._log.log(level, "%s", message or key, exc_info=exc_info)
            return
        kind.suppressed += 1
        if now - kind.logged_at >= self.interval:
            self._write_count(key, kind, now)
        else:
            self._arm(kind.logged_at + self.interval - now)

    def flush(self) -> None:
        """Write the counts that are due; forget the kinds that went quiet, so
        that their next occurrence is logged in full again."""
        now = self._clock()
        for key, kind in list(self._kinds.items()):
            if now - kind.logged_at < self.interval:
                continue
            if kind.suppressed:
                self._write_count(key, kind, now)
            else:
                del self._kinds[key]
                del self._levels[key]

    def pending(self) -> int:
        """How many reports are counted but not yet written."""
        return sum(kind.suppressed for kind in self._kinds.values())

    def _write_count(self, key: str, kind: _Kind, now: float) -> None:
        times = "time" if kind.suppressed == 1 else "times"
        self._log.log(
            self._levels[key],
            "%s (repeated %d %s in %.0f s)",
            key,
            kind.suppressed,
            times,
            now - kind.logged_at,
        )
        kind.suppressed = 0
        kind.logged_at = now

    def _arm(self, delay: float) -> None:
        if self._loop is None or self._timer is not None or self._loop.is_closed():
            return
        self._timer = self._loop.call_later(max(delay, 0.0), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.flush()
        if self.pending():
            now = self._clock()
            due = min(k.logged_at for k in self._kinds.values() if k.suppressed)
            self._arm(due + self.interval - now)


def _describe(context: dict[str, Any]) -> tuple[str, BaseException | None]:
    message = str(context.get("message") or "unhandled error in the event loop")
    exc = context.get("exception")
    if not isinstance(exc, BaseException):
        return message, None
    line = f"{message}: {type(exc).__name__}: {error_line(exc)}"
    # An OSError (EMFILE from accept, a peer that reset) is the system's
    # answer, not a bug in natfail: its errno says all a traceback would.
    return line, None if isinstance(exc, OSError) else exc


def install(
    loop: asyncio.AbstractEventLoop, *, clock: Callable[[], float] = time.monotonic
) -> None:
    """Route the loop's unhandled errors through a `RepeatLog`: each kind is
    logged once (with its traceback unless it is an OSError), then counted."""
    repeats = RepeatLog(log, clock=clock, loop=loop)

    def handler(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        try:
            line, trace = _describe(context)
            repeats.report(f"event loop: {line}", level=logging.ERROR, exc_info=trace)
        except Exception:  # reporting an error must never raise into the loop
            log.error("event loop: an error occurred and could not be described")

    loop.set_exception_handler(handler)


# Errors of ours, not of a peer: out of descriptors or memory.
RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def accept_failure(listener: str, exc: OSError) -> str:
    """The one line a listener reports (through a RepeatLog) when accept() fails."""
    what = "out of file descriptors or memory" if exc.errno in RESOURCE_ERRNOS else "accept failed"
    return f"{listener}: cannot accept connections ({what}): {error_line(exc)}"
