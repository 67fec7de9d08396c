"""The probe's TAI64N clock, kept in the state directory.

A backend drops an initiation whose timestamp is not newer than the last one
it accepted from the probe key, so the last stamp sent must survive restarts
and clock steps. The decision (max(now, last + 1 ns)) is pure, in
`natfail.core.tai64n`; this module only remembers."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from natfail.core import tai64n
from natfail.io.statefile import read_or_none, write_atomic

log = logging.getLogger(__name__)

STATE_FILE = "probe-timestamp"


class TimestampClock:
    """Hands out strictly increasing stamps and writes the last one to
    `path` (when given) before it is used, so no restart can reuse it."""

    def __init__(
        self,
        path: Path | None,
        wall_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self._path = path
        self._wall_ns = wall_ns
        self._last = self._load(path)

    @staticmethod
    def _load(path: Path | None) -> bytes | None:
        if path is None:
            return None
        try:
            data = read_or_none(path)
        except OSError as exc:
            log.warning("cannot read probe timestamp %s: %s; starting from the clock", path,
                        exc.strerror)
            return None
        if data is None:
            return None
        if len(data) != tai64n.TAI64N_SIZE:
            log.warning("ignoring corrupt probe timestamp in %s", path)
            return None
        return data

    @property
    def last(self) -> bytes | None:
        return self._last

    def next(self) -> bytes:
        stamp = tai64n.next_timestamp(self._wall_ns(), self._last)
        self._last = stamp
        if self._path is not None:
            try:
                # No fsync: this runs on every probe. A process crash loses
                # nothing (the rename is done); a power loss may lose the
                # latest stamps, which matters only if the clock also
                # stepped back across that loss.
                write_atomic(self._path, stamp, fsync=False)
            except OSError as exc:
                log.warning("cannot save probe timestamp to %s: %s", self._path, exc.strerror)
        return stamp
