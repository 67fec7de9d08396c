"""Hitless failover with real agents: `natfail agent` in every backend's
namespace, the daemon polling them and activating the new backend on a
switch, the client's own wireguard-go untouched by the test (no forced
re-handshake after the switch). Every test runs once per dataplane.

Without agents the client's tunnel comes back only when its own WireGuard
gives up on the dead session (KEEPALIVE_TIMEOUT + REKEY_TIMEOUT, about 15 s;
13.4 s measured here); with them the new backend starts the handshake
itself at once. The bound below (5 s) lies between the two, far from both:
what it tells apart is who started the handshake, not the machine's speed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from natfail.lab import Lab, LabAgents, Pinger, wait_until
from tests.netns.gateway import KINDS, Gateway

HITLESS_BOUND = 5.0
"""Seconds from the switch to the client's first ping reply through the new backend."""


@pytest.fixture(params=KINDS)
def hitless(request: pytest.FixtureRequest, fresh: Lab) -> Iterator[tuple[Gateway, LabAgents]]:
    agents = LabAgents(fresh)
    agents.start_all()
    gateway = Gateway(fresh, request.param, agents=True)
    gateway.remove_rules()
    for name in ("state.json", "clients.json"):
        (fresh.dir / "state" / name).unlink(missing_ok=True)
    try:
        gateway.start()
        assert gateway.wait_active("a"), gateway.logs()
        yield gateway, agents
    finally:
        gateway.stop()
        agents.stop_all()
        gateway.remove_rules()
    assert "Traceback" not in gateway.logs(), gateway.logs()
    for backend in fresh.backends:
        assert "Traceback" not in agents.log(backend), agents.log(backend)


def _agent(gw: Gateway, backend: str) -> dict[str, Any]:
    entry = next(b for b in gw.status()["backends"] if b["name"] == backend)
    agent = entry["agent"]
    assert isinstance(agent, dict), entry
    return agent


def _client_known(gw: Gateway) -> None:
    """The client's tunnel is up through a, and a's agent has reported it."""
    lab = gw.lab
    lab.client_rehandshake()
    assert lab.client_ping(count=2, interval=0.1, timeout=3)
    assert wait_until(lambda: _agent(gw, "a")["clients"] == 1, 10, 0.2), gw.status()
    assert _agent(gw, "b")["reachable"], gw.status()


def _outage_after_switch(gw: Gateway, act: str) -> tuple[float, dict[str, Any]]:
    """Pings every 50 ms, does ``act`` ("kill" a, or a planned "switch" to b),
    and returns the seconds from the switch to the first reply after it."""
    lab = gw.lab
    pinger = Pinger(lab, 0.05)
    try:
        assert pinger.first_reply_after(time.time(), 5) is not None
        started = time.time()
        if act == "kill":
            lab.backend("a").stop()
        else:
            proc = gw.ctl("switch", "wg0", "b")
            assert proc.returncode == 0, proc.stderr
        assert wait_until(lambda: bool(gw.switches("a", "b")), 10), gw.logs()
        (record,) = gw.switches("a", "b")
        replied = pinger.first_reply_after(max(record["unix_time"], started), 30)
    finally:
        pinger.stop()
    assert replied is not None, gw.logs()
    return replied - record["unix_time"], record


@pytest.mark.parametrize("act", ["kill", "switch"])
def test_the_new_backend_brings_the_client_back_at_once(
    hitless: tuple[Gateway, LabAgents], act: str
) -> None:
    gw, _ = hitless
    lab = gw.lab
    _client_known(gw)
    outage, record = _outage_after_switch(gw, act)
    activation = _agent(gw, "b")["last_activation"]
    assert activation is not None, gw.logs()
    assert activation["answered"] and activation["clients"] == 1, activation
    assert activation["initiated"] == 1, activation
    assert "activate service=wg0 backend=b" in gw.logs()
    assert outage < HITLESS_BOUND, (outage, record, gw.logs())
    # The client never left the public endpoint, and b carries it now.
    assert lab.client_endpoint() == f"{lab.public_v4}:{lab.public_port}"
    before = lab.transfers()
    assert lab.client_ping(count=2, interval=0.1, timeout=3)
    assert lab.carrying_backends(before) == ["b"]


def test_a_dead_agent_costs_speed_never_the_failover(hitless: tuple[Gateway, LabAgents]) -> None:
    gw, agents = hitless
    lab = gw.lab
    _client_known(gw)
    agents.stop(lab.backend("b"))
    assert wait_until(lambda: not _agent(gw, "b")["reachable"], 15, 0.2), gw.status()
    assert "agent of b does not answer" in gw.logs()
    lab.backend("a").stop()
    assert wait_until(lambda: bool(gw.switches("a", "b")), 10), gw.logs()
    assert wait_until(lambda: _agent(gw, "b")["last_activation"] is not None, 10, 0.2)
    assert _agent(gw, "b")["last_activation"]["answered"] is False
    assert "did not answer the activation" in gw.logs()
    # The client still comes back, on WireGuard's own timers.
    assert wait_until(lambda: lab.client_ping(count=1, interval=0.2, timeout=1), 40, 0.1)


def test_a_restarted_gateway_still_knows_the_clients(hitless: tuple[Gateway, LabAgents]) -> None:
    gw, agents = hitless
    lab = gw.lab
    _client_known(gw)
    agents.stop(lab.backend("a"))
    gw.stop()
    assert (lab.dir / "state" / "clients.json").exists()
    gw.start()
    # a's agent is gone, so what the gateway knows of the client is what it saved.
    assert _agent(gw, "a")["clients"] == 1, gw.status()
    outage, _ = _outage_after_switch(gw, "kill")
    assert outage < HITLESS_BOUND, (outage, gw.logs())
