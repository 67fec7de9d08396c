"""Pings from the lab's client, and reading ping's output: how many replies came
back, and when each one did."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from typing import TYPE_CHECKING, Final

from natfail.lab.topology import SERVER_TUNNEL_V4

if TYPE_CHECKING:
    from natfail.lab.lab import Lab

_RECEIVED: Final = re.compile(r"(\d+) (?:packets )?received")
# one reply of `ping -D`: "[1700000000.123456] 64 bytes from 10.99.0.1: icmp_seq=3 ..."
_REPLY: Final = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from .* icmp_seq=(\d+)")


def received(summary: str) -> int:
    """The replies counted in the summary of ``ping -q`` (0 when it has none)."""
    m = _RECEIVED.search(summary)
    return int(m.group(1)) if m else 0


def reply_time(line: str) -> float | None:
    """The Unix time a ``ping -D`` output line stamps on a reply, None for other lines."""
    m = _REPLY.match(line)
    return float(m.group(1)) if m else None


class Pinger:
    """``ping -D`` from the client through the tunnel, every ``interval`` seconds; a thread
    collects the reception time of every reply."""

    def __init__(self, lab: Lab, interval: float = 0.05, target: str = SERVER_TUNNEL_V4) -> None:
        self.interval = interval
        self.replies: list[float] = []
        self._lock = threading.Lock()
        self.proc = lab.popen(
            lab.client,
            ["ping", "-n", "-D", "-i", f"{interval:g}", "-W", "1", target],
            stdout=subprocess.PIPE,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            at = reply_time(line)
            if at is not None:
                with self._lock:
                    self.replies.append(at)

    def first_reply_after(self, after: float, limit: float) -> float | None:
        """Waits up to ``limit`` seconds (from now) for a reply received after ``after``."""
        deadline = time.time() + limit
        while time.time() < deadline:
            with self._lock:
                later = [t for t in self.replies if t > after]
            if later:
                return later[0]
            time.sleep(0.02)
        return None

    def last_reply_before(self, before: float) -> float | None:
        with self._lock:
            earlier = [t for t in self.replies if t <= before]
        return earlier[-1] if earlier else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        self._thread.join(2)
