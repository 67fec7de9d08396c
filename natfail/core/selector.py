"""Which backend of one service is active: priority, failback, drain, pin.

:func:`select` is a pure function of the service's backends (in config
order), their health, the operator's drained set and pin, the failback
policy, the current active backend and ``now``. The daemon calls it after
every probe round and after every operator command or reload (it is cheap),
acts when ``decision.changed``, and stores ``decision.pin`` as the new pin.
``decision.next_check`` is only a hint: the earliest time a preempt could
happen if nothing else changes, for a daemon that wants to wake up exactly
then rather than at the next probe round.

The rules, first match wins:

1. A pin on a drained backend is dropped: drain is the later, stronger
   order and "drained backends are never chosen" has no exception. (The
   daemon should refuse ``switch`` to a drained backend, even with
   ``--force``; this rule covers draining a backend that is already pinned.)
2. A pin on a backend that failed is dropped (``pin_dropped``), then the
   rules below choose. "Failed" means DOWN while the pin is *armed*. A pin
   made with the backend UP or UNKNOWN is armed at once; a forced pin
   (``switch --force`` on a DOWN backend) is not, so it holds until the
   operator releases it or the backend comes UP - which arms it - and later
   goes DOWN again.
3. Otherwise a pin holds: the pinned backend is active ("manual" on the
   move, "pinned" while it stays), whatever its health.
4. A drained active backend is left for the best UP backend ("drain"); if
   there is none, it stays (as in 7).
5. An UNKNOWN active backend stays until it has a verdict ("pending"): a
   restarted daemon adopts the installed rule, and a backend reset by a
   reload is probed afresh, without moving traffic in between.
6. An UP active backend stays ("unchanged"), except with ``preempt``: a
   backend of strictly higher priority that has been UP for at least
   ``preempt_delay`` (``now >= since + preempt_delay``) takes over
   ("preempt"). Equal priority never preempts: config order only breaks
   ties when a choice has to be made anyway.
7. A DOWN active backend is left for the best UP backend ("failover");
   with no UP backend the last one stays, so its rule stays installed and
   nothing is dropped on purpose ("all-down" when every selectable backend
   is DOWN, "pending" while some still has no verdict). The move is not
   made to an UP backend that is about as bad as the active one: one whose
   recent loss (``Candidate.loss``) is at least LOSSY and not LOSS_MARGIN
   below the active's, while the active has failed fewer than DEAD_STREAK
   probes in a row; the best UP backend that is not takes over, and with
   none the active stays ("no-better"). With the same heavy loss on every
   path, each backend goes DOWN and UP again by chance, and moving traffic
   between them would only flush the clients' flows at every switch. A
   clean standby (loss below LOSSY) takes over at once; a lossy one once
   the active has failed DEAD_STREAK probes in a row, which a dead backend
   does and a lossy one hardly ever.
8. No active backend yet (start): the best UP backend ("initial"); none UP
   means no decision yet, ``active`` None ("pending", or "all-down").

"Best" is the highest priority among UP, undrained backends, ties broken by
config order. Because rule 8 takes the first backend to come UP, the daemon
should call :func:`select` once per probe round rather than after each
single probe, so backends that come up in the same round compete.

A released pin needs nothing special: the daemon passes ``pin=None`` and the
failback policy decides (sticky stays on the formerly pinned backend while
it is UP; preempt returns to a better one that has been UP long enough).

Caller bugs raise ValueError: no backends, duplicate names, a current
backend, pin or drained name that is not among the backends (a reload must
prune those), an unknown failback, a negative ``preempt_delay``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence, Set
from dataclasses import dataclass
from typing import Final, Literal

from natfail.core.health import HealthState

Failback = Literal["sticky", "preempt"]
FAILBACKS: Final[tuple[Failback, ...]] = ("sticky", "preempt")

Reason = Literal[
    "initial",  # first choice: there was no active backend
    "failover",  # the active backend is DOWN (or its pin was dropped): moved
    "preempt",  # a better backend has been UP for preempt_delay: moved
    "manual",  # moved to the pinned backend
    "drain",  # the active backend is drained: moved
    "pinned",  # the pin holds; no move
    "unchanged",  # the active backend is UP and stays
    "pending",  # no move (or no choice) while verdicts are missing
    "all-down",  # every selectable backend is DOWN: the last one stays (or none)
    "no-better",  # the active backend is DOWN, but every UP one is as lossy: no move
]

# A recent loss at which a backend counts as bad, not merely unlucky.
LOSSY: Final = 0.25
# Failures in a row that make a backend worse than any lossy one: at 50 %
# loss, a run this long starts about once in a thousand probes.
DEAD_STREAK: Final = 10
# How much less loss makes a lossy backend better than the active one.
LOSS_MARGIN: Final = 0.3

EffectiveState = Literal["up", "down", "unknown", "drained"]


@dataclass(frozen=True, slots=True)
class Candidate:
    """One backend as the selector sees it; the sequence order is config order."""

    name: str
    priority: int  # higher wins
    state: HealthState
    since: float  # BackendHealth.since: for UP, when it came up
    loss: float = 0.0  # BackendHealth.loss: share of recent probes that failed
    failures: int = 0  # BackendHealth.failures: probes failed in a row


@dataclass(frozen=True, slots=True)
class Pin:
    """A manual switch. ``armed``: a DOWN verdict ends the pin (see rule 2)."""

    backend: str
    armed: bool = True

    @classmethod
    def new(cls, backend: str, state: HealthState) -> Pin:
        """The pin of ``switch``: a forced switch to a DOWN backend is not armed
        yet, otherwise the pin would fall at once."""
        return cls(backend, armed=state is not HealthState.DOWN)


@dataclass(frozen=True, slots=True)
class Decision:
    active: str | None  # None only before any backend was ever chosen
    reason: Reason
    previous: str | None  # the `current` that was passed in
    pin: Pin | None = None  # the pin to keep (armed may have changed); None: no pin
    pin_dropped: bool = False  # a pin was passed in and is gone: log it, persist it
    no_healthy: bool = False  # every selectable backend is DOWN ("all-down")
    next_check: float | None = None  # earliest time a preempt could happen, if any

    @property
    def changed(self) -> bool:
        """True when the data path must move: swap, conntrack cleanup, notify."""
        return self.active != self.previous


def effective_state(state: HealthState, drained: bool) -> EffectiveState:
    """The status contract's state: drained shadows the health verdict."""
    return "drained" if drained else _STATUS_NAMES[state]


_STATUS_NAMES: Final[dict[HealthState, EffectiveState]] = {
    HealthState.UP: "up",
    HealthState.DOWN: "down",
    HealthState.UNKNOWN: "unknown",
}


def _rank(c: Candidate, order: int) -> tuple[int, int]:
    # Higher priority first, then earlier in the config.
    return (-c.priority, order)


def _validate(
    backends: Sequence[Candidate],
    current: str | None,
    drained: Set[str],
    pin: Pin | None,
    failback: str,
    preempt_delay: float,
    now: float,
) -> None:
    if not backends:
        raise ValueError("a service has at least one backend")
    names = [c.name for c in backends]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate backend names: {names}")
    known = set(names)
    if current is not None and current not in known:
        raise ValueError(f"current backend {current!r} is not among {names}")
    if pin is not None and pin.backend not in known:
        raise ValueError(f"pinned backend {pin.backend!r} is not among {names}")
    if not drained <= known:
        raise ValueError(f"drained backends {sorted(drained - known)} are not among {names}")
    if failback not in FAILBACKS:
        raise ValueError(f"failback must be one of {FAILBACKS}, got {failback!r}")
    if not math.isfinite(now):
        raise ValueError(f"now must be a finite monotonic time, got {now}")
    if not math.isfinite(preempt_delay) or preempt_delay < 0:
        raise ValueError(f"preempt_delay must be >= 0, got {preempt_delay}")


def select(
    backends: Sequence[Candidate],
    *,
    current: str | None,
    now: float,
    drained: Set[str] = frozenset(),
    pin: Pin | None = None,
    failback: Failback = "sticky",
    preempt_delay: float = 0.0,
) -> Decision:
    """Decide the active backend of one service (rules in the module doc)."""
    _validate(backends, current, drained, pin, failback, preempt_delay, now)
    by_name = {c.name: c for c in backends}
    order = {c.name: i for i, c in enumerate(backends)}
    selectable = [c for c in backends if c.name not in drained]
    up = sorted(
        (c for c in selectable if c.state is HealthState.UP),
        key=lambda c: _rank(c, order[c.name]),
    )
    best = up[0] if up else None
    # Nothing selectable can come up without a verdict change: truly all down.
    all_down = all(c.state is HealthState.DOWN for c in selectable)
    pin_dropped = False

    def stay_without_up(reason_if_pending: Reason = "pending") -> Decision:
        # Rules 4, 7, 8 with no UP backend: keep what is there (maybe nothing).
        return Decision(
            active=current,
            reason="all-down" if all_down else reason_if_pending,
            previous=current,
            pin_dropped=pin_dropped,
            no_healthy=all_down,
        )

    # Rules 1-3: the pin.
    if pin is not None:
        pinned = by_name[pin.backend]
        if pinned.name in drained or (pin.armed and pinned.state is HealthState.DOWN):
            pin_dropped = True
        else:
            kept = Pin(pinned.name, armed=pin.armed or pinned.state is HealthState.UP)
            return Decision(
                active=pinned.name,
                reason="pinned" if current == pinned.name else "manual",
                previous=current,
                pin=kept,
            )

    if current is None:  # rule 8
        if best is None:
            return stay_without_up()
        return Decision(best.name, "initial", current, pin_dropped=pin_dropped)

    active = by_name[current]
    if active.name in drained:  # rule 4
        if best is None:
            return stay_without_up()
        return Decision(best.name, "drain", current, pin_dropped=pin_dropped)

    if active.state is HealthState.UNKNOWN:  # rule 5
        return Decision(current, "pending", current, pin_dropped=pin_dropped)

    if active.state is HealthState.DOWN:  # rule 7
        if best is None:
            return stay_without_up()
        better = [
            c
            for c in up
            if c.loss < LOSSY
            or c.loss <= active.loss - LOSS_MARGIN
            or active.failures >= DEAD_STREAK
        ]
        if not better:
            return Decision(current, "no-better", current, pin_dropped=pin_dropped)
        return Decision(better[0].name, "failover", current, pin_dropped=pin_dropped)

    # Rule 6: the active backend is UP.
    if failback == "sticky":
        return Decision(current, "unchanged", current, pin_dropped=pin_dropped)
    better = [c for c in up if c.priority > active.priority]
    # Written as `now >= since + delay`, the same sum as next_check, so a daemon
    # woken at exactly next_check sees the preempt (no float rounding gap).
    ripe = [c for c in better if now >= c.since + preempt_delay]
    if ripe:
        target = ripe[0]  # `up` is sorted best first, so is `ripe`
        return Decision(
            target.name,
            "preempt",
            current,
            pin_dropped=pin_dropped,
            next_check=_next_preempt(up, target, preempt_delay),
        )
    return Decision(
        current,
        "unchanged",
        current,
        pin_dropped=pin_dropped,
        next_check=_next_preempt(up, active, preempt_delay),
    )


def _next_preempt(up: Sequence[Candidate], active: Candidate, delay: float) -> float | None:
    """When the first backend better than ``active`` reaches ``delay`` of uptime."""
    times = [c.since + delay for c in up if c.priority > active.priority]
    return min(times) if times else None
