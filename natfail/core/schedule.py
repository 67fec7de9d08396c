"""When each service's next probe round is due: one heap for every service.

Periods are exact (a round is due every ``interval`` after the previous due
time, whatever the round itself cost), and the first rounds are spread over
the first interval by a phase derived from the service's name, so 1000
services at 1 Hz make a steady 1000 rounds a second rather than a burst
each second. After a stall (SIGSTOP, a suspended VM) the next round comes a
whole interval after the late one, never a burst of rounds to catch up:
that would count ``fall`` failures in less than ``fall`` x ``interval``.

Pure: ``now`` is always a parameter."""

from __future__ import annotations

import hashlib
import heapq
from dataclasses import dataclass

# The first round of a service comes within this share of min(interval, 1 s)
# of its start: quick enough that a fresh daemon has verdicts at once.
FIRST_SPREAD = 1.0


def phase(name: str) -> float:
    """A stable number in [0, 1) for a service name: its place in the period."""
    digest = hashlib.blake2s(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass
class _Entry:
    due: float
    interval: float
    generation: int


class Schedule:
    """Due times of probe rounds, one entry per service name."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str]] = []
        self._entries: dict[str, _Entry] = {}
        self._generation = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        """The scheduled services, in the order they were added."""
        return list(self._entries)

    def _push(self, name: str, due: float, interval: float) -> None:
        self._generation += 1
        self._entries[name] = _Entry(due, interval, self._generation)
        heapq.heappush(self._heap, (due, self._generation, name))

    def add(self, name: str, interval: float, now: float) -> None:
        """Start scheduling ``name``: its first round within the spread."""
        if not interval > 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self._push(name, now + phase(name) * min(interval, 1.0) * FIRST_SPREAD, interval)

    def remove(self, name: str) -> None:
        self._entries.pop(name, None)  # its heap items are skipped when they surface

    def soon(self, name: str, now: float, interval: float | None = None) -> None:
        """A round of ``name`` now (after a reload changed it), then the period
        from there; ``interval`` replaces the period when given."""
        entry = self._entries.get(name)
        if entry is None:
            raise KeyError(name)
        self._push(name, now, interval if interval is not None else entry.interval)

    def next_due(self) -> float | None:
        """The earliest due time, None when nothing is scheduled."""
        while self._heap:
            due, generation, name = self._heap[0]
            entry = self._entries.get(name)
            if entry is not None and entry.generation == generation:
                return due
            heapq.heappop(self._heap)
        return None

    def pop_due(self, now: float) -> list[str]:
        """The services whose round is due at ``now``, each rescheduled."""
        due_names: list[str] = []
        while (due := self.next_due()) is not None and due <= now:
            _, _, name = heapq.heappop(self._heap)
            entry = self._entries[name]
            following = entry.due + entry.interval
            if following <= now:
                following = now + entry.interval
            self._push(name, following, entry.interval)
            due_names.append(name)
        return due_names
