"""When each service's next probe round is due: one heap for every service.

Periods are exact (a round is due every ``interval`` after the previous due
time, whatever the round itself cost). The services share out the period
in slots of about ROUNDS_PER_SLOT services each (a power of two of slots,
the service's place derived from its name): the rounds of one slot start
together, so the event loop wakes once for a dozen rounds rather than once
for each. On a small gateway the wake-ups, not the probes, were most of the
CPU (each one finds the caches cold): 10 services probed each on its own
cost half again as much per probe as 10 in one slot. 1000 services at 1 Hz
make 64 slots: a burst of about 16 rounds every 16 ms, not a burst of 1000
each second. The first rounds come within the first interval (at most a
second), so a fresh daemon has verdicts at once.

A round that is late by more than a whole interval (SIGSTOP, a suspended
VM) is followed by the next one at the service's place, at least a whole
interval later, never by a burst of rounds to catch up: that would count
``fall`` failures in less than ``fall`` x ``interval``. A round asked for at
once (``soon``: a reload changed the service) is followed by the next one
at the service's place, at least half an interval later.

Pure: ``now`` is always a parameter."""

from __future__ import annotations

import hashlib
import heapq
import math
from dataclasses import dataclass

FIRST_SPREAD = 1.0
"""The first round of a service comes within this share of min(interval, 1 s)
of its start: quick enough that a fresh daemon has verdicts at once."""

ROUNDS_PER_SLOT = 16
"""Services whose rounds start together, about. Bounded because their
initiations leave one after another before any reply is read: 16 rounds of
3 backends take a few milliseconds, which the first replies' round-trip
times then include."""


def phase(name: str) -> float:
    """A stable number in [0, 1) for a service name: its place in the period."""
    digest = hashlib.blake2s(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def slots(services: int) -> int:
    """Slots per period for ``services`` services: a power of two, so that a
    name keeps its slot's start when the count doubles."""
    wanted = max(1, math.ceil(services / ROUNDS_PER_SLOT))
    return 1 << (wanted - 1).bit_length()


def place(name: str, services: int) -> float:
    """Where in the period (a share of it, in [0, 1)) the rounds of ``name``
    start among ``services`` services: the start of its slot."""
    count = slots(services)
    return math.floor(phase(name) * count) / count


@dataclass
class _Entry:
    due: float
    interval: float
    generation: int
    anchor: float
    """A time at the service's place: its rounds come at anchor + k x interval."""


def _at_place(anchor: float, interval: float, at_least: float) -> float:
    """The first time at ``anchor``'s place in the period, not before ``at_least``."""
    return anchor + max(0, math.ceil((at_least - anchor) / interval - 1e-9)) * interval


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

    def _push(self, name: str, due: float, interval: float, anchor: float) -> None:
        self._generation += 1
        self._entries[name] = _Entry(due, interval, self._generation, anchor)
        heapq.heappush(self._heap, (due, self._generation, name))

    def add(self, name: str, interval: float, now: float, *, among: int | None = None) -> None:
        """Start scheduling ``name``, one of ``among`` services added now (they
        share out the period; by default, as many as the schedule then holds):
        its first round within the first interval."""
        if not interval > 0:
            raise ValueError(f"interval must be positive, got {interval}")
        count = among if among is not None else len(self._entries) + 1
        first = now + place(name, count) * min(interval, 1.0) * FIRST_SPREAD
        self._push(name, first, interval, first)

    def remove(self, name: str) -> None:
        self._entries.pop(name, None)  # its heap items are skipped when they surface

    def soon(self, name: str, now: float, interval: float | None = None) -> None:
        """A round of ``name`` now (after a reload changed it), then the period
        from there; ``interval`` replaces the period when given."""
        entry = self._entries.get(name)
        if entry is None:
            raise KeyError(name)
        period = interval if interval is not None else entry.interval
        self._push(name, now, period, entry.anchor)

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
            if following <= now:  # more than a whole interval late
                following = _at_place(entry.anchor, entry.interval, now + entry.interval)
            elif not _placed(entry):  # a round asked for at once
                following = _at_place(entry.anchor, entry.interval, now + entry.interval / 2)
            self._push(name, following, entry.interval, entry.anchor)
            due_names.append(name)
        return due_names


def _placed(entry: _Entry) -> bool:
    """Whether the entry's due time is at its place in the period."""
    offset = (entry.due - entry.anchor) / entry.interval
    return abs(offset - round(offset)) < 1e-6
