"""Per-backend health: rise/fall hysteresis as one explicit transition table.

A backend is UNKNOWN until the probes have given a verdict (at start, and
after a config change of that backend resets it), then UP or DOWN. As in
keepalived, one probe result never flips a verdict: ``rise`` consecutive
successes make a backend UP (from UNKNOWN or DOWN), ``fall`` consecutive
failures make it DOWN (from UP or UNKNOWN). A backend that alternates
success and failure therefore keeps whatever verdict it had, and a fresh one
that flaps stays UNKNOWN - the selector never moves traffic onto it.

Every transition is a row of :data:`TRANSITIONS` (in the spirit of h11's
explicit state machine): the event updates the streak counters, then the
row for ``(state, event)`` says where to go and which threshold, if any, the
streak must reach first. Nothing else in this module changes a state.

Draining is an operator's flag, not a health verdict, so it is not here;
:func:`natfail.core.selector.effective_state` combines the two for status.

Pure: ``now`` is a monotonic time in seconds passed in by the caller.
Values are frozen; :func:`observe` and :func:`reset` return new ones. To
learn whether a verdict changed, compare ``old.state`` with ``new.state``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Final, Literal


class HealthState(str, enum.Enum):
    """The verdict on one backend. The values are the status contract's names."""

    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


class Event(str, enum.Enum):
    SUCCESS = "success"  # a probe got a valid handshake response
    FAILURE = "failure"  # a probe timed out or got an invalid reply
    RESET = "reset"  # the backend's config changed: its old verdict no longer applies


@dataclass(frozen=True, slots=True)
class Rule:
    """One row of the table: go to ``target``, at once if ``threshold`` is
    None, else only once the event's streak has reached ``rise`` or ``fall``."""

    target: HealthState
    threshold: Literal["rise", "fall"] | None = None


# How many recent results `BackendHealth.loss` looks at.
LOSS_WINDOW: Final = 32
_WINDOW_MASK: Final = (1 << LOSS_WINDOW) - 1

_U, _UP, _D = HealthState.UNKNOWN, HealthState.UP, HealthState.DOWN

# The whole state machine. A row whose target is its own state means "stay".
TRANSITIONS: Final[Mapping[tuple[HealthState, Event], Rule]] = MappingProxyType(
    {
        # No verdict yet: either streak can decide it first.
        (_U, Event.SUCCESS): Rule(_UP, "rise"),
        (_U, Event.FAILURE): Rule(_D, "fall"),
        (_U, Event.RESET): Rule(_U),
        # Up: only `fall` failures in a row take it down; a success is no news.
        (_UP, Event.SUCCESS): Rule(_UP),
        (_UP, Event.FAILURE): Rule(_D, "fall"),
        (_UP, Event.RESET): Rule(_U),
        # Down: only `rise` successes in a row bring it back.
        (_D, Event.SUCCESS): Rule(_UP, "rise"),
        (_D, Event.FAILURE): Rule(_D),
        (_D, Event.RESET): Rule(_U),
    }
)


@dataclass(frozen=True, slots=True)
class BackendHealth:
    """What the probes say about one backend.

    ``since`` is the ``now`` of the last state change (or of the last reset):
    for an UP backend it is when it came up, which is what ``preempt_delay``
    measures. ``successes``/``failures`` are the current streaks (at most one
    is non-zero). ``last_rtt`` is the round trip of the last probe if it
    succeeded, else None. ``last_reason`` is the reason of the most recent
    failure since the last reset ("" if none); it survives later successes so
    status can say why a backend went down.
    """

    state: HealthState
    since: float
    successes: int = 0
    failures: int = 0
    last_rtt: float | None = None
    last_reason: str = ""
    history: int = 0
    """The last ``samples`` results, newest in bit 0, 1 for a failure."""
    samples: int = 0

    def __post_init__(self) -> None:
        if not math.isfinite(self.since):
            raise ValueError("since must be a finite monotonic time")
        if self.successes < 0 or self.failures < 0:
            raise ValueError("streaks cannot be negative")
        if self.successes and self.failures:
            raise ValueError("a success streak and a failure streak cannot both run")
        if not 0 <= self.samples <= LOSS_WINDOW or not 0 <= self.history < 1 << LOSS_WINDOW:
            raise ValueError("the loss history holds at most LOSS_WINDOW results")

    @property
    def loss(self) -> float:
        """The share of failures among the last LOSS_WINDOW results while the
        backend was not DOWN (0.0 with none): how bad it has been lately,
        beyond its verdict. Failures while DOWN are an outage, not loss."""
        return self.history.bit_count() / self.samples if self.samples else 0.0

    @classmethod
    def initial(cls, now: float) -> BackendHealth:
        """A backend nobody has probed yet (daemon start, new backend)."""
        return cls(HealthState.UNKNOWN, now)


def _check_thresholds(rise: int, fall: int) -> None:
    # The config refuses these (minimum 1); reaching here means a caller bug.
    if rise < 1 or fall < 1:
        raise ValueError(f"rise and fall must be at least 1, got rise={rise} fall={fall}")


def _check_now(health: BackendHealth, now: float) -> None:
    # `now` is monotonic: earlier than the last change means a mixed-up clock.
    if not math.isfinite(now) or now < health.since:
        raise ValueError(f"now={now} is before the last state change at {health.since}")


def _step(
    health: BackendHealth,
    event: Event,
    now: float,
    rise: int,
    fall: int,
    rtt: float | None,
    reason: str,
) -> BackendHealth:
    """Apply one event: update the streaks, then follow the table's row."""
    samples = min(health.samples + 1, LOSS_WINDOW)
    if event is Event.SUCCESS:
        counted = replace(
            health,
            successes=health.successes + 1,
            failures=0,
            last_rtt=rtt,
            history=(health.history << 1) & _WINDOW_MASK,
            samples=samples,
        )
    elif event is Event.FAILURE and health.state is HealthState.DOWN:
        # An outage is not loss: a backend back from one (restarted, say) is
        # as clean as its probes since; only failures while it was thought
        # usable make it lossy.
        counted = replace(
            health, successes=0, failures=health.failures + 1, last_rtt=None, last_reason=reason
        )
    elif event is Event.FAILURE:
        counted = replace(
            health,
            successes=0,
            failures=health.failures + 1,
            last_rtt=None,
            last_reason=reason,
            history=((health.history << 1) | 1) & _WINDOW_MASK,
            samples=samples,
        )
    else:  # RESET: the old streaks and measurements describe a different backend
        counted = replace(
            health, successes=0, failures=0, last_rtt=None, last_reason="", history=0, samples=0
        )

    rule = TRANSITIONS[(health.state, event)]
    if rule.threshold == "rise":
        reached = counted.successes >= rise
    elif rule.threshold == "fall":
        reached = counted.failures >= fall
    else:
        reached = True
    target = rule.target if reached else health.state

    if target is not health.state or event is Event.RESET:
        return replace(counted, state=target, since=now)
    return counted


def observe(
    health: BackendHealth,
    ok: bool,
    now: float,
    rise: int,
    fall: int,
    *,
    rtt: float | None = None,
    reason: str = "",
) -> BackendHealth:
    """Feed one probe result; returns the new health.

    ``rtt`` (seconds) goes with a success, ``reason`` (e.g. "timeout",
    "bad-response") with a failure; giving either with the other outcome is
    a caller bug and raises ValueError, as do ``rise``/``fall`` below 1 and a
    ``now`` before ``health.since``.
    """
    _check_thresholds(rise, fall)
    _check_now(health, now)
    if ok:
        if reason:
            raise ValueError("a successful probe has no failure reason")
        if rtt is not None and (not math.isfinite(rtt) or rtt < 0):
            raise ValueError(f"rtt must be a non-negative number of seconds, got {rtt}")
        return _step(health, Event.SUCCESS, now, rise, fall, rtt, "")
    if rtt is not None:
        raise ValueError("a failed probe has no round-trip time")
    return _step(health, Event.FAILURE, now, rise, fall, None, reason)


def reset(health: BackendHealth, now: float) -> BackendHealth:
    """Forget the verdict (the backend's config changed): UNKNOWN from ``now``."""
    _check_now(health, now)
    # Thresholds play no part in a reset row; 1/1 only satisfies the signature.
    return _step(health, Event.RESET, now, 1, 1, None, "")
