"""A gateway pair (DESIGN.md "A gateway pair"), the pure core: a follower
installs what the agents recorded, a decider records every choice with an
epoch above all it saw, roles change hands; plus the epoch in the state file,
``[daemon] pair`` in the config and the role in the status. Driven
synchronously: events in, state and effects out."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from natfail.config import ConfigError, parse
from natfail.core import agent_messages as msg
from natfail.core import agents as ag
from natfail.core import controller as ctl
from natfail.core import saved, status
from natfail.core.health import HealthState
from natfail.core.model import Endpoint, ProbeSettings, Service
from tests.builders import service

A, B, C = "10.0.0.2:51820", "10.0.0.3:51820", "10.0.0.4:51820"
ADDRESS = {"a": A, "b": B, "c": C}
AGENT = {n: Endpoint.parse(f"10.0.0.{i}:51821") for n, i in (("a", 2), ("b", 3), ("c", 4))}
SERVER_KEY = bytes(range(32))
K1 = bytes([1]) * 32
E1 = Endpoint.parse("198.51.100.1:40001")
WALL0 = 1_700_000_000.0


# -- builders --------------------------------------------------------------------------


def wg0() -> Service:
    """Three backends, priorities a > b > c, each with an agent (pair mode needs one)."""
    svc = service("wg0", "203.0.113.10:51820", [("a", A), ("b", B), ("c", C)])
    return replace(
        svc,
        probe=ProbeSettings(rise=2, fall=2),
        server_public_key=SERVER_KEY,
        backends=tuple(replace(b, agent=AGENT[b.name]) for b in svc.backends),
    )


def fresh(role: ctl.Role, svc: Service | None = None) -> ctl.ServiceState:
    """A state just started in ``role``."""
    return ctl.ServiceState.initial(svc or wg0(), 0.0, role=role)


def commit(outcome: ctl.Outcome, ok: bool = True) -> ctl.ServiceState:
    if outcome.transaction is None or ok:
        return outcome.state
    assert outcome.kept is not None
    return outcome.kept


def result(name: str, up: bool) -> ctl.Probed:
    return ctl.Probed(
        name, Endpoint.parse(ADDRESS[name]), up, "ok" if up else "timeout", 0.001 if up else None
    )


def round_of(state: ctl.ServiceState, at: float, **up: bool) -> ctl.Outcome:
    probed = tuple(result(name, ok) for name, ok in up.items())
    return ctl.observe_round(state, ctl.Round(probed, state.keys_epoch, at))


def report(epoch: int, at: float, *peers: msg.ReportedPeer, version: int = 1) -> ag.Polled:
    clock = round((WALL0 + at) * 1e9)
    return ag.Polled([msg.Report(version, clock, tuple(peers), 0, 1, epoch)], at, WALL0 + at)


def sweep(state: ctl.ServiceState, at: float, **epochs: int | None) -> ctl.Outcome:
    """One sweep of polls: each named agent reports its epoch (None: no
    answer), then :func:`ctl.agents_polled`."""
    for name, epoch in epochs.items():
        polled = report(epoch, at) if epoch is not None else ag.Polled(None, at, WALL0 + at)
        state = ctl.agent_polled(state, name, polled).state
    return ctl.agents_polled(state, at)


def with_epochs(state: ctl.ServiceState, **epochs: int) -> ctl.ServiceState:
    """The agents' views, as if reachable agents had reported these epochs."""
    agents = dict(state.agents)
    for name, epoch in epochs.items():
        agents[name] = replace(agents[name], reachable=True, answered=True, epoch=epoch)
    return replace(state, agents=agents)


def every(outcome: ctl.Outcome) -> tuple[ctl.Effect, ...]:
    return (*outcome.effects, *outcome.after, *outcome.failed)


def activations(outcome: ctl.Outcome) -> list[ctl.Activate]:
    return [e for e in every(outcome) if isinstance(e, ctl.Activate)]


def warnings(outcome: ctl.Outcome) -> list[str]:
    return [e.message for e in every(outcome) if isinstance(e, ctl.Log) and e.level >= 30]


def empty_activate(backend: str, epoch: int) -> ctl.Activate:
    return ctl.Activate("wg0", backend, AGENT[backend], SERVER_KEY, (), epoch)


def switched(previous: str | None, active: str, reason: str) -> ctl.Switched:
    return ctl.Switched("wg0", previous, active, reason, Endpoint.parse(ADDRESS[active]))


def decider_on_a() -> ctl.ServiceState:
    """A pair's decider that chose a (nothing was recorded), epoch 1."""
    state = fresh("decide")
    state = commit(round_of(state, 1.0, a=True, b=True, c=True))
    state = commit(round_of(state, 2.0, a=True, b=True, c=True))
    outcome = sweep(state, 2.5, a=0, b=0, c=0)
    assert outcome.transaction == ctl.Transaction("wg0", "a")
    state = commit(outcome)
    state = commit(sweep(state, 3.0, a=1, b=0, c=0))  # a's agent got the record
    assert (state.active, state.epoch) == ("a", 1)
    return state


def follower_on_b() -> ctl.ServiceState:
    """A follower that installed b, recorded at epoch 3, with every probe up."""
    state = fresh("follow")
    state = commit(round_of(state, 1.0, a=True, b=True, c=True))
    state = commit(round_of(state, 2.0, a=True, b=True, c=True))
    outcome = sweep(state, 2.5, a=1, b=3, c=0)
    assert outcome.transaction == ctl.Transaction("wg0", "b")
    state = commit(outcome)
    assert (state.active, state.epoch) == ("b", 3)
    return state


# -- a follower ------------------------------------------------------------------------


def test_a_follower_installs_the_recorded_backend_without_activating_it() -> None:
    state = fresh("follow")
    outcome = sweep(state, 1.0, a=1, b=3, c=2)  # b holds the highest epoch
    assert outcome.transaction == ctl.Transaction("wg0", "b")
    assert outcome.after == (switched(None, "b", "follow"), ctl.SaveState())
    assert outcome.state.active == "b" and outcome.state.epoch == 3
    assert outcome.kept is not None and outcome.kept.active is None
    assert activations(outcome) == []
    # The decider moved on to c: the follower moves too, and forgets b's flows.
    outcome = sweep(commit(outcome), 2.0, a=1, b=3, c=4)
    assert outcome.transaction == ctl.Transaction("wg0", "c")
    assert outcome.after == (
        ctl.Cleanup.of(wg0(), wg0().backends[1]),
        switched("b", "c", "follow"),
        ctl.SaveState(),
    )
    assert outcome.state.epoch == 4 and outcome.state.failovers == 1
    assert activations(outcome) == []
    # The same record again: nothing to do.
    again = sweep(commit(outcome), 3.0, a=1, b=3, c=4)
    assert again.transaction is None and every(again) == ()


def test_a_follower_does_nothing_while_nothing_is_recorded() -> None:
    state = fresh("follow")
    for at in (1.0, 2.0, 3.0):
        outcome = round_of(state, at, a=True, b=True, c=True)
        assert outcome.transaction is None  # every probe is up: still no choice of its own
        state = commit(outcome)
        outcome = sweep(state, at + 0.5, a=0, b=0, c=None)
        assert outcome.transaction is None and every(outcome) == ()
        state = commit(outcome)
    assert state.active is None and state.epoch == 0
    assert state.health["a"].state is HealthState.UP


def test_a_follower_never_moves_traffic_on_its_own_probes() -> None:
    state = follower_on_b()
    for at in (3.0, 4.0, 5.0, 6.0):
        outcome = round_of(state, at, a=True, b=False, c=True)
        assert outcome.transaction is None
        assert activations(outcome) == []
        state = commit(outcome)
        outcome = sweep(state, at + 0.5, a=1, b=3, c=0)
        assert outcome.transaction is None
        state = commit(outcome)
    assert state.health["b"].state is HealthState.DOWN
    assert state.active == "b"


@pytest.mark.parametrize(
    "request_",
    [
        ctl.Request("switch", "a"),
        ctl.Request("switch", "c", force=True),
        ctl.Request("release"),
        ctl.Request("drain", "b"),
        ctl.Request("undrain", "b"),
    ],
    ids=["switch", "switch-force", "release", "drain", "undrain"],
)
def test_a_follower_refuses_operator_commands(request_: ctl.Request) -> None:
    state = follower_on_b()
    answer = ctl.command(state, request_, 5.0)
    assert isinstance(answer, ctl.Refused)
    assert "follows the other one" in answer.message and "203.0.113.10" in answer.message
    assert not answer.usage
    # The same command on a decider is carried out.
    decider = replace(state, role="decide")
    assert isinstance(ctl.command(decider, request_, 5.0), ctl.Commanded)


# -- a decider's choices ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("own", "agent_epochs", "expected"),
    [
        (1, {"a": 1, "b": 0, "c": 0}, 2),
        (9, {"a": 1, "b": 0, "c": 0}, 10),  # its own epoch is the highest
        (1, {"a": 1, "b": 0, "c": 7}, 8),  # an agent's is
        (5, {"a": 0, "b": 6, "c": 2}, 7),  # the new backend's own agent's is
    ],
)
def test_a_deciders_failover_records_an_epoch_above_every_epoch_seen(
    own: int, agent_epochs: dict[str, int], expected: int
) -> None:
    state = with_epochs(replace(decider_on_a(), epoch=own), **agent_epochs)
    state = commit(round_of(state, 4.0, a=False, b=True, c=True))
    outcome = round_of(state, 5.0, a=False, b=True, c=True)
    assert outcome.transaction == ctl.Transaction("wg0", "b")
    assert outcome.state.epoch == expected
    # Nobody to bring over, and still an activation: the record for the other gateway.
    assert outcome.after == (
        ctl.Cleanup.of(wg0(), wg0().backends[0]),
        empty_activate("b", expected),
        switched("a", "b", "failover"),
        ctl.SaveState(),
    )
    assert activations(replace(outcome, after=())) == []  # nothing before the transaction
    # refused by the firewall: the epoch stays what it was
    assert commit(outcome, ok=False).epoch == own


def test_a_deciders_failover_brings_the_clients_over_with_the_epoch() -> None:
    state = decider_on_a()
    state = commit(
        ctl.agent_polled(state, "a", report(1, 3.5, msg.ReportedPeer(K1, E1, 500), version=2))
    )
    state = commit(round_of(state, 4.0, a=False, b=True, c=True))
    outcome = round_of(state, 5.0, a=False, b=True, c=True)
    (activate,) = activations(outcome)
    assert activate.targets == (msg.Target(K1, E1),) and activate.epoch == 2


def test_a_single_gateway_activates_only_to_bring_clients_over() -> None:
    """The contrast: role "single" records nothing (no clients, no Activate)."""
    state = replace(decider_on_a(), role="single")
    state = commit(round_of(state, 4.0, a=False, b=True, c=True))
    outcome = round_of(state, 5.0, a=False, b=True, c=True)
    assert outcome.transaction == ctl.Transaction("wg0", "b")
    assert activations(outcome) == []


def test_a_pair_decider_makes_no_first_choice_before_its_first_sweep() -> None:
    state = fresh("decide")
    for at in (1.0, 2.0, 3.0, 4.0):
        outcome = round_of(state, at, a=True, b=True, c=True)
        assert outcome.transaction is None
        state = commit(outcome)
    assert state.active is None and not state.polled
    assert state.health["a"].state is HealthState.UP
    # A single gateway with the same rounds has chosen long ago.
    single = fresh("single")
    single = commit(round_of(single, 1.0, a=True, b=True, c=True))
    assert round_of(single, 2.0, a=True, b=True, c=True).transaction is not None


def test_after_its_first_sweep_a_pair_decider_adopts_the_recorded_backend() -> None:
    state = fresh("decide")
    state = commit(round_of(state, 1.0, a=True, b=True, c=True))
    state = commit(round_of(state, 2.0, a=True, b=True, c=True))
    outcome = sweep(state, 2.5, a=2, b=0, c=5)
    assert outcome.transaction == ctl.Transaction("wg0", "c")  # not a, the best by priority
    assert outcome.after == (switched(None, "c", "adopted"), ctl.SaveState())
    assert activations(outcome) == []
    assert outcome.state.epoch == 5 and outcome.state.polled
    assert outcome.kept is not None and outcome.kept.polled and outcome.kept.active is None
    # adopted and healthy: it stays, and nothing is recorded again
    state = commit(outcome)
    later = round_of(state, 3.0, a=True, b=True, c=True)
    assert later.transaction is None
    assert every(sweep(commit(later), 3.5, a=2, b=0, c=5)) == ()


def test_after_its_first_sweep_with_nothing_recorded_a_pair_decider_chooses_by_priority() -> None:
    state = fresh("decide")
    state = commit(round_of(state, 1.0, a=True, b=True, c=True))
    state = commit(round_of(state, 2.0, b=True, c=True, a=True))
    outcome = sweep(state, 2.5, a=0, b=0, c=0)
    assert outcome.transaction == ctl.Transaction("wg0", "a")
    # even the first choice is recorded (with nobody to bring over)
    assert outcome.after == (
        empty_activate("a", 1),
        switched(None, "a", "initial"),
        ctl.SaveState(),
    )
    assert outcome.state.epoch == 1


def test_a_sweep_before_any_verdict_lets_the_next_round_choose() -> None:
    state = fresh("decide")
    state = commit(sweep(state, 0.5, a=0, b=0, c=0))  # nothing recorded, nothing UP yet
    assert state.polled and state.active is None
    state = commit(round_of(state, 1.0, a=True, b=True, c=True))
    outcome = round_of(state, 2.0, a=True, b=True, c=True)
    assert outcome.transaction == ctl.Transaction("wg0", "a")
    assert activations(outcome) == [empty_activate("a", 1)]


# -- a decider's sweeps ----------------------------------------------------------------


def test_a_decider_records_again_what_a_restarted_agent_lost() -> None:
    state = decider_on_a()
    outcome = sweep(state, 4.0, a=0, b=0, c=0)  # a's agent restarted: it holds nothing
    assert outcome.transaction is None
    assert outcome.effects == (empty_activate("a", 1),)  # the same epoch, again
    assert warnings(outcome) == []
    state = commit(outcome)
    assert state.epoch == 1
    # recorded: quiet again
    assert every(sweep(state, 5.0, a=1, b=0, c=0)) == ()


def test_a_restarted_agent_after_a_failover_is_no_second_decider() -> None:
    state = decider_on_a()
    state = commit(round_of(state, 4.0, a=False, b=True, c=True))
    state = commit(round_of(state, 5.0, a=False, b=True, c=True))
    state = commit(sweep(state, 5.5, a=1, b=2, c=0))
    assert (state.active, state.epoch) == ("b", 2)
    # b's agent restarts; a's still holds its old record (epoch 1 < 2)
    outcome = sweep(state, 6.0, a=1, b=0, c=0)
    assert [e.backend for e in activations(outcome)] == ["b"]
    assert warnings(outcome) == []
    assert outcome.state.epoch == 2


def test_a_decider_follows_a_newer_activation_of_a_backend_it_sees_up() -> None:
    state = decider_on_a()
    outcome = sweep(state, 4.0, a=1, b=5, c=0)  # another gateway activated b at 5
    assert outcome.transaction == ctl.Transaction("wg0", "b")  # the highest wins
    (warning,) = warnings(outcome)
    assert "another gateway activated backend b (epoch 5)" in warning
    assert "following it" in warning
    assert (logging.WARNING, warning) in [
        (e.level, e.message) for e in outcome.effects if isinstance(e, ctl.Log)
    ]
    assert activations(outcome) == []  # installs the record, records nothing
    assert switched("a", "b", "adopted") in every(outcome)
    assert outcome.state.epoch == 5


def test_a_decider_outbid_for_a_backend_it_sees_down_records_a_new_higher_epoch() -> None:
    state = decider_on_a()
    state = commit(round_of(state, 3.5, a=True, b=False, c=True))
    state = commit(round_of(state, 3.8, a=True, b=False, c=True))
    assert state.health["b"].state is HealthState.DOWN
    outcome = sweep(state, 4.0, a=1, b=5, c=0)
    assert outcome.transaction is None  # this decider keeps its choice...
    (warning,) = warnings(outcome)
    assert "another gateway activated backend b (epoch 5)" in warning
    assert "not up from here" in warning
    assert activations(outcome) == [empty_activate("a", 6)]  # ...and records it above
    assert outcome.state.epoch == 6


def test_a_decider_does_nothing_while_its_active_backends_agent_is_unreachable() -> None:
    state = decider_on_a()
    agents = dict(state.agents)
    agents["a"] = ag.AgentView(reachable=False, answered=True, missed=2, epoch=0)
    agents["b"] = replace(agents["b"], reachable=True, answered=True, epoch=5)
    outcome = ctl.agents_polled(replace(state, agents=agents), 4.0)
    assert outcome.transaction is None and every(outcome) == ()
    assert outcome.state.epoch == 1 and outcome.state.active == "a"
    # driven by real polls: a silent twice (unreachable), restarted c says 0
    state = commit(sweep(state, 4.0, a=None, b=0, c=0))
    outcome = sweep(state, 5.0, a=None, b=0, c=0)
    assert not outcome.state.agents["a"].reachable
    assert every(outcome) == ()


# -- roles change hands ----------------------------------------------------------------


def test_a_takeover_keeps_the_active_backend_and_gives_it_a_fresh_verdict() -> None:
    state = follower_on_b()
    for at in (3.0, 4.0):  # this gateway's own path to b is cut
        state = commit(round_of(state, at, a=True, b=False, c=True))
    assert state.health["b"].state is HealthState.DOWN
    # without the reset, the stale DOWN would move the traffic at once
    assert ctl.decide(replace(state, role="decide"), 5.0).transaction is not None
    outcome = ctl.set_role(state, "decide", 5.0)
    assert outcome.transaction is None
    assert outcome.effects[0] == ctl.Log(
        logging.WARNING, "wg0: this gateway now decides; keeping backend b"
    )
    assert outcome.state.role == "decide" and outcome.state.active == "b"
    assert outcome.state.health["b"].state is HealthState.UNKNOWN
    assert outcome.state.health["b"].since == 5.0
    assert outcome.state.health["a"] == state.health["a"]  # the others keep theirs
    # b answers now: it stays (sticky), though a has the higher priority
    taken = commit(outcome)
    for at in (6.0, 7.0, 8.0):
        later = round_of(taken, at, a=True, b=True, c=True)
        assert later.transaction is None
        taken = commit(later)
    assert taken.health["b"].state is HealthState.UP


def test_a_takeover_moves_the_traffic_once_the_fresh_verdict_is_down() -> None:
    state = commit(ctl.set_role(follower_on_b(), "decide", 5.0))
    state = commit(round_of(state, 6.0, a=True, b=False, c=True))
    outcome = round_of(state, 7.0, a=True, b=False, c=True)
    assert outcome.transaction == ctl.Transaction("wg0", "a")
    assert activations(outcome) == [empty_activate("a", 4)]  # above b's recorded 3


def test_a_takeover_with_nothing_active_logs_and_waits_for_the_sweep() -> None:
    state = fresh("follow")
    state = commit(round_of(state, 1.0, a=True, b=True, c=True))
    state = commit(round_of(state, 2.0, a=True, b=True, c=True))
    outcome = ctl.set_role(state, "decide", 3.0)
    assert outcome.effects == (ctl.Log(logging.WARNING, "wg0: this gateway now decides"),)
    assert outcome.transaction is None


def test_losing_the_address_makes_a_decider_follow_the_record() -> None:
    state = decider_on_a()
    state = with_epochs(state, a=1, b=2, c=0)  # the other gateway took over, chose b
    outcome = ctl.set_role(state, "follow", 4.0)
    assert outcome.effects[0] == ctl.Log(
        logging.WARNING, "wg0: this gateway now follows the other one"
    )
    assert outcome.transaction == ctl.Transaction("wg0", "b")
    assert switched("a", "b", "follow") in outcome.after
    assert activations(outcome) == []
    assert outcome.state.role == "follow" and outcome.state.epoch == 2
    # the same role again changes nothing
    same = ctl.set_role(commit(outcome), "follow", 5.0)
    assert same.transaction is None and same.effects == ()


def test_losing_the_address_while_the_record_is_ours_moves_nothing() -> None:
    outcome = ctl.set_role(decider_on_a(), "follow", 4.0)
    assert outcome.transaction is None
    assert [type(e) for e in outcome.effects] == [ctl.Log]


def test_the_backup_rebooted_on_a_non_preferred_backend_then_the_master_dies() -> None:
    """The master sits on b (a was down once; sticky). The backup reboots:
    fresh, no rule, nothing saved. It must install b, not its own best (a),
    and when the master dies it must keep b: the clients stay put."""
    backup = fresh("follow")
    backup = commit(round_of(backup, 1.0, a=True, b=True, c=True))
    backup = commit(round_of(backup, 2.0, a=True, b=True, c=True))
    assert backup.active is None  # all up, and still its own choice is none
    outcome = sweep(backup, 2.5, a=1, b=2, c=0)
    assert outcome.transaction == ctl.Transaction("wg0", "b")
    assert outcome.after == (switched(None, "b", "follow"), ctl.SaveState())
    backup = commit(outcome)
    # the master dies: keepalived moves the address here
    outcome = ctl.set_role(backup, "decide", 3.0)
    assert outcome.transaction is None
    backup = commit(outcome)
    for at in (4.0, 5.0, 6.0, 7.0):
        later = round_of(backup, at, a=True, b=True, c=True)
        assert later.transaction is None
        backup = commit(later)
        polled = sweep(backup, at + 0.5, a=1, b=2, c=0)
        assert polled.transaction is None and activations(polled) == []
        backup = commit(polled)
    assert backup.active == "b" and backup.role == "decide" and backup.epoch == 2
    assert backup.failovers == 0


# -- two deciders at once --------------------------------------------------------------


def test_two_deciders_that_chose_the_same_backend_agree_quietly() -> None:
    one, two = decider_on_a(), decider_on_a()
    # both recorded a at 1: a's agent holds 1
    one_after = sweep(one, 4.0, a=1, b=0, c=0)
    two_after = sweep(two, 4.0, a=1, b=0, c=0)
    assert every(one_after) == () and every(two_after) == ()


def test_two_deciders_with_different_choices_converge_on_one_backend() -> None:
    one = decider_on_a()  # chose a, recorded at 1
    two = fresh("decide")  # its path to a was down: chose b
    two = commit(round_of(two, 1.0, a=False, b=True, c=True))
    two = commit(round_of(two, 2.0, a=False, b=True, c=True))
    two = commit(sweep(two, 2.5, a=0, b=0, c=0))
    assert (two.active, two.epoch) == ("b", 1)
    agents = {"a": 1, "b": 1, "c": 0}  # what the agents hold
    for step in range(6):
        at = 4.0 + step
        for name in ("one", "two"):
            state = one if name == "one" else two
            outcome = sweep(state, at, **agents)
            for activate in activations(outcome):
                agents[activate.backend] = max(agents[activate.backend], activate.epoch)
            state = commit(outcome)
            if name == "one":
                one = state
            else:
                two = state
    assert one.active == two.active
    assert every(sweep(one, 20.0, **agents)) == ()
    assert every(sweep(two, 20.0, **agents)) == ()


# -- start-up, the state file, the config, the status ----------------------------------


def test_the_initial_state_takes_its_role_and_saved_epoch() -> None:
    state = ctl.ServiceState.initial(wg0(), 0.0, role="follow", epoch=7)
    assert (state.role, state.epoch) == ("follow", 7)


def test_the_epoch_survives_the_state_file() -> None:
    state = replace(decider_on_a(), epoch=41)
    loaded = saved.load(saved.dump([state]))
    assert loaded["wg0"]["epoch"] == 41
    assert saved.wishes(loaded["wg0"], wg0()).epoch == 41


@pytest.mark.parametrize(
    "raw", [-1, 2**64, "7", 7.0, True, None, [7]], ids=lambda r: f"epoch={r!r}"
)
def test_a_bad_saved_epoch_loads_as_zero(raw: object) -> None:
    state = replace(decider_on_a(), epoch=3)
    data = json.loads(saved.dump([state]))
    data["services"]["wg0"]["epoch"] = raw
    loaded = saved.load(json.dumps(data).encode())
    wishes = saved.wishes(loaded["wg0"], wg0())
    assert wishes.epoch == 0
    assert wishes.drained == frozenset()  # the rest still loads


def test_a_state_file_without_an_epoch_loads_as_zero() -> None:
    loaded = saved.load(b'{"version": 1, "services": {"wg0": {"pin": null, "drained": ["b"]}}}')
    wishes = saved.wishes(loaded["wg0"], wg0())
    assert wishes.epoch == 0 and wishes.drained == frozenset({"b"})


KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="

PAIR_DOC = f"""\
[daemon]
pair = true

[[service]]
name = "wg0"
public = "203.0.113.10:51820"
server_public_key = "{KEY}"

[[service.backend]]
name = "a"
address = "10.0.0.2:51820"
priority = 100
agent = "10.0.0.2:51821"

[[service.backend]]
name = "b"
address = "10.0.0.3:51820"
priority = 50
agent = "10.0.0.3:51821"
"""


def test_pair_true_with_an_agent_on_every_backend_is_accepted() -> None:
    config = parse(PAIR_DOC, Path("x.toml"))
    assert config.daemon.pair is True
    assert [str(b.agent) for b in config.services[0].backends] == [
        "10.0.0.2:51821",
        "10.0.0.3:51821",
    ]
    assert (
        parse(PAIR_DOC.replace("pair = true", "pair = false"), Path("x.toml")).daemon.pair is False
    )
    assert parse(PAIR_DOC.replace("pair = true", ""), Path("x.toml")).daemon.pair is False


def test_pair_true_without_an_agent_is_refused_at_that_backend() -> None:
    doc = PAIR_DOC.replace('agent = "10.0.0.3:51821"\n', "")
    with pytest.raises(ConfigError) as info:
        parse(doc, Path("x.toml"))
    err = info.value
    assert err.key == "service[0].backend[1].agent"
    assert "pair = true needs an agent on every backend" in err.message
    headers = [n for n, line in enumerate(doc.split("\n"), 1) if line == "[[service.backend]]"]
    assert err.line == headers[1]  # the second backend's table
    # without pair mode the same backends are fine
    assert parse(doc.replace("pair = true", "pair = false"), Path("x.toml")).daemon.pair is False


@pytest.mark.parametrize("value", ['"yes"', "1", '"true"', "[]"])
def test_pair_must_be_a_boolean(value: str) -> None:
    doc = PAIR_DOC.replace("pair = true", f"pair = {value}")
    with pytest.raises(ConfigError) as info:
        parse(doc, Path("x.toml"))
    assert info.value.key == "daemon.pair"
    assert "must be true or false" in info.value.message
    assert info.value.line == 2


@pytest.mark.parametrize("role", ["single", "decide", "follow"])
def test_the_status_shows_each_services_role(role: ctl.Role) -> None:
    state = replace(follower_on_b(), role=role)
    shown = status.render([state], wall_now=WALL0 + 5.0, monotonic_now=5.0, foreign={})
    (svc,) = shown["services"]
    assert svc["role"] == role
    assert json.loads(json.dumps(shown))["services"][0]["role"] == role
