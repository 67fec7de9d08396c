"""`natfailctl status --json`, rendered from the services' states in memory
(no firewall listing, no probe): cheap at any number of services."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

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
) -> dict[str, Any]:
    """``foreign``: per service, reply sources of client flows that another
    NAT rule made (see the daemon's foreign check)."""

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
                }
            )
        services.append(
            {
                "name": state.name,
                "public": str(state.service.public),
                "active": state.active,
                "pinned": state.pin is not None,
                "failovers": state.failovers,
                "backends": backends,
                "warnings": foreign_warning(state.service.public, foreign.get(state.name, {})),
            }
        )
    return {"services": services}


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
