"""The per-service controller, driven synchronously: events in, state and
effects out. No asyncio, no fakes: the outcomes themselves are checked."""

from __future__ import annotations

import logging
from dataclasses import replace

from natfail.core import controller as ctl
from natfail.core import reload
from natfail.core.health import HealthState
from natfail.core.model import Endpoint, ProbeSettings, Service
from natfail.core.ruleset import backend_mark
from natfail.core.selector import Pin
from tests.builders import service

A, B, C = "10.0.0.2:51820", "10.0.0.3:51820", "10.0.0.4:51820"


def wg0(**changes: object) -> Service:
    svc = service("wg0", "203.0.113.10:51820", [("a", A), ("b", B), ("c", C)])
    probe = ProbeSettings(rise=2, fall=2)
    return replace(svc, probe=probe, **changes)  # type: ignore[arg-type]


def result(name: str, up: bool, address: str | None = None, **kw: object) -> ctl.Probed:
    addr = Endpoint.parse(address or {"a": A, "b": B, "c": C}[name])
    return ctl.Probed(name, addr, up, "ok" if up else "timeout", 0.001 if up else None, **kw)  # type: ignore[arg-type]


def round_of(state: ctl.ServiceState, at: float, **up: bool) -> ctl.Outcome:
    probed = tuple(result(name, ok) for name, ok in up.items())
    return ctl.observe_round(state, ctl.Round(probed, state.keys_epoch, at))


def commit(outcome: ctl.Outcome, ok: bool = True) -> ctl.ServiceState:
    if outcome.transaction is None or ok:
        return outcome.state
    assert outcome.kept is not None
    return outcome.kept


def on_a() -> ctl.ServiceState:
    state = ctl.ServiceState.initial(wg0(), 0.0)
    state = commit(round_of(state, 1.0, a=True, b=True, c=True))
    outcome = round_of(state, 2.0, a=True, b=True, c=True)
    assert outcome.transaction == ctl.Transaction("wg0", "a")
    return commit(outcome)


def test_the_first_choice_is_one_transaction_then_a_record_and_no_cleanup() -> None:
    state = ctl.ServiceState.initial(wg0(), 0.0)
    first = round_of(state, 1.0, a=True, b=True, c=True)
    assert first.transaction is None  # rise = 2: no verdict yet
    second = round_of(first.state, 2.0, a=True, b=True, c=True)
    assert second.transaction == ctl.Transaction("wg0", "a")
    assert [type(e) for e in second.after] == [ctl.Switched, ctl.SaveState]
    assert second.state.active == "a" and second.state.failovers == 0
    assert second.kept is not None and second.kept.active is None


def test_a_failover_cleans_the_old_backend_only_after_the_transaction() -> None:
    state = on_a()
    state = commit(round_of(state, 3.0, a=False, b=True, c=True))
    outcome = round_of(state, 4.0, a=False, b=True, c=True)
    assert outcome.transaction == ctl.Transaction("wg0", "b")
    assert ctl.Cleanup("wg0", "a", backend_mark("wg0", "a"), Endpoint.parse(A)) == outcome.after[0]
    assert not any(isinstance(e, ctl.Cleanup) for e in outcome.effects)
    switched = outcome.after[1]
    assert isinstance(switched, ctl.Switched)
    assert (switched.previous, switched.active, switched.reason) == ("a", "b", "failover")
    assert outcome.state.failovers == 1
    logs = [e.message for e in outcome.effects if isinstance(e, ctl.Log)]
    assert "wg0: backend a is down (timeout)" in logs


def test_a_refused_transaction_keeps_the_old_backend_and_the_new_health() -> None:
    state = on_a()
    state = commit(round_of(state, 3.0, a=False, b=True, c=True))
    outcome = round_of(state, 4.0, a=False, b=True, c=True)
    kept = commit(outcome, ok=False)
    assert kept.active == "a"
    assert kept.health["a"].state is HealthState.DOWN
    # and the next round tries again
    assert round_of(kept, 5.0, a=False, b=True, c=True).transaction == ctl.Transaction("wg0", "b")


def test_a_standby_that_goes_down_loses_its_flows() -> None:
    state = on_a()
    state = commit(round_of(state, 3.0, a=True, b=False, c=True))
    outcome = round_of(state, 4.0, a=True, b=False, c=True)
    assert outcome.transaction is None
    cleanups = [e for e in outcome.effects if isinstance(e, ctl.Cleanup)]
    assert [c.backend for c in cleanups] == ["b"]
    # only once: the next round of a down standby cleans nothing
    again = round_of(outcome.state, 5.0, a=True, b=False, c=True)
    assert not any(isinstance(e, ctl.Cleanup) for e in again.effects)


def test_all_down_is_logged_once_and_traffic_stays() -> None:
    state = on_a()
    for at in (3.0, 4.0):
        outcome = round_of(state, at, a=False, b=False, c=False)
        state = commit(outcome)
    assert state.active == "a" and state.no_healthy
    assert outcome.transaction is None
    errors = [e for e in outcome.effects if isinstance(e, ctl.Log) and e.level == logging.ERROR]
    assert errors == [ctl.Log(logging.ERROR, "wg0: no healthy backend; traffic stays on a")]
    later = round_of(state, 5.0, a=False, b=False, c=False)
    assert not [e for e in later.effects if isinstance(e, ctl.Log) and e.level == logging.ERROR]


def test_a_probe_of_an_old_address_or_old_keys_is_not_counted() -> None:
    """The reload race: a probe sent to a's old address, or with the old keys,
    comes back after the reload and must not count for the new one."""
    state = on_a()
    moved = replace(
        state,
        service=wg0(
            backends=(
                replace(state.service.backends[0], address=Endpoint.parse("10.0.0.9:51820")),
                *state.service.backends[1:],
            )
        ),
    )
    old_address = ctl.Round((result("a", False, A), result("b", True)), moved.keys_epoch, 3.0)
    outcome = ctl.observe_round(moved, old_address)
    assert outcome.state.health["a"] == moved.health["a"]
    assert outcome.state.health["b"].successes == moved.health["b"].successes + 1
    new_keys = replace(state, keys_epoch=state.keys_epoch + 1)
    stale = ctl.Round((result("a", False),), state.keys_epoch, 3.0)
    assert ctl.observe_round(new_keys, stale).state.health == new_keys.health


def test_a_local_error_is_reported_and_never_counted() -> None:
    state = on_a()
    probed = (result("a", False, local=True),)
    outcome = ctl.observe_round(state, ctl.Round(probed, state.keys_epoch, 3.0))
    assert outcome.state.health == state.health
    assert outcome.effects == (ctl.LocalProbeError("wg0", "a", "timeout"),)


def test_switch_pins_and_a_refused_firewall_puts_everything_back() -> None:
    state = on_a()
    done = ctl.command(state, ctl.Request("switch", "c"), 3.0)
    assert isinstance(done, ctl.Commanded)
    assert done.outcome.transaction == ctl.Transaction("wg0", "c")
    assert done.outcome.state.pin == Pin("c")
    assert done.outcome.kept == state  # nothing left to happen later
    assert done.message == "wg0: switched to c, pinned until it fails or release"


def test_commands_refuse_what_cannot_be() -> None:
    state = on_a()
    drained = ctl.command(state, ctl.Request("drain", "b"), 3.0)
    assert isinstance(drained, ctl.Commanded)
    assert ctl.SaveState() in drained.outcome.effects
    assert drained.outcome.state.drained == {"b"}
    refused = ctl.command(drained.outcome.state, ctl.Request("switch", "b"), 3.0)
    assert refused == ctl.Refused("wg0: backend b is drained (undrain it first)")
    assert ctl.command(state, ctl.Request("switch", "z"), 3.0) == ctl.Refused(
        "service wg0 has no backend 'z' (a, b, c)"
    )
    forced = ctl.command(state, ctl.Request("switch", "b", force="false"), 3.0)
    assert isinstance(forced, ctl.Refused) and forced.usage
    released = ctl.command(state, ctl.Request("release"), 3.0)
    assert isinstance(released, ctl.Commanded) and released.message == "wg0: not pinned"


def test_a_down_backend_needs_force() -> None:
    state = on_a()
    state = commit(round_of(state, 3.0, a=True, b=False, c=True))
    state = commit(round_of(state, 4.0, a=True, b=False, c=True))
    refused = ctl.command(state, ctl.Request("switch", "b"), 5.0)
    assert refused == ctl.Refused("wg0: backend b is down; use --force to switch anyway")
    forced = ctl.command(state, ctl.Request("switch", "b", force=True), 5.0)
    assert isinstance(forced, ctl.Commanded)
    assert forced.outcome.state.pin == Pin("b", armed=False)


def test_drain_of_the_active_moves_traffic() -> None:
    done = ctl.command(on_a(), ctl.Request("drain", "a"), 3.0)
    assert isinstance(done, ctl.Commanded)
    assert done.outcome.transaction == ctl.Transaction("wg0", "b")
    switched = [e for e in done.outcome.after if isinstance(e, ctl.Switched)]
    assert switched[0].reason == "drain"


def test_start_up_cleans_every_backend_but_the_adopted_one() -> None:
    state = ctl.ServiceState.initial(wg0(), 0.0, active="b", drained=frozenset({"z", "c"}))
    assert state.drained == {"c"}  # unknown names are pruned
    assert [c.backend for c in ctl.stray_cleanups(state)] == ["a", "c"]
    assert ctl.stray_cleanups(ctl.ServiceState.initial(wg0(), 0.0)) == []


# -- reload planning -------------------------------------------------------------------


def test_a_reload_moving_the_active_backend_switches_in_the_same_plan() -> None:
    state = on_a()
    without_a = wg0(backends=state.service.backends[1:])
    plan = reload.plan({"wg0": state}, [without_a], set(), 3.0)
    new = plan.states["wg0"]
    assert new.active == "b"  # never nothing
    assert [c.backend for c in plan.cleanups] == ["a"]
    assert [(s.previous, s.active) for s in plan.switched] == [("a", "b")]
    assert new.health["b"] == state.health["b"]  # unchanged backends keep theirs


def test_a_reload_keeps_a_renamed_backend_active_and_resets_changed_keys() -> None:
    state = on_a()
    renamed = wg0(
        backends=(replace(state.service.backends[0], name="a2"), *state.service.backends[1:])
    )
    plan = reload.plan({"wg0": state}, [renamed], {"wg0"}, 3.0)
    new = plan.states["wg0"]
    assert new.active == "a2" and not plan.cleanups and not plan.switched
    assert new.keys_epoch == state.keys_epoch + 1
    assert all(h.state is HealthState.UNKNOWN for h in new.health.values())


def test_a_reload_adds_and_removes_services() -> None:
    state = on_a()
    wg1 = replace(wg0(), name="wg1", public=Endpoint.parse("203.0.113.11:51820"))
    plan = reload.plan({"wg0": state}, [wg1], set(), 3.0)
    assert plan.added == ("wg1",) and plan.removed == ("wg0",)
    assert [c.backend for c in plan.cleanups] == ["a"]
    assert plan.states["wg1"].active is None
