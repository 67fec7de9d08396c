"""Hitless failover for many clients at once, and for clients that have been
idle: 20 more wireguard-go clients in the lab's client namespace (every
other one with PersistentKeepalive 25), the agents on both backends.

What tells the agent's work from WireGuard's own: after the crash, the
clients send nothing, yet every one of them gets a new handshake, which only
the new backend can have started."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from natfail.lab import Lab, LabAgents, wait_until
from natfail.lab.clients import ExtraClients
from tests.netns.gateway import KINDS, Gateway, running_with_agents

CLIENTS = 20
IDLE = 60.0
"""Seconds the clients stay silent before the crash (with PersistentKeepalive
25 some of them send keepalives meanwhile, as they would in life)."""
BROUGHT_OVER_BOUND = 5.0


@pytest.fixture(scope="module")
def lab_options() -> dict[str, Any]:
    return {"ipv6": False, "prefix": "nfm"}


@pytest.fixture(scope="module")
def extra(lab: Lab) -> ExtraClients:
    return ExtraClients(lab, CLIENTS, keepalive=25, keepalive_every=2)


def _running(fresh: Lab, extra: ExtraClients, firewall: str) -> Iterator[tuple[Gateway, LabAgents]]:
    for backend in fresh.backends:
        extra.add_to(backend)
    with running_with_agents(fresh, firewall) as running:
        yield running


@pytest.fixture(params=KINDS)
def many(
    request: pytest.FixtureRequest, fresh: Lab, extra: ExtraClients
) -> Iterator[tuple[Gateway, LabAgents]]:
    yield from _running(fresh, extra, request.param)


@pytest.fixture
def many_nft(fresh: Lab, extra: ExtraClients) -> Iterator[tuple[Gateway, LabAgents]]:
    yield from _running(fresh, extra, "nftables")


def _known_clients(gw: Gateway) -> int:
    entry = next(b for b in gw.status()["backends"] if b["name"] == "a")
    return int(entry["agent"]["clients"])


def _all_on_a(gw: Gateway, extra: ExtraClients) -> None:
    extra.rehandshake_all()
    failed = [c.index for c in extra.clients if not extra.ping(c)]
    assert not failed, failed
    # the lab's own client never talked here: only the extra ones are known
    assert wait_until(lambda: _known_clients(gw) == CLIENTS, 10, 0.2), gw.status()


def _crash_and_count(gw: Gateway, agents: LabAgents, extra: ExtraClients) -> None:
    lab = gw.lab
    before = extra.handshakes()
    killed = time.time()
    lab.backend("a").stop()
    agents.stop(lab.backend("a"))
    assert wait_until(lambda: bool(gw.switches("a", "b")), 10), gw.logs()
    (record,) = gw.switches("a", "b")

    def everyone() -> bool:
        now = extra.handshakes()
        return all(now[i] > before[i] and now[i] >= int(killed) for i in now)

    # Nobody sends: a new handshake on each client can only come from b.
    assert wait_until(everyone, record["unix_time"] - time.time() + BROUGHT_OVER_BOUND, 0.1), (
        extra.handshakes(),
        before,
        gw.logs(),
    )
    entry = next(b for b in gw.status()["backends"] if b["name"] == "b")
    activation = entry["agent"]["last_activation"]
    assert activation["clients"] == CLIENTS and activation["initiated"] == CLIENTS, activation
    failed = [c.index for c in extra.clients if not extra.ping(c)]
    assert not failed, failed
    assert lab.client_endpoint() == f"{lab.public_v4}:{lab.public_port}"


def test_many_clients_are_brought_over_at_once(
    many: tuple[Gateway, LabAgents], extra: ExtraClients
) -> None:
    gw, agents = many
    _all_on_a(gw, extra)
    _crash_and_count(gw, agents, extra)


def test_clients_idle_for_a_minute_are_brought_over(
    many_nft: tuple[Gateway, LabAgents], extra: ExtraClients
) -> None:
    """Half of them with PersistentKeepalive, half silent the whole minute."""
    gw, agents = many_nft
    _all_on_a(gw, extra)
    time.sleep(IDLE)
    assert _known_clients(gw) == CLIENTS, gw.status()
    _crash_and_count(gw, agents, extra)
