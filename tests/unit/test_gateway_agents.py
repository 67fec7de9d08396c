"""What a gateway knows of its backends' agents, and what the controller does
with it: pure values in and out, driven synchronously (no asyncio, no fakes)."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natfail.core import agent_messages as msg
from natfail.core import agents as ag
from natfail.core import controller as ctl
from natfail.core import reload, status
from natfail.core.model import Endpoint, ProbeSettings, Service
from tests.builders import service

A, B, C = "10.0.0.2:51820", "10.0.0.3:51820", "10.0.0.4:51820"
AGENT_A = Endpoint.parse("10.0.0.2:51821")
AGENT_B = Endpoint.parse("10.0.0.3:51821")
SERVER_KEY = bytes(range(32))
K1, K2, K3 = (bytes([n]) * 32 for n in (1, 2, 3))
E1 = Endpoint.parse("198.51.100.1:40001")
E2 = Endpoint.parse("198.51.100.2:40002")
E3 = Endpoint.parse("[2001:db8::3]:40003")
WALL0 = 1_700_000_000.0
"""The gateway's wall clock at monotonic instant 0."""


# -- builders --------------------------------------------------------------------------


def wg0(*, b_agent: bool = True) -> Service:
    """a and (unless told) b run an agent; c does not."""
    svc = service("wg0", "203.0.113.10:51820", [("a", A), ("b", B), ("c", C)])
    a, b, c = svc.backends
    return replace(
        svc,
        probe=ProbeSettings(rise=2, fall=2),
        server_public_key=SERVER_KEY,
        backends=(replace(a, agent=AGENT_A), replace(b, agent=AGENT_B if b_agent else None), c),
    )


def peer(key: bytes, endpoint: Endpoint, age_ms: int) -> msg.ReportedPeer:
    return msg.ReportedPeer(key, endpoint, age_ms)


def clock_ns(at: float, skew: float = 0.0) -> int:
    """An agent's wall clock (Unix ns) at monotonic instant ``at``."""
    return round((WALL0 + at + skew) * 1e9)


def report(
    version: int, *peers: msg.ReportedPeer, at: float = 0.0, skew: float = 0.0
) -> msg.Report:
    return msg.Report(version, clock_ns(at, skew), tuple(peers), 0, 1)


def answer(version: int, *peers: msg.ReportedPeer, at: float, skew: float = 0.0) -> ag.Polled:
    return ag.Polled([report(version, *peers, at=at, skew=skew)], at, WALL0 + at)


def silence(at: float) -> ag.Polled:
    return ag.Polled(None, at, WALL0 + at)


def result(name: str, up: bool) -> ctl.Probed:
    addr = Endpoint.parse({"a": A, "b": B, "c": C}[name])
    return ctl.Probed(name, addr, up, "ok" if up else "timeout", 0.001 if up else None)


def round_of(state: ctl.ServiceState, at: float, **up: bool) -> ctl.Outcome:
    probed = tuple(result(name, ok) for name, ok in up.items())
    return ctl.observe_round(state, ctl.Round(probed, state.keys_epoch, at))


def on_a(svc: Service, **agents: ag.AgentView) -> ctl.ServiceState:
    """The service carried by a after the first choice (at 2.0)."""
    state = ctl.ServiceState.initial(svc, 0.0, agents=agents)
    state = round_of(state, 1.0, a=True, b=True, c=True).state
    outcome = round_of(state, 2.0, a=True, b=True, c=True)
    assert outcome.transaction == ctl.Transaction("wg0", "a")
    return outcome.state


def polled(state: ctl.ServiceState, backend: str, poll: ag.Polled) -> ctl.Outcome:
    return ctl.agent_polled(state, backend, poll)


def logs(outcome: ctl.Outcome) -> list[tuple[int, str]]:
    return [(e.level, e.message) for e in outcome.effects if isinstance(e, ctl.Log)]


def a_reported_two_clients(svc: Service, age_ms: int = 1000) -> ctl.ServiceState:
    """On a, whose agent reported K2 and K1 at 2.5."""
    state = on_a(svc)
    got = answer(10, peer(K2, E2, age_ms), peer(K1, E1, age_ms), at=2.5)
    return polled(state, "a", got).state


def fail_over_to_b(state: ctl.ServiceState) -> ctl.Outcome:
    """a goes down (fall = 2): the second round moves the traffic to b."""
    state = round_of(state, 3.0, a=False, b=True, c=True).state
    outcome = round_of(state, 4.0, a=False, b=True, c=True)
    assert outcome.transaction == ctl.Transaction("wg0", "b")
    return outcome


# -- observe ---------------------------------------------------------------------------


def test_a_first_report_makes_the_agent_reachable_with_its_clients() -> None:
    view = ag.observe(ag.AgentView(), answer(7, peer(K1, E1, 1500), at=50.0, skew=0.25))
    assert (view.reachable, view.answered, view.missed, view.version) == (True, True, 0, 7)
    assert view.skew == pytest.approx(0.25, abs=1e-3)
    assert view.clients == {K1: ag.Client(E1, 48.5)}  # the age became an instant
    assert view.recent(50.0) == 1


def test_every_page_of_a_report_counts_and_a_new_version_replaces_the_clients() -> None:
    pages = [
        msg.Report(7, clock_ns(10.0), (peer(K1, E1, 0),), 0, 2),
        msg.Report(7, clock_ns(10.0), (peer(K2, E2, 2000),), 1, 2),
    ]
    view = ag.observe(ag.AgentView(), ag.Polled(pages, 10.0, WALL0 + 10.0))
    assert view.clients == {K1: ag.Client(E1, 10.0), K2: ag.Client(E2, 8.0)}
    newer = ag.observe(view, answer(8, peer(K3, E3, 0), at=12.0))
    assert newer.version == 8
    assert newer.clients == {K3: ag.Client(E3, 12.0)}  # K1 and K2 are no longer reported


def test_an_unchanged_version_keeps_the_clients_and_updates_the_clock() -> None:
    first = ag.observe(ag.AgentView(), answer(7, peer(K1, E1, 0), at=10.0))
    missed = ag.observe(first, silence(12.0))
    # The agent answers "still at 7" with one empty page and its clock.
    again = ag.observe(missed, answer(7, at=14.0, skew=-2.0))
    assert again.clients == first.clients
    assert again.version == 7
    assert again.skew == pytest.approx(-2.0, abs=1e-3)
    assert (again.reachable, again.answered, again.missed) == (True, True, 0)


def test_an_agent_is_unreachable_only_after_polls_in_a_row_without_answer() -> None:
    assert ag.UNREACHABLE_AFTER == 2
    view = ag.observe(ag.AgentView(), answer(7, peer(K1, E1, 0), at=10.0))
    once = ag.observe(view, silence(12.0))
    assert (once.reachable, once.missed) == (True, 1)
    twice = ag.observe(once, silence(14.0))
    assert (twice.reachable, twice.missed, twice.answered) == (False, 2, True)
    assert twice.clients == view.clients  # what it said before it died still counts
    back = ag.observe(twice, answer(7, at=16.0))
    assert (back.reachable, back.missed) == (True, 0)


def test_an_agent_that_never_answered_is_never_reachable() -> None:
    view = ag.AgentView()
    for at in (1.0, 2.0, 3.0):
        view = ag.observe(view, silence(at))
    assert (view.reachable, view.answered, view.missed) == (False, False, 3)


# -- targets ---------------------------------------------------------------------------


def test_targets_take_each_key_once_at_its_newest_endpoint_across_backends() -> None:
    a = ag.AgentView(clients={K1: ag.Client(E1, 10.0), K2: ag.Client(E2, 30.0)})
    b = ag.AgentView(clients={K1: ag.Client(E3, 20.0), K2: ag.Client(E1, 25.0)})
    expected = (msg.Target(K1, E3), msg.Target(K2, E2))
    assert ag.targets([a, b], 40.0) == expected
    assert ag.targets([b, a], 40.0) == expected  # the order of the views does not matter


def test_targets_drop_stale_clients_and_are_sorted_by_key() -> None:
    now = 1000.0
    view = ag.AgentView(
        clients={
            K3: ag.Client(E3, now - 10.0),
            K2: ag.Client(E2, now - ag.RECENT - 1.0),  # too old: no session left
            K1: ag.Client(E1, now - ag.RECENT + 1.0),
        }
    )
    assert ag.targets([view], now) == (msg.Target(K1, E1), msg.Target(K3, E3))
    assert ag.targets([], now) == ()


def test_a_stale_newest_handshake_is_not_replaced_by_an_older_one() -> None:
    now = 1000.0
    old = ag.AgentView(clients={K1: ag.Client(E1, now - ag.RECENT - 50.0)})
    newer = ag.AgentView(clients={K1: ag.Client(E2, now - ag.RECENT - 1.0)})
    assert ag.targets([old, newer], now) == ()


# -- clock skew ------------------------------------------------------------------------


def test_skew_spread_warns_only_beyond_the_threshold_between_reachable_agents() -> None:
    def seen(skew: float | None, reachable: bool = True) -> ag.AgentView:
        return ag.AgentView(reachable=reachable, answered=True, skew=skew)

    assert ag.SKEW_WARNING == 1.0
    assert ag.skew_spread({"a": seen(0.0), "b": seen(1.0)}) is None  # not more than 1 s
    spread = ag.skew_spread({"a": seen(0.5), "b": seen(-0.8), "c": seen(0.1)})
    assert spread is not None
    low, high, seconds = spread
    assert (low, high) == ("b", "a") and seconds == pytest.approx(1.3)
    # An unreachable agent's last skew, or none at all, does not count.
    assert ag.skew_spread({"a": seen(0.0), "b": seen(9.0, reachable=False)}) is None
    assert ag.skew_spread({"a": seen(0.0), "b": seen(None)}) is None
    assert ag.skew_spread({"a": seen(5.0)}) is None


# -- persistence -----------------------------------------------------------------------


def test_clients_survive_a_dump_and_a_load_across_a_restart() -> None:
    now, wall = 500.0, WALL0 + 500.0
    views = {
        "a": ag.AgentView(
            reachable=True,
            answered=True,
            version=9,
            clients={K1: ag.Client(E1, now - 10.0), K2: ag.Client(E2, now - ag.RECENT - 5.0)},
        ),
        "b": ag.AgentView(clients={K3: ag.Client(E3, now - ag.RECENT - 1.0)}),
    }
    dumped = json.loads(json.dumps(ag.dump_clients(views, now, wall)))
    assert dumped == {"a": {K1.hex(): [str(E1), pytest.approx(wall - 10.0, abs=1e-3)]}}
    # A new process: another monotonic origin, 20 s of wall clock later.
    later_now, later_wall = 7.0, wall + 20.0
    loaded = ag.load_clients(dumped, ["a", "b", "c"], later_now, later_wall)
    assert list(loaded) == ["a"]
    view = loaded["a"]
    assert (view.reachable, view.answered, view.version, view.skew) == (False, False, 0, None)
    assert list(view.clients) == [K1]
    client = view.clients[K1]
    assert client.endpoint == E1
    assert client.handshake_at == pytest.approx(later_now - 30.0, abs=1e-3)  # 10 s + 20 s ago
    # only the backends asked for
    assert ag.load_clients(dumped, ["b"], later_now, later_wall) == {}


def test_load_clients_leaves_out_what_does_not_parse() -> None:
    now, wall = 100.0, WALL0 + 100.0
    good = [str(E1), wall - 5.0]
    garbage: list[object] = [None, [], "x", 3, {"a": ["not", "a", "dict"]}]
    for junk in garbage:
        assert ag.load_clients(junk, ["a"], now, wall) == {}
    raw: dict[str, object] = {
        "a": {
            K1.hex(): good,
            "zz" * 32: good,  # not hex
            "01" * 31: good,  # not a key's length
            K2.hex(): ["not an endpoint", wall - 5.0],
            K3.hex(): [str(E3), "yesterday"],
            "04" * 32: [str(E1)],  # not a pair
            "05" * 32: None,
            "06" * 32: 17,
            "07" * 32: [str(E1), wall - 5.0, "extra"],
            "08" * 32: [str(E1), wall - ag.RECENT - 1.0],  # too old
        },
        "b": {"09" * 32: "xy"},
    }
    loaded = ag.load_clients(raw, ["a", "b"], now, wall)
    assert list(loaded) == ["a"]
    assert list(loaded["a"].clients) == [K1]


def test_a_huge_number_in_the_clients_file_is_left_out_without_raising() -> None:
    now, wall = 100.0, WALL0 + 100.0
    huge = json.loads("1" + "0" * 400)  # what json.loads makes of a 400-digit number
    raw = {"a": {K1.hex(): [str(E1), huge]}}
    assert ag.load_clients(raw, ["a"], now, wall) == {}


def test_a_handshake_time_in_the_future_is_left_out() -> None:
    """It would never go stale."""
    now, wall = 100.0, WALL0 + 100.0
    raw = {"a": {K1.hex(): [str(E1), wall + 30.0]}}
    assert ag.load_clients(raw, ["a"], now, wall) == {}


def test_a_handshake_time_of_infinity_is_left_out() -> None:
    now, wall = 100.0, WALL0 + 100.0
    infinity = json.loads("Infinity")  # json.loads accepts it
    raw = {"a": {K1.hex(): [str(E1), infinity]}}
    assert ag.load_clients(raw, ["a"], now, wall) == {}


# -- the controller: activation on a switch --------------------------------------------


def test_initial_state_has_a_view_for_every_backend_with_an_agent() -> None:
    held = ag.AgentView(clients={K1: ag.Client(E1, 0.0)})
    state = ctl.ServiceState.initial(wg0(), 0.0, agents={"a": held, "c": held, "z": held})
    assert state.agents == {"a": held, "b": ag.AgentView()}  # c has no agent, z no backend


def test_a_failover_activates_the_new_backends_agent_after_the_cleanup() -> None:
    state = a_reported_two_clients(wg0())
    outcome = fail_over_to_b(state)
    kinds = [type(e) for e in outcome.after]
    assert kinds == [ctl.Cleanup, ctl.Activate, ctl.Switched, ctl.SaveState]
    assert outcome.after[1] == ctl.Activate(
        "wg0",
        "b",
        AGENT_B,
        SERVER_KEY,
        (msg.Target(K1, E1), msg.Target(K2, E2)),
        state.epoch + 1,
    )
    assert outcome.state.epoch == state.epoch + 1
    # nothing is activated when the firewall refuses the move
    assert not any(isinstance(e, ctl.Activate) for e in (*outcome.effects, *outcome.failed))


def test_the_first_choice_activates_nobody() -> None:
    held = ag.AgentView(clients={K1: ag.Client(E1, 1.5)})
    state = ctl.ServiceState.initial(wg0(), 0.0, agents={"a": held, "b": held})
    state = round_of(state, 1.0, a=True, b=True, c=True).state
    outcome = round_of(state, 2.0, a=True, b=True, c=True)
    assert outcome.transaction == ctl.Transaction("wg0", "a")
    assert [type(e) for e in outcome.after] == [ctl.Switched, ctl.SaveState]


def test_a_failover_to_a_backend_without_agent_activates_nobody() -> None:
    outcome = fail_over_to_b(a_reported_two_clients(wg0(b_agent=False)))
    assert [type(e) for e in outcome.after] == [ctl.Cleanup, ctl.Switched, ctl.SaveState]


@pytest.mark.parametrize(("age_ms", "activates"), [(175_000, True), (179_000, False)])
def test_a_failover_brings_over_only_recent_clients(age_ms: int, activates: bool) -> None:
    # reported at 2.5, the failover at 4.0: 179 s then is 180.5 s now
    outcome = fail_over_to_b(a_reported_two_clients(wg0(), age_ms=age_ms))
    assert any(isinstance(e, ctl.Activate) for e in outcome.after) is activates


def test_a_failover_without_any_reported_client_activates_nobody() -> None:
    state = polled(on_a(wg0()), "a", answer(10, at=2.5)).state
    assert state.agents["a"].reachable
    outcome = fail_over_to_b(state)
    assert [type(e) for e in outcome.after] == [ctl.Cleanup, ctl.Switched, ctl.SaveState]


def test_a_manual_switch_activates_too() -> None:
    state = a_reported_two_clients(wg0())
    done = ctl.command(state, ctl.Request("switch", "b"), 3.0)
    assert isinstance(done, ctl.Commanded)
    assert done.outcome.transaction == ctl.Transaction("wg0", "b")
    assert done.outcome.kept == state
    kinds = [type(e) for e in done.outcome.after]
    assert kinds == [ctl.Cleanup, ctl.Activate, ctl.Switched, ctl.SaveState]
    activate = done.outcome.after[1]
    assert isinstance(activate, ctl.Activate)
    assert (activate.backend, activate.agent) == ("b", AGENT_B)
    assert activate.targets == (msg.Target(K1, E1), msg.Target(K2, E2))


# -- the controller: polls -------------------------------------------------------------


def test_reachability_changes_are_logged_once_and_only_after_an_answer() -> None:
    state = on_a(wg0())
    for at in (3.0, 4.0, 5.0):  # an agent that never answered: no news
        outcome = polled(state, "a", silence(at))
        assert logs(outcome) == []
        state = outcome.state
    assert state.agents["a"].missed == 3
    outcome = polled(state, "a", answer(10, peer(K1, E1, 0), peer(K2, E2, 0), at=6.0))
    assert logs(outcome) == [(logging.INFO, "wg0: agent of a reachable (2 recent clients)")]
    state = outcome.state
    warned: list[tuple[int, str]] = []
    for at in (7.0, 8.0, 9.0, 10.0):
        outcome = polled(state, "a", silence(at))
        warned += logs(outcome)
        if at == 7.0:
            assert logs(outcome) == []  # one missed poll is not yet unreachable
        state = outcome.state
    assert warned == [
        (
            logging.WARNING,
            "wg0: agent of a does not answer; a switch to a leaves its clients to "
            "WireGuard's own timers (about 15 s)",
        )
    ]
    back = polled(state, "a", answer(10, at=11.0))
    assert [level for level, _ in logs(back)] == [logging.INFO]


def test_save_clients_only_when_the_clients_changed() -> None:
    state = on_a(wg0())

    def saves(outcome: ctl.Outcome) -> int:
        return sum(1 for e in outcome.effects if isinstance(e, ctl.SaveClients))

    empty = polled(state, "a", answer(9, at=3.0))
    assert saves(empty) == 0  # a report of nobody changes nothing
    first = polled(empty.state, "a", answer(10, peer(K1, E1, 0), at=4.0))
    assert saves(first) == 1
    same = polled(first.state, "a", answer(10, at=6.0))
    assert saves(same) == 0
    assert same.state.agents["a"].clients == first.state.agents["a"].clients
    silent = polled(same.state, "a", silence(8.0))
    assert saves(silent) == 0
    changed = polled(silent.state, "a", answer(11, peer(K2, E2, 0), at=10.0))
    assert saves(changed) == 1
    assert list(changed.state.agents["a"].clients) == [K2]


def test_clock_skew_between_backends_is_warned_once() -> None:
    state = on_a(wg0())
    a = polled(state, "a", answer(10, at=3.0, skew=0.0))
    assert all(level == logging.INFO for level, _ in logs(a))
    b = polled(a.state, "b", answer(20, at=3.1, skew=2.5))
    assert (
        logging.WARNING,
        "wg0: the clocks of backends a and b differ by 2.5 s; a client refuses a "
        "handshake from the one behind until it catches up (run NTP on every backend)",
    ) in logs(b)
    again = polled(b.state, "b", answer(20, at=5.1, skew=2.5))
    assert not [m for _, m in logs(again) if "clocks" in m]
    assert again.state.agents["b"].skew == pytest.approx(2.5, abs=1e-3)


def test_clocks_within_the_threshold_are_not_warned() -> None:
    state = polled(on_a(wg0()), "a", answer(10, at=3.0)).state
    b = polled(state, "b", answer(20, at=3.1, skew=0.9))
    assert not [m for _, m in logs(b) if "clocks" in m]


def test_a_poll_of_a_backend_without_agent_changes_nothing() -> None:
    state = on_a(wg0())
    outcome = polled(state, "c", answer(1, peer(K1, E1, 0), at=3.0))
    assert outcome == ctl.Outcome(state)


# -- reload ----------------------------------------------------------------------------


def heard_from_both() -> ctl.ServiceState:
    state = a_reported_two_clients(wg0())
    return polled(state, "b", answer(20, peer(K3, E3, 0), at=2.6, skew=0.1)).state


def test_a_reload_keeps_the_views_of_unchanged_backends() -> None:
    state = heard_from_both()
    svc = state.service
    c = replace(svc.backends[2], priority=5)
    plan = reload.plan({"wg0": state}, [replace(svc, backends=(*svc.backends[:2], c))], set(), 3.0)
    assert plan.states["wg0"].agents == state.agents
    assert plan.states["wg0"].agents["a"].reachable


def test_a_reload_resets_reachability_when_the_agents_endpoint_changes() -> None:
    state = heard_from_both()
    svc = state.service
    moved = replace(svc.backends[0], agent=Endpoint.parse("10.0.0.2:51999"))
    plan = reload.plan(
        {"wg0": state}, [replace(svc, backends=(moved, *svc.backends[1:]))], set(), 3.0
    )
    view = plan.states["wg0"].agents["a"]
    assert view == ag.AgentView(clients=state.agents["a"].clients)  # the clients stay
    assert plan.states["wg0"].agents["b"] == state.agents["b"]
    # the new agent has not answered: its silence is not news
    assert logs(polled(plan.states["wg0"], "a", silence(4.0))) == []


def test_a_reload_follows_renames_and_added_or_removed_agents() -> None:
    state = heard_from_both()
    a, b, c = state.service.backends
    renamed = replace(a, name="a2")
    svc = replace(
        state.service, backends=(renamed, replace(b, agent=None), replace(c, agent=AGENT_B))
    )
    plan = reload.plan({"wg0": state}, [svc], set(), 3.0)
    new = plan.states["wg0"]
    assert new.active == "a2"
    assert new.agents == {"a2": state.agents["a"], "c": ag.AgentView()}
    # a poll that was under way for b when its agent went away is dropped
    late = polled(new, "b", answer(21, peer(K1, E1, 0), at=3.5))
    assert late == ctl.Outcome(new)


# -- status ----------------------------------------------------------------------------


def test_status_shows_each_backends_agent_and_the_clock_skew_warning() -> None:
    state = on_a(wg0())
    now = 100.0
    state = replace(
        state,
        agents={
            "a": ag.AgentView(
                reachable=True,
                answered=True,
                version=3,
                skew=-0.75,
                clients={K1: ag.Client(E1, now - 5.0), K2: ag.Client(E2, now - ag.RECENT - 1)},
            ),
            "b": ag.AgentView(reachable=True, answered=True, version=4, skew=0.5),
        },
    )
    shown = status.render(
        [state],
        wall_now=WALL0 + now,
        monotonic_now=now,
        foreign={},
        activations={("wg0", "a"): {"epoch": 12, "clients": 1}},
    )
    (svc,) = shown["services"]
    agents = {b["name"]: b["agent"] for b in svc["backends"]}
    assert agents == {
        "a": {
            "address": "10.0.0.2:51821",
            "reachable": True,
            "clients": 1,  # only the recent one
            "clock_skew_ms": -750.0,
            "last_activation": {"epoch": 12, "clients": 1},
        },
        "b": {
            "address": "10.0.0.3:51821",
            "reachable": True,
            "clients": 0,
            "clock_skew_ms": 500.0,
            "last_activation": None,
        },
        "c": None,
    }
    assert svc["warnings"] == [
        "the clocks of backends a and b differ by 1.2 s: run NTP on every backend "
        "(a client refuses a handshake from the one behind)"
    ]
    json.dumps(shown)  # the contract is JSON


def test_status_has_no_skew_warning_when_the_clocks_agree() -> None:
    state = on_a(wg0())
    agents = {"a": ag.AgentView(reachable=True, skew=0.2), "b": ag.AgentView(reachable=True)}
    shown = status.render(
        [replace(state, agents=agents)], wall_now=WALL0 + 3.0, monotonic_now=3.0, foreign={}
    )
    (svc,) = shown["services"]
    assert svc["warnings"] == []
    assert svc["backends"][1]["agent"]["clock_skew_ms"] is None
    assert svc["backends"][1]["agent"]["last_activation"] is None


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.sampled_from([K1.hex(), str(E1), WALL0]),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["a", "b", K1.hex(), "x"]) | st.text(max_size=8), inner,
                      max_size=4),
    max_leaves=20,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(_JSON)
def test_load_clients_never_raises_on_any_json(raw: object) -> None:
    """What a damaged clients.json can hold; whatever comes back is recent."""
    now, wall = 100.0, WALL0 + 100.0
    views = ag.load_clients(raw, ["a", "b"], now, wall)
    for view in views.values():
        for client in view.clients.values():
            assert 0.0 <= now - client.handshake_at <= ag.RECENT
