"""The selector (natfail/core/selector.py): one test per rule, preempt timing
at its boundary, pins (plain, forced, drained), and invariants under hypothesis."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from natfail.core.health import HealthState
from natfail.core.selector import (
    Candidate,
    Decision,
    Failback,
    Pin,
    effective_state,
    select,
)

U, UP, D = HealthState.UNKNOWN, HealthState.UP, HealthState.DOWN


def svc(
    a: HealthState = UP,
    b: HealthState = UP,
    c: HealthState = UP,
    since: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> list[Candidate]:
    """a (100) > b (50) = c (50); b is before c in config order."""
    return [
        Candidate("a", 100, a, since[0]),
        Candidate("b", 50, b, since[1]),
        Candidate("c", 50, c, since[2]),
    ]


# --- effective_state -----------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "drained", "expected"),
    [
        (UP, False, "up"),
        (D, False, "down"),
        (U, False, "unknown"),
        (UP, True, "drained"),
        (D, True, "drained"),
        (U, True, "drained"),
    ],
)
def test_effective_state(state: HealthState, drained: bool, expected: str) -> None:
    assert effective_state(state, drained) == expected


# --- start ---------------------------------------------------------------------


def test_start_everything_unknown_is_no_decision() -> None:
    d = select(svc(U, U, U), current=None, now=0.0)
    assert d == Decision(None, "pending", None)
    assert not d.changed and not d.no_healthy


def test_start_picks_highest_priority_up() -> None:
    d = select(svc(), current=None, now=5.0)
    assert (d.active, d.reason, d.changed) == ("a", "initial", True)


def test_start_ties_broken_by_config_order() -> None:
    assert select(svc(a=D), current=None, now=5.0).active == "b"
    assert select(svc(a=D, b=U), current=None, now=5.0).active == "c"


def test_start_takes_the_first_up_even_if_a_better_one_is_unknown() -> None:
    # Documented: the daemon calls once per probe round so peers compete.
    d = select(svc(a=U, b=UP, c=U), current=None, now=5.0)
    assert (d.active, d.reason) == ("b", "initial")


def test_start_all_down_is_no_decision_flagged() -> None:
    d = select(svc(D, D, D), current=None, now=5.0)
    assert (d.active, d.reason, d.no_healthy) == (None, "all-down", True)


# --- adoption / pending ----------------------------------------------------------


def test_adopted_unknown_active_stays_even_if_better_is_up() -> None:
    d = select(svc(a=UP, b=U), current="b", now=5.0, failback="preempt")
    assert (d.active, d.reason, d.changed) == ("b", "pending", False)


def test_adopted_active_that_comes_up_stays_sticky() -> None:
    d = select(svc(a=UP, b=UP), current="b", now=5.0)
    assert (d.active, d.reason) == ("b", "unchanged")


def test_adopted_active_that_goes_down_fails_over() -> None:
    d = select(svc(a=UP, b=D), current="b", now=5.0)
    assert (d.active, d.reason) == ("a", "failover")


# --- failover and all-down -----------------------------------------------------


def test_failover_to_best_up() -> None:
    d = select(svc(a=D), current="a", now=5.0)
    assert (d.active, d.reason, d.changed) == ("b", "failover", True)


def test_failover_skips_drained() -> None:
    d = select(svc(a=D), current="a", now=5.0, drained={"b"})
    assert d.active == "c"


def test_failover_ignores_preempt_delay() -> None:
    d = select(
        svc(a=D, since=(0, 99, 99)), current="a", now=100.0, failback="preempt", preempt_delay=30.0
    )
    assert (d.active, d.reason) == ("b", "failover")


def test_all_down_keeps_last_active() -> None:
    d = select(svc(D, D, D), current="b", now=5.0)
    assert (d.active, d.reason, d.no_healthy, d.changed) == ("b", "all-down", True, False)


def test_down_active_with_unknown_peers_waits() -> None:
    d = select(svc(a=D, b=U, c=D), current="a", now=5.0)
    assert (d.active, d.reason, d.no_healthy) == ("a", "pending", False)


def test_all_down_first_back_gets_traffic() -> None:
    d = select(svc(a=D, b=D, c=UP), current="a", now=5.0)
    assert (d.active, d.reason) == ("c", "failover")


# --- sticky and preempt --------------------------------------------------------


def test_sticky_stays_when_better_returns() -> None:
    d = select(svc(since=(0, 0, 0)), current="b", now=1000.0, failback="sticky")
    assert (d.active, d.reason, d.next_check) == ("b", "unchanged", None)


def test_preempt_waits_for_delay_and_reports_when() -> None:
    cands = svc(since=(70.0, 0.0, 0.0))
    before = select(cands, current="b", now=99.999, failback="preempt", preempt_delay=30.0)
    assert (before.active, before.reason, before.next_check) == ("b", "unchanged", 100.0)


def test_preempt_exactly_at_delay() -> None:
    cands = svc(since=(70.0, 0.0, 0.0))
    d = select(cands, current="b", now=100.0, failback="preempt", preempt_delay=30.0)
    assert (d.active, d.reason, d.changed) == ("a", "preempt", True)


def test_preempt_at_next_check_despite_float_rounding() -> None:
    # 0.1 + 0.2 != 0.3: waking at next_check must still preempt, never spin.
    cands = svc(since=(0.1, 0.0, 0.0))
    d0 = select(cands, current="b", now=0.2, failback="preempt", preempt_delay=0.2)
    assert d0.next_check is not None
    d1 = select(cands, current="b", now=d0.next_check, failback="preempt", preempt_delay=0.2)
    assert d1.reason == "preempt"


def test_preempt_zero_delay_is_immediate() -> None:
    d = select(svc(since=(5.0, 0, 0)), current="b", now=5.0, failback="preempt")
    assert d.active == "a"


def test_preempt_never_for_equal_priority() -> None:
    d = select(svc(a=D), current="c", now=1000.0, failback="preempt", preempt_delay=0.0)
    assert (d.active, d.reason, d.next_check) == ("c", "unchanged", None)


def test_preempt_moves_to_a_ripe_middle_backend_and_hints_the_best() -> None:
    cands = [
        Candidate("a", 100, UP, 90.0),
        Candidate("b", 50, UP, 0.0),
        Candidate("z", 10, UP, 0.0),
    ]
    d = select(cands, current="z", now=100.0, failback="preempt", preempt_delay=30.0)
    assert (d.active, d.reason, d.next_check) == ("b", "preempt", 120.0)


def test_preempt_not_to_a_drained_backend() -> None:
    d = select(svc(since=(0, 0, 0)), current="b", now=100.0, failback="preempt", drained={"a"})
    assert (d.active, d.next_check) == ("b", None)


def test_preempt_waits_for_a_flapping_better_backend() -> None:
    # A backend that went down and up again restarts its `since`.
    d = select(
        svc(since=(95.0, 0, 0)), current="b", now=100.0, failback="preempt", preempt_delay=30.0
    )
    assert (d.active, d.next_check) == ("b", 125.0)


# --- drain ---------------------------------------------------------------------


def test_drain_of_active_moves_to_best_other_up() -> None:
    d = select(svc(), current="a", now=5.0, drained={"a"})
    assert (d.active, d.reason, d.changed) == ("b", "drain", True)


def test_drain_of_active_with_no_other_up_stays() -> None:
    d = select(svc(b=D, c=D), current="a", now=5.0, drained={"a"})
    assert (d.active, d.reason, d.no_healthy) == ("a", "all-down", True)


def test_drain_of_unknown_adopted_active_moves() -> None:
    d = select(svc(a=U), current="a", now=5.0, drained={"a"})
    assert (d.active, d.reason) == ("b", "drain")


def test_drained_never_chosen_at_start() -> None:
    assert select(svc(), current=None, now=5.0, drained={"a", "b"}).active == "c"
    d = select(svc(), current=None, now=5.0, drained={"a", "b", "c"})
    assert (d.active, d.reason) == (None, "all-down")


# --- pins ----------------------------------------------------------------------


def test_pin_moves_and_then_holds() -> None:
    pin = Pin.new("c", UP)
    d = select(svc(), current="a", now=5.0, pin=pin)
    assert (d.active, d.reason, d.pin, d.changed) == ("c", "manual", pin, True)
    d = select(svc(), current="c", now=6.0, pin=pin, failback="preempt")
    assert (d.active, d.reason, d.pin, d.pin_dropped) == ("c", "pinned", pin, False)


def test_pin_holds_while_unknown() -> None:
    d = select(svc(c=U), current="c", now=5.0, pin=Pin.new("c", U))
    assert (d.active, d.reason) == ("c", "pinned")


def test_pin_dropped_when_backend_fails() -> None:
    pin = Pin.new("c", UP)
    d = select(svc(c=D), current="c", now=5.0, pin=pin)
    assert (d.active, d.reason, d.pin, d.pin_dropped) == ("a", "failover", None, True)


def test_pin_dropped_when_backend_fails_and_nothing_else_is_up() -> None:
    d = select(svc(D, D, D), current="c", now=5.0, pin=Pin("c"))
    assert (d.active, d.reason, d.pin, d.pin_dropped) == ("c", "all-down", None, True)


def test_released_pin_sticky_stays_preempt_returns() -> None:
    assert select(svc(), current="c", now=5.0).active == "c"
    d = select(svc(), current="c", now=5.0, failback="preempt", preempt_delay=1.0)
    assert (d.active, d.reason) == ("a", "preempt")


def test_forced_pin_on_down_backend_holds_until_up_then_down() -> None:
    pin = Pin.new("c", D)
    assert pin == Pin("c", armed=False)
    d = select(svc(c=D), current="a", now=5.0, pin=pin)
    assert (d.active, d.reason, d.pin) == ("c", "manual", pin)
    d = select(svc(c=D), current="c", now=6.0, pin=d.pin)
    assert (d.active, d.reason, d.pin_dropped) == ("c", "pinned", False)
    # Still down: the pin holds. Comes up: the pin is armed.
    d = select(svc(c=UP), current="c", now=7.0, pin=d.pin)
    assert d.pin == Pin("c", armed=True)
    # Down again: that is a failure, the pin falls.
    d = select(svc(c=D), current="c", now=8.0, pin=d.pin)
    assert (d.active, d.reason, d.pin, d.pin_dropped) == ("a", "failover", None, True)


def test_forced_pin_is_not_armed_by_unknown() -> None:
    d = select(svc(c=U), current="c", now=5.0, pin=Pin("c", armed=False))
    assert d.pin == Pin("c", armed=False)


def test_pin_on_drained_backend_is_dropped() -> None:
    d = select(svc(), current="c", now=5.0, pin=Pin("c"), drained={"c"})
    assert (d.active, d.reason, d.pin, d.pin_dropped) == ("a", "drain", None, True)
    d = select(svc(), current="a", now=5.0, pin=Pin("c"), drained={"c"})
    assert (d.active, d.reason, d.pin_dropped) == ("a", "unchanged", True)


def test_pin_beats_pending_adoption() -> None:
    d = select(svc(a=U), current="a", now=5.0, pin=Pin("b"))
    assert (d.active, d.reason) == ("b", "manual")


def test_pin_at_start() -> None:
    d = select(svc(U, U, U), current=None, now=0.0, pin=Pin("b"))
    assert (d.active, d.reason) == ("b", "manual")


# --- misuse raises -------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"current": "x"}, "current"),
        ({"pin": Pin("x")}, "pinned"),
        ({"drained": {"x"}}, "drained"),
        ({"failback": "bounce"}, "failback"),
        ({"preempt_delay": -1.0}, "preempt_delay"),
        ({"now": float("nan")}, "now"),
    ],
)
def test_caller_bugs_raise(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"current": None, "now": 0.0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        select(svc(), **args)  # type: ignore[arg-type]


def test_no_backends_or_duplicates_raise() -> None:
    with pytest.raises(ValueError, match="at least one"):
        select([], current=None, now=0.0)
    with pytest.raises(ValueError, match="duplicate"):
        select([Candidate("a", 1, UP, 0), Candidate("a", 2, UP, 0)], current=None, now=0.0)


# --- invariants ----------------------------------------------------------------

NAMES = ("a", "b", "c", "d")


@dataclass(frozen=True)
class Scenario:
    backends: list[Candidate]
    current: str | None
    now: float
    drained: frozenset[str]
    pin: Pin | None
    failback: Failback
    preempt_delay: float

    def run(self) -> Decision:
        return select(
            self.backends,
            current=self.current,
            now=self.now,
            drained=self.drained,
            pin=self.pin,
            failback=self.failback,
            preempt_delay=self.preempt_delay,
        )


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    n = draw(st.integers(1, len(NAMES)))
    names = NAMES[:n]
    cands = [
        Candidate(
            name,
            draw(st.integers(0, 3)),
            draw(st.sampled_from(list(HealthState))),
            draw(st.floats(0, 100)),
        )
        for name in names
    ]
    failback: Failback = draw(st.sampled_from(["sticky", "preempt"]))
    return Scenario(
        backends=cands,
        current=draw(st.none() | st.sampled_from(names)),
        now=draw(st.floats(100, 200)),
        drained=draw(st.frozensets(st.sampled_from(names))),
        pin=draw(st.none() | st.builds(Pin, st.sampled_from(names), st.booleans())),
        failback=failback,
        preempt_delay=draw(st.floats(0, 150)),
    )


@given(scenarios())
def test_chosen_is_never_drained_nor_down_except_documented_cases(s: Scenario) -> None:
    d = s.run()
    cands = {c.name: c for c in s.backends}
    any_up = any(c.state is UP and n not in s.drained for n, c in cands.items())
    if d.active is None:
        assert s.current is None and not any_up
        return
    chosen = cands[d.active]
    held_by_pin = d.pin is not None and d.pin.backend == d.active
    kept_last = d.active == s.current and not d.changed
    if d.active in s.drained:
        # Only the last active backend with no selectable UP alternative.
        assert kept_last and not any_up and not held_by_pin
    if chosen.state is D:
        # The last active with nothing UP to go to, or a forced (unarmed) pin.
        forced = d.pin is not None and held_by_pin and not d.pin.armed
        assert (kept_last and not any_up) or forced
    if chosen.state is U:
        assert kept_last or held_by_pin
    if d.changed and not held_by_pin:
        assert chosen.state is UP and d.active not in s.drained
    if s.pin is not None:
        assert d.pin_dropped == (d.pin is None)
    else:
        assert d.pin is None and not d.pin_dropped


@given(scenarios())
def test_a_move_without_pin_goes_to_the_best_up_or_a_ripe_better(s: Scenario) -> None:
    d = s.run()
    if not d.changed or d.pin is not None:
        return
    up = [c for c in s.backends if c.name not in s.drained and c.state is UP]
    top = max(c.priority for c in up)
    chosen = next(c for c in up if c.name == d.active)
    if d.reason == "preempt":
        current = next(c for c in s.backends if c.name == s.current)
        assert chosen.priority > current.priority
        assert s.now >= chosen.since + s.preempt_delay
    else:
        # Best: highest priority, first in config order among those.
        assert chosen == next(c for c in up if c.priority == top)


@given(scenarios())
def test_next_check_is_in_the_future(s: Scenario) -> None:
    d = s.run()
    if d.next_check is not None:
        assert d.next_check > s.now
        assert s.failback == "preempt" and d.pin is None


# --- equally bad backends (rule 7, "no-better") ----------------------------------------


def _lossy(
    name: str, priority: int, state: HealthState, loss: float, failures: int = 0
) -> Candidate:
    return Candidate(name, priority, state, 0.0, loss, failures)


def test_a_down_active_is_not_left_for_an_equally_lossy_backend() -> None:
    backends = [_lossy("a", 100, HealthState.DOWN, 0.5, 3), _lossy("b", 50, HealthState.UP, 0.4)]
    decision = select(backends, current="a", now=10.0)
    assert decision.active == "a" and decision.reason == "no-better"
    assert not decision.changed


def test_a_down_active_goes_to_a_clean_backend_or_the_cleanest_lossy_one() -> None:
    clean = [_lossy("a", 100, HealthState.DOWN, 0.1, 3), _lossy("b", 50, HealthState.UP, 0.2)]
    assert select(clean, current="a", now=10.0).active == "b"
    # the best by priority is as lossy as a; the next one is clean: it takes over
    mixed = [
        _lossy("a", 100, HealthState.DOWN, 0.5, 3),
        _lossy("b", 50, HealthState.UP, 0.5),
        _lossy("c", 10, HealthState.UP, 0.1),
    ]
    assert select(mixed, current="a", now=10.0).active == "c"


def test_a_dead_active_is_left_even_for_a_lossy_backend() -> None:
    backends = [_lossy("a", 100, HealthState.DOWN, 0.6, 9), _lossy("b", 50, HealthState.UP, 0.5)]
    assert select(backends, current="a", now=10.0).active == "a"
    backends[0] = _lossy("a", 100, HealthState.DOWN, 0.6, 10)  # DEAD_STREAK in a row
    decision = select(backends, current="a", now=10.0)
    assert decision.active == "b" and decision.reason == "failover"
