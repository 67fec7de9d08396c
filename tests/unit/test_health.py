"""The health core (natfail/core/health.py): every row of the transition
table, rise/fall edges, flapping, and a reference model under hypothesis."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from natfail.core.health import (
    TRANSITIONS,
    BackendHealth,
    Event,
    HealthState,
    Rule,
    observe,
    reset,
)

U, UP, D = HealthState.UNKNOWN, HealthState.UP, HealthState.DOWN

# The table as the design states it, written out independently of the module.
EXPECTED_TABLE = {
    (U, Event.SUCCESS): Rule(UP, "rise"),
    (U, Event.FAILURE): Rule(D, "fall"),
    (U, Event.RESET): Rule(U),
    (UP, Event.SUCCESS): Rule(UP),
    (UP, Event.FAILURE): Rule(D, "fall"),
    (UP, Event.RESET): Rule(U),
    (D, Event.SUCCESS): Rule(UP, "rise"),
    (D, Event.FAILURE): Rule(D),
    (D, Event.RESET): Rule(U),
}


def run(results: Sequence[bool], rise: int, fall: int, start: float = 0.0) -> BackendHealth:
    """Feed results at times start+1, start+2, ... from a fresh backend."""
    h = BackendHealth.initial(start)
    for i, ok in enumerate(results, 1):
        h = observe(h, ok, start + i, rise, fall)
    return h


def test_table_is_complete_and_as_designed() -> None:
    assert dict(TRANSITIONS) == EXPECTED_TABLE
    assert set(TRANSITIONS) == {(s, e) for s in HealthState for e in Event}


def test_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        TRANSITIONS[(U, Event.SUCCESS)] = Rule(D)  # type: ignore[index]


# --- every row, with rise=2 fall=3 so "not yet" and "now" both show -------------


def test_unknown_success_rises_after_rise() -> None:
    h = observe(BackendHealth.initial(0.0), True, 1.0, 2, 3, rtt=0.004)
    assert (h.state, h.successes, h.since, h.last_rtt) == (U, 1, 0.0, 0.004)
    h = observe(h, True, 2.0, 2, 3, rtt=0.005)
    assert (h.state, h.successes, h.since, h.last_rtt) == (UP, 2, 2.0, 0.005)


def test_unknown_failure_falls_after_fall() -> None:
    h = BackendHealth.initial(0.0)
    for t in (1.0, 2.0):
        h = observe(h, False, t, 2, 3, reason="timeout")
        assert h.state is U and h.since == 0.0
    h = observe(h, False, 3.0, 2, 3, reason="timeout")
    assert (h.state, h.failures, h.since, h.last_reason) == (D, 3, 3.0, "timeout")


def test_up_success_stays_and_keeps_since() -> None:
    h = run([True, True], 2, 3)
    assert h.state is UP and h.since == 2.0
    h2 = observe(h, True, 3.0, 2, 3)
    assert (h2.state, h2.since, h2.successes) == (UP, 2.0, 3)


def test_up_failure_falls_after_fall() -> None:
    h = run([True, True], 2, 3)
    h = observe(h, False, 3.0, 2, 3, reason="timeout")
    h = observe(h, False, 4.0, 2, 3, reason="bad-response")
    assert h.state is UP and h.since == 2.0 and h.last_rtt is None
    h = observe(h, False, 5.0, 2, 3, reason="timeout")
    assert (h.state, h.since, h.failures, h.successes) == (D, 5.0, 3, 0)


def test_down_success_rises_after_rise() -> None:
    h = run([False] * 3, 2, 3)
    assert h.state is D
    h = observe(h, True, 4.0, 2, 3)
    assert h.state is D and h.since == 3.0
    h = observe(h, True, 5.0, 2, 3)
    assert (h.state, h.since) == (UP, 5.0)


def test_down_failure_stays_and_keeps_since() -> None:
    h = run([False] * 3, 2, 3)
    h2 = observe(h, False, 4.0, 2, 3, reason="timeout")
    assert (h2.state, h2.since, h2.failures) == (D, 3.0, 4)


@pytest.mark.parametrize(
    ("results", "before"), [([], U), ([True, True], UP), ([False, False, False], D)]
)
def test_reset_from_every_state(results: list[bool], before: HealthState) -> None:
    h = run(results, 2, 3)
    assert h.state is before
    h = observe(h, False, 10.0, 2, 3, reason="timeout")  # something to forget
    # The record restarts: UNKNOWN from now, streaks and measurements gone.
    assert reset(h, 20.0) == BackendHealth(U, 20.0)


# --- details of the record -----------------------------------------------------


def test_failure_reason_survives_successes_rtt_does_not_survive_failure() -> None:
    h = run([True, True], 2, 3)
    h = observe(h, False, 3.0, 2, 3, reason="timeout")
    assert h.last_rtt is None and h.last_reason == "timeout"
    h = observe(h, True, 4.0, 2, 3, rtt=0.01)
    assert h.last_rtt == 0.01 and h.last_reason == "timeout"


def test_a_success_breaks_a_failure_streak() -> None:
    h = run([True, True, False, False, True, False, False], 2, 3)
    assert h.state is UP and h.failures == 2


def test_streak_counts_continue_past_the_threshold() -> None:
    h = run([False] * 7, 2, 3)
    assert h.failures == 7 and h.since == 3.0


# --- rise=1 / fall=1 -----------------------------------------------------------


def test_rise_one_fall_one_follows_every_result() -> None:
    h = BackendHealth.initial(0.0)
    sinces = []
    for t, ok in enumerate([True, False, True, True, False], 1):
        h = observe(h, ok, float(t), 1, 1)
        assert h.state is (UP if ok else D)
        sinces.append(h.since)
    assert sinces == [1.0, 2.0, 3.0, 3.0, 5.0]  # the repeated success is no change


def test_rise_one_from_unknown_and_fall_one_from_unknown() -> None:
    assert observe(BackendHealth.initial(0.0), True, 1.0, 1, 5).state is UP
    assert observe(BackendHealth.initial(0.0), False, 1.0, 5, 1).state is D


# --- flapping ------------------------------------------------------------------


def test_flapping_standby_never_reaches_up_with_rise_two() -> None:
    h = run([True, False] * 50, 2, 3)
    assert h.state is U
    h = run([False] * 3 + [True, False] * 50, 2, 3)
    assert h.state is D


def test_flapping_active_is_never_taken_down_with_fall_two() -> None:
    h = run([True, True] + [False, True] * 50, 2, 2)
    assert h.state is UP and h.since == 2.0


# --- misuse raises -------------------------------------------------------------


@pytest.mark.parametrize(("rise", "fall"), [(0, 3), (2, 0), (-1, -1)])
def test_thresholds_below_one_raise(rise: int, fall: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        observe(BackendHealth.initial(0.0), True, 1.0, rise, fall)


def test_time_going_backwards_raises() -> None:
    h = run([True, True], 2, 3, start=100.0)
    with pytest.raises(ValueError, match="before"):
        observe(h, True, 50.0, 2, 3)
    with pytest.raises(ValueError, match="before"):
        reset(h, 50.0)
    with pytest.raises(ValueError):
        observe(h, True, float("nan"), 2, 3)


def test_mismatched_measurements_raise() -> None:
    h = BackendHealth.initial(0.0)
    with pytest.raises(ValueError, match="round-trip"):
        observe(h, False, 1.0, 2, 3, rtt=0.1)
    with pytest.raises(ValueError, match="reason"):
        observe(h, True, 1.0, 2, 3, reason="timeout")
    with pytest.raises(ValueError, match="rtt"):
        observe(h, True, 1.0, 2, 3, rtt=-0.1)


def test_impossible_records_raise() -> None:
    with pytest.raises(ValueError):
        BackendHealth(UP, 0.0, successes=1, failures=1)
    with pytest.raises(ValueError):
        BackendHealth(UP, 0.0, failures=-1)
    with pytest.raises(ValueError):
        BackendHealth(UP, float("inf"))


def test_values_are_frozen() -> None:
    h = BackendHealth.initial(0.0)
    with pytest.raises(AttributeError):
        h.state = UP  # type: ignore[misc]


# --- the property: a reference model -------------------------------------------


def reference(results: Sequence[bool], rise: int, fall: int) -> tuple[HealthState, int]:
    """State and ``since`` index (0 = start) after ``results`` (result i at time i+1).

    Declaratively: a verdict is triggered at every index where the last `rise`
    results are all successes (UP) or the last `fall` all failures (DOWN).
    The two kinds of window can never overlap, so the state is the kind of the
    latest trigger (UNKNOWN if none) and it took effect at the first trigger
    of that kind after the last trigger of the other kind: hysteresis.
    """
    triggers: list[tuple[int, HealthState]] = []
    for i in range(len(results)):
        if i + 1 >= rise and all(results[i + 1 - rise : i + 1]):
            triggers.append((i + 1, UP))
        if i + 1 >= fall and not any(results[i + 1 - fall : i + 1]):
            triggers.append((i + 1, D))
    if not triggers:
        return U, 0
    state = triggers[-1][1]
    since = triggers[-1][0]
    for t, s in reversed(triggers):
        if s is not state:
            break
        since = t
    return state, since


def trailing(results: Sequence[bool], value: bool) -> int:
    n = 0
    for r in reversed(results):
        if r is not value:
            break
        n += 1
    return n


@given(
    results=st.lists(st.booleans(), max_size=60),
    rise=st.integers(1, 5),
    fall=st.integers(1, 5),
)
def test_matches_reference_model(results: list[bool], rise: int, fall: int) -> None:
    h = run(results, rise, fall)
    state, since = reference(results, rise, fall)
    assert h.state is state
    assert h.since == since
    assert h.successes == trailing(results, True)
    assert h.failures == trailing(results, False)


@given(
    results=st.lists(st.booleans(), max_size=60),
    rise=st.integers(1, 5),
    fall=st.integers(1, 5),
)
def test_no_state_change_without_a_full_streak(results: list[bool], rise: int, fall: int) -> None:
    h = BackendHealth.initial(0.0)
    for i, ok in enumerate(results, 1):
        new = observe(h, ok, float(i), rise, fall)
        if new.state is not h.state:
            assert new.since == i
            if new.state is UP:
                assert new.successes >= rise
            else:
                assert new.state is D and new.failures >= fall
        else:
            assert new.since == h.since
        h = new


def test_loss_is_the_share_of_failures_in_the_recent_window() -> None:
    from natfail.core.health import LOSS_WINDOW, BackendHealth, observe

    h = BackendHealth.initial(0.0)
    assert h.loss == 0.0
    for i in range(4):
        h = observe(h, i % 2 == 0, float(i), 2, 3, reason="" if i % 2 == 0 else "timeout")
    assert h.loss == 0.5
    for i in range(LOSS_WINDOW):
        h = observe(h, True, 10.0 + i, 2, 3)
    assert h.loss == 0.0 and h.samples == LOSS_WINDOW  # old failures fall out
    for i in range(LOSS_WINDOW):
        h = observe(h, False, 40.0 + i, 2, 3, reason="timeout")
    # only the fall failures that took it down count: the rest is an outage
    assert h.state is HealthState.DOWN and h.failures == LOSS_WINDOW
    assert h.loss == 3 / LOSS_WINDOW
    assert reset(h, 100.0).loss == 0.0


def test_a_backend_back_from_an_outage_is_not_lossy() -> None:
    """Killed for 20 probes and restarted, it is as clean as before: the next
    failover to it must not wait for the loss rule (10 failures of the active)."""
    from natfail.core.health import LOSS_WINDOW, BackendHealth, observe

    h = BackendHealth.initial(0.0)
    for i in range(LOSS_WINDOW):
        h = observe(h, True, float(i), 2, 3)
    for i in range(20):
        h = observe(h, False, 40.0 + i, 2, 3, reason="timeout")
    for i in range(2):
        h = observe(h, True, 70.0 + i, 2, 3)
    assert h.state is HealthState.UP and h.loss < 0.25
    # while it is thought usable, failures are loss
    for i in range(12):
        h = observe(h, i % 2 == 0, 80.0 + i, 2, 3, reason="" if i % 2 == 0 else "timeout")
    assert h.loss >= 6 / LOSS_WINDOW
