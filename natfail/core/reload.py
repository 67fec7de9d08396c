"""A reload, planned as a pure function: the running services' states and the
new config in, the new states and what the daemon must do out.

The daemon installs the plan's rules in one transaction and adopts its
states only if that succeeded (a reload takes effect whole or not at all);
then it removes the flows of ``lost`` backends and records the ``moved``
services' switches."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass, replace

from natfail.core import agents as ag
from natfail.core import health as hl
from natfail.core import selector as sel
from natfail.core.controller import Cleanup, Role, ServiceState, Switched
from natfail.core.model import Backend, Service


@dataclass(frozen=True)
class ReloadPlan:
    states: dict[str, ServiceState]
    """The services of the new config, in its order."""
    added: tuple[str, ...]
    removed: tuple[str, ...]
    cleanups: tuple[Cleanup, ...]
    """Flows of backends that went away, removed once the new rules are in."""
    switched: tuple[Switched, ...]
    """Services whose active backend went away and that moved in the same
    transaction, never to nothing: a moment without its DNAT lets client
    packets make un-NATed conntrack entries."""


def first_by_priority(service: Service, drained: Set[str]) -> str:
    order = sorted(
        enumerate(service.backends), key=lambda ib: (ib[1].name in drained, -ib[1].priority, ib[0])
    )
    return order[0][1].name


def plan(
    running: Mapping[str, ServiceState],
    services: tuple[Service, ...] | list[Service],
    keys_changed: Set[str],
    now: float,
    role_of: Callable[[Service], Role] | None = None,
) -> ReloadPlan:
    """``keys_changed``: the services whose probe keys differ from the running
    ones; ``role_of``: the role of an added service (a pair's, see
    :data:`natfail.core.controller.Role`; "single" when not given)."""
    new_names = {s.name for s in services}
    removed = tuple(n for n in running if n not in new_names)
    cleanups: list[Cleanup] = []
    for name in removed:
        gone = running[name]
        old_active = gone.service.backend(gone.active) if gone.active else None
        if old_active is not None:
            cleanups.append(Cleanup.of(gone.service, old_active))
    states: dict[str, ServiceState] = {}
    added: list[str] = []
    switched: list[Switched] = []
    for service in services:
        existing = running.get(service.name)
        if existing is None:
            added.append(service.name)
            role: Role = role_of(service) if role_of is not None else "single"
            states[service.name] = ServiceState.initial(service, now, role=role)
            continue
        state, lost = _carry_over(existing, service, service.name in keys_changed, now)
        if lost is not None:
            cleanups.append(Cleanup.of(existing.service, lost))
            state, record = _move_off(state, lost.name, now)
            switched.append(record)
        states[service.name] = state
    return ReloadPlan(states, tuple(added), removed, tuple(cleanups), tuple(switched))


def _carry_over(
    state: ServiceState, service: Service, keys_changed: bool, now: float
) -> tuple[ServiceState, Backend | None]:
    """The service's state under its new config, and its active backend when
    that went away (its flows must go).

    A backend renamed at the same address keeps its health and, when it was
    active, the traffic: its flows still lead to the right place."""
    old = state.service
    new_names = {b.name for b in service.backends}

    def predecessor(backend: Backend) -> Backend | None:
        same_name = old.backend(backend.name)
        if same_name is not None:
            return same_name
        return next(
            (b for b in old.backends if b.address == backend.address and b.name not in new_names),
            None,
        )

    health: dict[str, hl.BackendHealth] = {}
    for backend in service.backends:
        before = predecessor(backend)
        previous = state.health.get(before.name) if before is not None else None
        same = before is not None and before.address == backend.address
        health[backend.name] = (
            previous
            if same and previous is not None and not keys_changed
            else hl.BackendHealth.initial(now)
        )
    active = state.active
    lost: Backend | None = None
    if active is not None:
        before_active = old.backend(active)
        after = service.backend(active)
        if after is None or before_active is None or after.address != before_active.address:
            renamed = next(
                (
                    b
                    for b in service.backends
                    if before_active is not None
                    and b.address == before_active.address
                    and predecessor(b) is before_active
                ),
                None,
            )
            if renamed is not None:
                active = renamed.name
            else:
                lost, active = before_active, None
    pin = state.pin if state.pin is not None and state.pin.backend in new_names else None
    agents: dict[str, ag.AgentView] = {}
    for backend in service.backends:
        if backend.agent is None:
            continue
        before = predecessor(backend)
        view = state.agents.get(before.name) if before is not None else None
        if view is None:
            view = ag.AgentView()
        elif before is None or before.agent != backend.agent:
            # Another agent: what the old one reported still describes the clients.
            view = ag.AgentView(clients=view.clients)
        agents[backend.name] = view
    carried = replace(
        state,
        service=service,
        health=health,
        active=active,
        pin=pin,
        drained=state.drained & new_names,
        keys_epoch=state.keys_epoch + (1 if keys_changed else 0),
        agents=agents,
    )
    return carried, lost


def _move_off(state: ServiceState, previous: str, now: float) -> tuple[ServiceState, Switched]:
    decision = sel.select(
        state.candidates(),
        current=None,
        now=now,
        drained=state.drained,
        pin=state.pin,
        failback=state.service.failback,
        preempt_delay=state.service.preempt_delay,
    )
    # No verdict on the new backends yet: the first by priority beats no
    # rule; the next probe rounds correct it.
    active = decision.active or first_by_priority(state.service, state.drained)
    target = state.service.backend(active)
    assert target is not None
    moved = replace(state, active=active, pin=decision.pin, failovers=state.failovers + 1)
    return moved, Switched(state.name, previous, active, decision.reason, target.address)
