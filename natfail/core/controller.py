"""One service's whole state machine, as pure functions over a frozen state.

Events come in (a probe round's results, an operator command); the new
state and the *effects* come out. The daemon carries an :class:`Outcome`
out in the order the design fixes, and decides nothing itself:

1. ``effects``: log lines and other work that happens whatever follows;
2. ``transaction``: the service's DNAT moves to a new backend, in one
   firewall transaction (batched with other services' moves that fall due
   together);
3. only if that transaction succeeded, ``after`` (the conntrack cleanup of
   the old backend, then the switch record, then the state file), and the
   state becomes ``state``; if it failed, ``failed`` runs and the state
   becomes ``kept``: the last good state, with what was learned meanwhile.

Health stays the one transition table in :mod:`natfail.core.health`; the
choice of backend stays :func:`natfail.core.selector.select`."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal, TypeAlias

from natfail.core import agent_messages as msg
from natfail.core import agents as ag
from natfail.core import health as hl
from natfail.core import selector as sel
from natfail.core.model import Backend, Endpoint, Service
from natfail.core.ruleset import backend_mark

# -- the state -------------------------------------------------------------------------

Role: TypeAlias = Literal["single", "decide", "follow"]
"""``single``: the only gateway (``pair = false``). In a pair, ``decide`` while
this gateway holds the service's public address, else ``follow``: install
what the deciding gateway activated, as the backends' agents recorded it."""


@dataclass(frozen=True)
class ServiceState:
    """Everything natfail knows and wants about one service."""

    service: Service
    health: Mapping[str, hl.BackendHealth]
    active: str | None = None
    pin: sel.Pin | None = None
    drained: frozenset[str] = frozenset()
    failovers: int = 0
    no_healthy: bool = False
    keys_epoch: int = 0
    """Bumped whenever the service's probe keys change: a probe made with
    older keys says nothing about the backend."""
    agents: Mapping[str, ag.AgentView] = field(default_factory=dict)
    """What the agents of the backends that have one said, by backend."""
    role: Role = "single"
    epoch: int = 0
    """The epoch of the active backend's activation, as far as this gateway
    knows (its own, or the one the agents recorded)."""
    polled: bool = False
    """The agents were polled once since start (a pair's decider makes no
    first choice before it knows what the agents recorded)."""

    @classmethod
    def initial(
        cls,
        service: Service,
        now: float,
        *,
        active: str | None = None,
        pin: sel.Pin | None = None,
        drained: frozenset[str] = frozenset(),
        agents: Mapping[str, ag.AgentView] | None = None,
        role: Role = "single",
        epoch: int = 0,
    ) -> ServiceState:
        names = {b.name for b in service.backends}
        with_agent = {b.name for b in service.backends if b.agent is not None}
        return cls(
            service=service,
            health={b.name: hl.BackendHealth.initial(now) for b in service.backends},
            active=active if active in names else None,
            pin=pin if pin is not None and pin.backend in names else None,
            drained=frozenset(drained & names),
            agents={name: (agents or {}).get(name, ag.AgentView()) for name in sorted(with_agent)},
            role=role,
            epoch=epoch,
        )

    @property
    def name(self) -> str:
        return self.service.name

    def candidates(self) -> list[sel.Candidate]:
        return [
            sel.Candidate(
                b.name,
                b.priority,
                self.health[b.name].state,
                self.health[b.name].since,
                self.health[b.name].loss,
                self.health[b.name].failures,
            )
            for b in self.service.backends
        ]


# -- the effects -----------------------------------------------------------------------


@dataclass(frozen=True)
class Log:
    level: int
    message: str
    backend: str | None = None
    """The backend the line is about, for the journal's fields."""


@dataclass(frozen=True)
class LocalProbeError:
    """A probe failed on this gateway (no file descriptors, say): reported, and
    never counted against the backend."""

    service: str
    backend: str
    reason: str


@dataclass(frozen=True)
class Cleanup:
    """Remove the conntrack entries of one backend of a service."""

    service: str
    backend: str
    mark: int
    address: Endpoint

    @classmethod
    def of(cls, service: Service, backend: Backend) -> Cleanup:
        return cls(
            service.name, backend.name, backend_mark(service.name, backend.name), backend.address
        )


@dataclass(frozen=True)
class Switched:
    """The traffic moved: record it, count it in the metrics, run the hook.
    The daemon adds the times it measured (swap, cleanup)."""

    service: str
    previous: str | None
    active: str
    reason: str
    address: Endpoint


@dataclass(frozen=True)
class SaveState:
    """Write the operator's wishes (pins, drains, the active backend)."""


@dataclass(frozen=True)
class SaveClients:
    """The clients the agents reported changed: write them (when convenient)."""


@dataclass(frozen=True)
class Activate:
    """Tell the new active backend's agent to bring the service's recent
    clients over (after the cleanup: an old flow of a client would make the
    gateway give the backend's initiation another source port)."""

    service: str
    backend: str
    agent: Endpoint
    server_public_key: bytes
    targets: tuple[msg.Target, ...]
    epoch: int
    """Grows with every activation; the agents keep the highest."""


@dataclass(frozen=True)
class Transaction:
    """Move ``service``'s DNAT to ``active`` (one firewall transaction)."""

    service: str
    active: str


Effect = Log | LocalProbeError | Cleanup | Switched | SaveState | SaveClients | Activate


@dataclass(frozen=True)
class Outcome:
    state: ServiceState
    effects: tuple[Effect, ...] = ()
    transaction: Transaction | None = None
    after: tuple[Effect, ...] = ()
    failed: tuple[Effect, ...] = ()
    kept: ServiceState | None = None
    """The state to keep when the transaction fails (with ``transaction`` only)."""
    wake_at: float | None = None
    """When the service wants :func:`decide` again without a new probe result
    (a preempt that falls due between probe rounds)."""


# -- probe rounds ----------------------------------------------------------------------


@dataclass(frozen=True)
class Probed:
    """One probe's result, with what was probed: a reload while the probe was
    in flight may have changed the backend's address or the keys."""

    backend: str
    address: Endpoint
    up: bool
    reason: str
    rtt: float | None = None
    local: bool = False


@dataclass(frozen=True)
class Round:
    results: tuple[Probed, ...]
    keys_epoch: int
    at: float


def _describe(result: Probed) -> str:
    if result.up and result.rtt is not None:
        return f"rtt {result.rtt * 1000:.2f} ms"
    return result.reason


def observe_round(state: ServiceState, probe_round: Round) -> Outcome:
    """Feed a round's results to the backends' health, then decide."""
    health = dict(state.health)
    effects: list[Effect] = []
    went_down: list[str] = []
    settings = state.service.probe
    for result in probe_round.results:
        old = health.get(result.backend)
        backend = state.service.backend(result.backend)
        if (
            old is None
            or backend is None
            or backend.address != result.address
            or probe_round.keys_epoch != state.keys_epoch
        ):
            continue  # probed before a reload changed it: says nothing now
        if result.local:
            effects.append(LocalProbeError(state.name, result.backend, result.reason))
            continue
        new = hl.observe(
            old,
            result.up,
            max(probe_round.at, old.since),
            settings.rise,
            settings.fall,
            rtt=result.rtt if result.up else None,
            reason="" if result.up else result.reason,
        )
        health[result.backend] = new
        if new.state != old.state:
            effects.append(
                Log(
                    logging.WARNING if new.state is hl.HealthState.DOWN else logging.INFO,
                    f"{state.name}: backend {result.backend} is {new.state.value} "
                    f"({_describe(result)})",
                    result.backend,
                )
            )
            if new.state is hl.HealthState.DOWN and result.backend != state.active:
                went_down.append(result.backend)
    observed = replace(state, health=health)
    outcome = decide(observed, probe_round.at)
    # A standby can own flows (it was active before, or its own packet reached
    # a client after the client's flow had expired); the client's keepalives
    # would keep them alive after it died. Removed, the next packet takes the
    # DNAT to the active backend.
    forget = tuple(
        Cleanup.of(state.service, b) for b in state.service.backends if b.name in went_down
    )

    def standby(after: ServiceState) -> tuple[Effect, ...]:
        return tuple(c for c in forget if c.backend != after.active)

    if outcome.transaction is None:
        return replace(outcome, effects=(*effects, *outcome.effects, *standby(outcome.state)))
    assert outcome.kept is not None
    return replace(
        outcome,
        effects=(*effects, *outcome.effects),
        after=(*outcome.after, *standby(outcome.state)),
        failed=(*outcome.failed, *standby(outcome.kept)),
    )


# -- the decision ----------------------------------------------------------------------


def decide(state: ServiceState, now: float) -> Outcome:
    """Which backend carries the service now, and what it takes to get there."""
    if state.role == "follow":
        return _follow(state, now)
    if state.role == "decide" and state.active is None and not state.polled:
        return Outcome(state)  # what did the other gateway activate? the first poll tells
    service = state.service
    decision = sel.select(
        state.candidates(),
        current=state.active,
        now=now,
        drained=state.drained,
        pin=state.pin,
        failback=service.failback,
        preempt_delay=service.preempt_delay,
    )
    effects: list[Effect] = []
    if decision.no_healthy and not state.no_healthy:
        effects.append(
            Log(
                logging.ERROR,
                f"{state.name}: no healthy backend; traffic stays on {state.active or 'nothing'}",
            )
        )
    if decision.pin_dropped:
        effects.append(
            Log(
                logging.INFO,
                f"{state.name}: pin on {state.pin.backend if state.pin else '?'} ended "
                f"({decision.reason})",
            )
        )
    decided = replace(state, no_healthy=decision.no_healthy, pin=decision.pin)
    if not decision.changed or decision.active is None:
        if decision.pin != state.pin:
            effects.append(SaveState())
        return Outcome(decided, tuple(effects), wake_at=decision.next_check)
    moved = _move(decided, decision.active, decision.reason, tuple(effects), kept=decided, now=now)
    return replace(moved, wake_at=decision.next_check)


def _move(
    state: ServiceState,
    active: str,
    reason: str,
    effects: tuple[Effect, ...],
    *,
    kept: ServiceState,
    now: float,
    activate: bool = True,
) -> Outcome:
    """``activate``: False where the move only installs what the agents
    already recorded (a follower, a decider adopting it)."""
    service = state.service
    previous = state.active
    target = service.backend(active)
    assert target is not None, "the selector chose a backend the service does not have"
    activate = activate and target.agent is not None
    epoch = next_epoch(state) if activate else state.epoch
    moved = replace(
        state,
        active=active,
        failovers=state.failovers + (1 if previous is not None else 0),
        epoch=epoch,
    )
    after: list[Effect] = []
    old = service.backend(previous) if previous is not None else None
    if old is not None:
        after.append(Cleanup.of(service, old))
    if activate and target.agent is not None:
        # The first choice brings nobody over: whoever talks to the service
        # already talks to that backend (or to none). A pair's decider still
        # records every choice, for the other gateway to follow.
        clients = ag.targets(state.agents.values(), now) if previous is not None else ()
        if clients or state.role == "decide":
            after.append(
                Activate(
                    state.name, active, target.agent, service.server_public_key, clients, epoch
                )
            )
    after += [Switched(state.name, previous, active, reason, target.address), SaveState()]
    return Outcome(moved, effects, Transaction(state.name, active), tuple(after), kept=kept)


# -- operator commands -----------------------------------------------------------------

Command = Literal["switch", "release", "drain", "undrain"]
COMMANDS: tuple[Command, ...] = ("switch", "release", "drain", "undrain")


@dataclass(frozen=True)
class Refused:
    """An operator command that cannot be carried out, and why."""

    message: str
    usage: bool = False
    """True when the request itself was malformed (exit code "usage")."""


@dataclass(frozen=True)
class Commanded:
    outcome: Outcome
    message: str


@dataclass(frozen=True)
class Request:
    command: Command
    backend: object = None
    force: object = False


def command(state: ServiceState, request: Request, now: float) -> Commanded | Refused:
    """An operator's switch, release, drain or undrain. When the firewall
    refuses the move, everything goes back as it was (``kept``): nothing is
    left to happen later without the operator."""
    name = state.name
    if state.role == "follow":
        return Refused(
            f"{name}: this gateway follows the other one (it does not hold "
            f"{state.service.public.ip}); run the command there"
        )
    if request.command == "release":
        if state.pin is None:
            return Commanded(Outcome(state), f"{name}: not pinned")
        wished, message = replace(state, pin=None), f"{name}: pin released"
    else:
        backend = request.backend
        if not isinstance(backend, str) or state.service.backend(backend) is None:
            names = ", ".join(b.name for b in state.service.backends)
            return Refused(f"service {name} has no backend {backend!r} ({names})")
        health = state.health[backend].state
        if request.command == "switch":
            if backend in state.drained:
                return Refused(f"{name}: backend {backend} is drained (undrain it first)")
            if not isinstance(request.force, bool):
                # "false" is a non-empty string: never let it mean yes.
                return Refused(f"force must be true or false, not {request.force!r}", usage=True)
            if health != hl.HealthState.UP and not request.force:
                return Refused(
                    f"{name}: backend {backend} is {health.value}; use --force to switch anyway"
                )
            wished = replace(state, pin=sel.Pin.new(backend, health))
            message = f"{name}: switched to {backend}, pinned until it fails or release"
        elif request.command == "drain":
            wished = replace(state, drained=state.drained | {backend})
            message = f"{name}: backend {backend} drained"
        else:
            wished = replace(state, drained=state.drained - {backend})
            message = f"{name}: backend {backend} back in selection"
    outcome = decide(wished, now)
    if outcome.transaction is not None:
        outcome = replace(outcome, kept=state)
    elif SaveState() not in outcome.effects:
        outcome = replace(outcome, effects=(*outcome.effects, SaveState()))
    return Commanded(outcome, message)


# -- start-up --------------------------------------------------------------------------


def stray_cleanups(state: ServiceState) -> list[Cleanup]:
    """At start-up: a daemon killed between a swap and its conntrack cleanup
    leaves flows pinned to the old backend; only the active one's may stay."""
    if state.active is None:
        return []
    return [Cleanup.of(state.service, b) for b in state.service.backends if b.name != state.active]


# -- agents ----------------------------------------------------------------------------


def agent_polled(state: ServiceState, backend: str, polled: ag.Polled) -> Outcome:
    """A poll of ``backend``'s agent came back (or did not)."""
    old = state.agents.get(backend)
    if old is None:
        return Outcome(state)  # the backend or its agent went away in a reload
    new = ag.observe(old, polled)
    effects: list[Effect] = []
    if new.reachable != old.reachable and (new.reachable or old.answered):
        if new.reachable:
            effects.append(
                Log(
                    logging.INFO,
                    f"{state.name}: agent of {backend} reachable "
                    f"({new.recent(polled.at)} recent clients)",
                )
            )
        else:
            effects.append(
                Log(
                    logging.WARNING,
                    f"{state.name}: agent of {backend} does not answer; a switch to "
                    f"{backend} leaves its clients to WireGuard's own timers (about 15 s)",
                )
            )
    if new.clients != old.clients:
        effects.append(SaveClients())
    agents = {**state.agents, backend: new}
    before, after = ag.skew_spread(state.agents), ag.skew_spread(agents)
    if after is not None and before is None:
        low, high, spread = after
        effects.append(
            Log(
                logging.WARNING,
                f"{state.name}: the clocks of backends {low} and {high} differ by "
                f"{spread:.1f} s; a client refuses a handshake from the one behind "
                "until it catches up (run NTP on every backend)",
            )
        )
    return Outcome(replace(state, agents=agents), tuple(effects))


def next_epoch(state: ServiceState) -> int:
    """Above every epoch this gateway made or an agent recorded."""
    return max(state.epoch, *(v.epoch for v in state.agents.values()), 0) + 1


def _follow(state: ServiceState, now: float) -> Outcome:
    """A follower installs what the agents recorded, and decides nothing."""
    record = ag.recorded(state.agents)
    if record is None:
        return Outcome(state)
    if record.backend == state.active:
        return Outcome(replace(state, epoch=max(state.epoch, record.epoch)))
    following = replace(state, epoch=max(state.epoch, record.epoch))
    return _move(following, record.backend, "follow", (), kept=state, now=now, activate=False)


def agents_polled(state: ServiceState, now: float) -> Outcome:
    """After a sweep of polls (see :func:`agent_polled` for each one): a
    follower follows; a pair's decider adopts what the agents recorded when
    it has nothing yet, and records its choice again where an agent lost it
    (a restarted agent) or another decider's is newer (two masters at once)."""
    polled = replace(state, polled=True)
    if state.role == "follow":
        return _follow(polled, now)
    if state.role != "decide":
        return Outcome(polled)
    record = ag.recorded(state.agents)
    if state.active is None:
        if record is None:
            return decide(polled, now)
        adopted = replace(polled, epoch=max(state.epoch, record.epoch))
        return _move(adopted, record.backend, "adopted", (), kept=polled, now=now, activate=False)
    active = state.service.backend(state.active)
    view = state.agents.get(state.active)
    if active is None or active.agent is None or view is None or not view.reachable:
        return Outcome(polled)
    if record is not None and record.backend == state.active and view.epoch >= state.epoch:
        return Outcome(replace(polled, epoch=record.epoch))
    # Epochs are unique to one decision of one gateway, so another backend
    # with as high an epoch was chosen by another gateway (a tie goes to the
    # first name, as :func:`ag.recorded` reads it on both).
    if record is not None and record.backend != state.active and record.epoch >= state.epoch:
        # Another gateway decided after this one (both held the address for a
        # while): the highest epoch wins, as long as this gateway's own probes
        # let it; otherwise this gateway's choice is recorded above it.
        other = state.health.get(record.backend)
        if other is not None and other.state is hl.HealthState.UP:
            adopted = replace(polled, epoch=record.epoch)
            outcome = _move(
                adopted, record.backend, "adopted", (), kept=polled, now=now, activate=False
            )
            note = Log(
                logging.WARNING,
                f"{state.name}: another gateway activated backend {record.backend} "
                f"(epoch {record.epoch}) after this one chose {state.active}; following it",
            )
            return replace(outcome, effects=(note, *outcome.effects))
        epoch = next_epoch(state)
        effects: list[Effect] = [
            Log(
                logging.WARNING,
                f"{state.name}: another gateway activated backend {record.backend} "
                f"(epoch {record.epoch}), which is not up from here; recording "
                f"{state.active} again above it",
            )
        ]
    else:
        # The active backend's agent lost the record (it restarted): again.
        epoch = max(state.epoch, 1)
        effects = []
    effects.append(
        Activate(state.name, state.active, active.agent, state.service.server_public_key, (), epoch)
    )
    return Outcome(replace(polled, epoch=epoch), tuple(effects))


def set_role(state: ServiceState, role: Role, now: float) -> Outcome:
    """This gateway gained or lost the service's public address."""
    if role == state.role:
        return Outcome(state)
    if role == "decide" and state.active is not None:
        # A takeover keeps the backend the other gateway chose: this gateway's
        # own view of it may be stale (a path cut for a while), so the active
        # backend gets a fresh verdict before anything moves.
        health = {**state.health, state.active: hl.BackendHealth.initial(now)}
        taken = replace(state, role=role, health=health)
        message = f"{state.name}: this gateway now decides; keeping backend {state.active}"
    elif role == "decide":
        taken = replace(state, role=role)
        message = f"{state.name}: this gateway now decides"
    else:
        taken = replace(state, role=role)
        message = f"{state.name}: this gateway now follows the other one"
    outcome = decide(taken, now)
    return replace(outcome, effects=(Log(logging.WARNING, message), *outcome.effects))
