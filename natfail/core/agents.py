"""What a gateway knows of its backends' agents, as pure values.

An agent's poll answers (:class:`natfail.core.agent_messages.Report`) come in;
out come, per backend, whether its agent answers, how far its clock is from
the gateway's and the clients it saw recently, and per service the clients
an activation brings over (the newest endpoint of each, across every
backend's report). Time is the gateway's monotonic clock, passed in; a
handshake age from a report becomes a monotonic instant when it arrives.

Why every backend's report, not only the active one's: the backend that
just died is the one whose clients need bringing over, so what it said
before it died is what an activation sends to the next."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Final

from natfail.core import agent_messages as msg
from natfail.core.model import Endpoint

RECENT: Final = 180.0
"""Seconds after its last handshake that a client still counts: WireGuard's
REJECT_AFTER_TIME, after which neither side uses the session."""
SKEW_WARNING: Final = 1.0
"""Seconds two backends' clocks may differ before the gateway warns: a client
refuses a server's initiation whose TAI64N time is older than the last one it
saw from the same key, and every backend shares that key."""
UNREACHABLE_AFTER: Final = 2
"""Polls in a row without an answer before an agent counts as unreachable."""


@dataclass(frozen=True, slots=True)
class Client:
    """One client as an agent reported it."""

    endpoint: Endpoint
    handshake_at: float
    """Monotonic instant of its last handshake with that backend."""


@dataclass(frozen=True)
class AgentView:
    """One backend's agent, as the gateway's polls saw it."""

    reachable: bool = False
    answered: bool = False
    """Ever answered since the gateway started."""
    missed: int = 0
    version: int = 0
    """The report version the gateway holds (0: none)."""
    skew: float | None = None
    """Seconds the agent's clock is ahead of the gateway's (negative: behind)."""
    clients: Mapping[bytes, Client] = field(default_factory=dict)
    epoch: int = 0
    """The highest activation epoch the agent recorded (0: none known)."""

    def recent(self, now: float) -> int:
        return sum(1 for c in self.clients.values() if now - c.handshake_at <= RECENT)


@dataclass(frozen=True)
class Polled:
    """What one poll of one agent brought: every page of its report, or None
    when it did not answer (or its pages did not fit together)."""

    reports: Sequence[msg.Report] | None
    at: float
    """Monotonic instant the answer came."""
    wall: float
    """The gateway's wall clock (Unix seconds) at the same instant."""


def observe(view: AgentView, polled: Polled) -> AgentView:
    """The view after a poll."""
    if not polled.reports:
        missed = view.missed + 1
        return replace(view, missed=missed, reachable=view.reachable and missed < UNREACHABLE_AFTER)
    first = polled.reports[0]
    skew = first.clock_ns / 1e9 - polled.wall
    if first.version == view.version:
        # The agent's report is still the one held: only its clock and epoch are news.
        return replace(view, reachable=True, answered=True, missed=0, skew=skew, epoch=first.epoch)
    clients: dict[bytes, Client] = {}
    for report in polled.reports:
        for peer in report.peers:
            clients[peer.public_key] = Client(
                peer.endpoint, polled.at - peer.handshake_age_ms / 1000
            )
    return AgentView(True, True, 0, first.version, skew, clients, first.epoch)


def targets(views: Iterable[AgentView], now: float) -> tuple[msg.Target, ...]:
    """The clients to bring over: each key once, at the endpoint of its newest
    handshake with any backend, if that is recent."""
    newest: dict[bytes, Client] = {}
    for view in views:
        for key, client in view.clients.items():
            held = newest.get(key)
            if held is None or client.handshake_at > held.handshake_at:
                newest[key] = client
    return tuple(
        msg.Target(key, c.endpoint)
        for key, c in sorted(newest.items())
        if now - c.handshake_at <= RECENT
    )


@dataclass(frozen=True, slots=True)
class Recorded:
    backend: str
    epoch: int


def recorded(views: Mapping[str, AgentView]) -> Recorded | None:
    """The backend a deciding gateway activated last, as the agents recorded
    it: the highest epoch wins (a tie, which only two deciders at once can
    make, goes to the first name, so both gateways read the same)."""
    best: Recorded | None = None
    for name in sorted(views):
        epoch = views[name].epoch
        if epoch > 0 and (best is None or epoch > best.epoch):
            best = Recorded(name, epoch)
    return best


def skew_spread(views: Mapping[str, AgentView]) -> tuple[str, str, float] | None:
    """The two reachable backends whose clocks differ most, and by how much,
    when that is more than :data:`SKEW_WARNING` seconds."""
    known = sorted(
        ((v.skew, name) for name, v in views.items() if v.reachable and v.skew is not None),
    )
    if len(known) < 2:
        return None
    (low, low_name), (high, high_name) = known[0], known[-1]
    spread = high - low
    return (low_name, high_name, spread) if spread > SKEW_WARNING else None


# -- persistence: the clients survive a gateway restart ---------------------------------


def dump_clients(views: Mapping[str, AgentView], now: float, wall: float) -> dict[str, object]:
    """The recent clients of one service's backends, for the state directory:
    ``{backend: {public key hex: [endpoint, handshake unix time]}}``."""
    out: dict[str, object] = {}
    for name, view in sorted(views.items()):
        kept = {
            key.hex(): [str(c.endpoint), round(wall - (now - c.handshake_at), 3)]
            for key, c in view.clients.items()
            if now - c.handshake_at <= RECENT
        }
        if kept:
            out[name] = kept
    return out


def load_clients(
    raw: object, backends: Iterable[str], now: float, wall: float
) -> dict[str, AgentView]:
    """Views holding the clients :func:`dump_clients` wrote (no reachability:
    nothing was heard yet); whatever does not parse is left out."""
    views: dict[str, AgentView] = {}
    if not isinstance(raw, dict):
        return views
    for name in backends:
        entries = raw.get(name)
        if not isinstance(entries, dict):
            continue
        clients: dict[bytes, Client] = {}
        for key_hex, value in entries.items():
            try:
                key = bytes.fromhex(key_hex)
                endpoint_text, unix = value
                endpoint = Endpoint.parse(str(endpoint_text))
                at = now - (wall - float(unix))
            except (TypeError, ValueError, OverflowError):
                continue
            # A time in the future (a corrupt file, a clock set back) would
            # never go stale: left out, like a stale one.
            if len(key) == msg.KEY_SIZE and 0.0 <= now - at <= RECENT:
                clients[key] = Client(endpoint, at)
        if clients:
            views[name] = AgentView(clients=clients)
    return views
