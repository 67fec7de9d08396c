"""`natfailctl status --json`, rendered from the services' states in memory
(no firewall listing, no probe): cheap at any number of services."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from natfail.core import agents as ag
from natfail.core import selector as sel
from natfail.core.controller import ServiceState
from natfail.core.model import Endpoint


def describe_foreign(foreign: Mapping[str, int]) -> str:
    """``{address: flows}`` of foreign-NATed flows, for a message."""
    return ", ".join(f"{addr} ({n} flows)" for addr, n in sorted(foreign.items()))


def foreign_warning(public: Endpoint, foreign: Mapping[str, int]) -> list[str]:
    if not foreign:
        return []
    shown = describe_foreign(foreign)
    return [
        f"client flows to {public} are NATed to {shown} by a rule that is "
        "not natfail's and comes first"
    ]


def render(
    states: Iterable[ServiceState],
    *,
    wall_now: float,
    monotonic_now: float,
    foreign: Mapping[str, Mapping[str, int]],
    activations: Mapping[tuple[str, str], Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """``foreign``: per service, reply sources of client flows that another
    NAT rule made (see the daemon's foreign check); ``activations``: the last
    activation of each (service, backend) agent."""

    def since(monotonic_since: float) -> str:
        wall = wall_now - (monotonic_now - monotonic_since)
        return datetime.fromtimestamp(wall, timezone.utc).isoformat(timespec="seconds")

    services = []
    for state in states:
        backends = []
        for b in state.service.backends:
            h = state.health[b.name]
            backends.append(
                {
                    "name": b.name,
                    "address": str(b.address),
                    "state": sel.effective_state(h.state, b.name in state.drained),
                    "rtt_ms": None if h.last_rtt is None else round(h.last_rtt * 1000, 3),
                    "since": since(h.since),
                    "priority": b.priority,
                    "reason": h.last_reason,
                    "agent": _agent(
                        state, b.name, monotonic_now, (activations or {}).get((state.name, b.name))
                    ),
                }
            )
        services.append(
            {
                "name": state.name,
                "public": str(state.service.public),
                "active": state.active,
                "pinned": state.pin is not None,
                "failovers": state.failovers,
                "role": state.role,
                "no_healthy_backend": state.no_healthy,
                "backends": backends,
                "warnings": [
                    *foreign_warning(state.service.public, foreign.get(state.name, {})),
                    *skew_warning(state.agents),
                ],
            }
        )
    return {"services": services}


def skew_warning(agents: Mapping[str, ag.AgentView]) -> list[str]:
    spread = ag.skew_spread(agents)
    if spread is None:
        return []
    low, high, seconds = spread
    return [
        f"the clocks of backends {low} and {high} differ by {seconds:.1f} s: run NTP on "
        "every backend (a client refuses a handshake from the one behind)"
    ]


def _agent(
    state: ServiceState, backend: str, now: float, activation: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """A backend's agent as status shows it; None when it has none."""
    view = state.agents.get(backend)
    target = state.service.backend(backend)
    if view is None or target is None or target.agent is None:
        return None
    return {
        "address": str(target.agent),
        "reachable": view.reachable,
        "clients": view.recent(now),
        "clock_skew_ms": None if view.skew is None else round(view.skew * 1000, 1),
        "last_activation": dict(activation) if activation is not None else None,
    }


SUMMARY_SERVICES = 10


def summary(states: Iterable[ServiceState]) -> str:
    """The one line of sd_notify STATUS= (`systemctl status` shows it): the
    first services by name, then how many more."""
    listed = list(states)
    parts = [
        f"{s.name}: {s.active or 'none'}" + (" (pinned)" if s.pin else "")
        for s in listed[:SUMMARY_SERVICES]
    ]
    if len(listed) > SUMMARY_SERVICES:
        parts.append(f"and {len(listed) - SUMMARY_SERVICES} more")
    return "active " + ", ".join(parts)
