"""The probe's TAI64N clock, kept in the state directory.

A backend drops an initiation whose timestamp is not newer than the last one
it accepted from the probe key, so no restart may send a stamp below one
already sent. The file holds a lease rather than the last stamp: a stamp
some seconds ahead, written before any stamp beyond it is used, so at 3000
probes a second the disk sees one write every few seconds. The decision
(max(now, last + 1 ns)) is pure, in `natfail.core.tai64n`; this module only
remembers, and says so when what it remembers cannot be used.

One process per file: the daemon, or `natfailctl probe` when no daemon runs
(with one running, natfailctl asks it to probe; `natfail.io.probe_request`).
A second process would start at the lease, above the first one's stamps,
and a backend would then drop the first one's probes as replays."""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

from natfail.core import tai64n
from natfail.io.statefile import write_atomic

log = logging.getLogger(__name__)

STATE_FILE = "probe-timestamp"

LEASE = 10.0
"""The file holds a stamp this many seconds ahead of the last one handed out.
The cost: a restart within the lease sends stamps up to LEASE ahead of the
wall clock (harmless: a backend only compares them)."""
RENEW = 5.0
"""The lease is renewed when less than this remains of it."""
LEASE_NS = int(LEASE * 1e9)
RENEW_NS = int(RENEW * 1e9)
RETRY_NS = 10**9
"""After a failed save, stamps go on; the save is tried again a second of stamps later."""

FAR_AHEAD = 86400.0
"""A stored stamp this many seconds ahead of the wall clock gets a warning."""

# Every wall clock reading is kept within what a valid stamp may hold (Linux
# cannot read before 1970 either), so that a clock gone mad (or a test's)
# cannot make next() raise or write a stamp the next start would refuse.
_WALL_MIN_NS = 0
_WALL_MAX_NS = tai64n.MAX_UNIX_SECONDS * tai64n.NS_PER_SECOND - 1


def _describe(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.0f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.0f} hours"
    return f"{seconds:.0f} s"


def _read_small(path: Path) -> bytes:
    """At most a few bytes of a regular file: the stamp file is 12 bytes, and
    a FIFO or a device put in its place must not hang or flood the daemon."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return os.read(fd, tai64n.TAI64N_SIZE + 1)
    finally:
        os.close(fd)


class TimestampClock:
    """Hands out strictly increasing stamps, and keeps in `path` (when given)
    a lease: a stamp `LEASE` seconds ahead of the last one handed out, written
    before any stamp beyond it is used. A restart starts above the lease, so
    it can reuse no stamp; the file is written about every `LEASE - RENEW`
    seconds of stamps, never per probe."""

    def __init__(
        self,
        path: Path | None,
        wall_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self._path = path
        self._wall_ns = wall_ns
        self._save_failures = 0
        self._last = self._load(path)
        self._lease: bytes | None = None
        """The stamp the file holds (as far as we know): none above it was handed out."""
        self._renew_after: bytes | None = None
        """A stamp above this one renews the lease first (None: at the next stamp)."""

    def _wall(self) -> int:
        return min(max(self._wall_ns(), _WALL_MIN_NS), _WALL_MAX_NS)

    def _load(self, path: Path | None) -> bytes | None:
        if path is None:
            return None
        try:
            data = _read_small(path)
        except FileNotFoundError:
            log.info(
                "no probe timestamp in %s: probes start from the wall clock; a backend that"
                " saw a newer stamp from this probe key ignores them (every probe 'timeout')"
                " until the clock passes that stamp",
                path,
            )
            return None
        except OSError as exc:
            log.warning(
                "cannot read probe timestamp %s: %s; starting from the wall clock",
                path,
                exc.strerror,
            )
            return None
        # An invalid stamp can never have been sent, so starting from the
        # clock cannot send one older than a stamp a backend has seen.
        problem = tai64n.problem(data)
        if problem is not None:
            log.warning(
                "ignoring invalid probe timestamp in %s (%s); starting from the wall clock",
                path,
                problem,
            )
            return None
        ahead = tai64n.seconds_ahead(data, self._wall())
        if ahead > FAR_AHEAD:
            # Going back to the clock would make every backend that saw
            # this stamp drop our probes; counting on from it is safe.
            log.warning(
                "probe timestamp in %s is %s ahead of the wall clock; probes keep counting"
                " from it (delete the file only if no backend ever saw it)",
                path,
                _describe(ahead),
            )
        return data

    @property
    def last(self) -> bytes | None:
        return self._last

    @property
    def lease(self) -> bytes | None:
        """The stamp last written to the file; None before the first write."""
        return self._lease

    def next(self) -> bytes:
        try:
            stamp = tai64n.next_timestamp(self._wall(), self._last)
        except ValueError:
            # Only a last stamp with no successor (twelve 0xFF bytes, which
            # _load refuses) gets here; no stamp is newer, so start over.
            log.warning(
                "probe timestamp %r has no successor; starting from the wall clock", self._last
            )
            stamp = tai64n.next_timestamp(self._wall(), None)
        self._last = stamp
        if self._path is not None and (self._renew_after is None or stamp > self._renew_after):
            self._renew(self._path, stamp)
        return stamp

    def _renew(self, path: Path, stamp: bytes) -> None:
        lease = _plus(stamp, LEASE_NS)
        # Another process with this file (natfailctl probe with its own key)
        # may have written a later lease: the file never goes back, so the
        # next one to start from it is above every stamp either has sent.
        held = _stored(path)
        if held is not None and held > lease:
            lease = held
        try:
            # No fsync: the event loop must not wait on the disk. A process
            # crash loses nothing (the rename is done); a power loss may lose
            # the latest lease, which matters only if the clock also stepped
            # back across that loss.
            if lease != held:
                write_atomic(path, lease, fsync=False)
        except OSError as exc:
            # Once, not on every renewal: a full disk would flood the log.
            if not self._save_failures:
                log.warning("cannot save probe timestamp to %s: %s", path, exc.strerror)
            self._save_failures += 1
            # Tried again a second of stamps later, not on every probe.
            self._renew_after = _plus(stamp, RETRY_NS)
            return
        if self._save_failures:
            log.info(
                "probe timestamp saved to %s again, after %d failed saves",
                path,
                self._save_failures,
            )
            self._save_failures = 0
        self._lease = lease
        self._renew_after = _plus(lease, -RENEW_NS)


def _plus(stamp: bytes, delta_ns: int) -> bytes:
    """`stamp` moved by `delta_ns`, kept within what a valid stamp may hold
    (and, moved forward, never below `stamp`)."""
    seconds, nanoseconds = tai64n.decode(stamp)
    moved = min(max(seconds * tai64n.NS_PER_SECOND + nanoseconds + delta_ns, 0), _WALL_MAX_NS)
    result = tai64n.tai64n(moved)
    return stamp if delta_ns > 0 and result < stamp else result


def _stored(path: Path) -> bytes | None:
    """The valid stamp in `path`, or None."""
    try:
        data = _read_small(path)
    except OSError:
        return None
    return data if tai64n.problem(data) is None else None
