"""Hitless failover with real agents: `natfail agent` in every backend's
namespace, the daemon polling them and activating the new backend on a
switch, the client's own wireguard-go untouched by the test (no forced
re-handshake after the switch). Every test runs once per dataplane.

Without agents the client's tunnel comes back only when its own WireGuard
gives up on the dead session (KEEPALIVE_TIMEOUT + REKEY_TIMEOUT, about 15 s;
13.4 s measured here); with them the new backend starts the handshake
itself at once (about 0.05 s). A first initiation lost on the way comes
again only after REKEY_TIMEOUT (5 s and up to a third of a second of
jitter), so the bound below (2.5 s) lies between all three, far from each:
what it tells apart is who started the handshake and whether the first
initiation got through, not the machine's speed."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from natfail.lab import (
    CLIENT_TUNNEL_V4,
    DAEMON_ENV,
    Lab,
    LabAgents,
    Pinger,
    agent_address,
    wait_until,
)
from tests.netns.gateway import KINDS, Gateway
from tests.netns.gateway import running_with_agents as _running

HITLESS_BOUND = 2.5
"""Seconds from the switch to the client's first ping reply through the new backend."""


@pytest.fixture(params=KINDS)
def hitless(request: pytest.FixtureRequest, fresh: Lab) -> Iterator[tuple[Gateway, LabAgents]]:
    """Both dataplanes: where the fence and the SNAT of the backend's initiation matter."""
    with _running(fresh, request.param) as running:
        yield running


@pytest.fixture
def hitless_nft(fresh: Lab) -> Iterator[tuple[Gateway, LabAgents]]:
    """One dataplane: for what happens between the gateway and the agents."""
    with _running(fresh, "nftables") as running:
        yield running


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


def _outage_after_switch(
    gw: Gateway, act: str, agents: LabAgents | None = None, old: str = "a", new: str = "b"
) -> tuple[float, dict[str, Any]]:
    """Pings every 50 ms, does ``act`` ("kill" the old backend's host: its
    wireguard-go and, given ``agents``, its agent; or a planned "switch" to the
    new one), and returns the seconds from the switch to the first reply after it."""
    lab = gw.lab
    pinger = Pinger(lab, 0.05)
    try:
        assert pinger.first_reply_after(time.time(), 5) is not None
        started = time.time()
        if act == "kill":
            lab.backend(old).stop()
            if agents is not None:
                agents.stop(lab.backend(old))
        else:
            proc = gw.ctl("switch", "wg0", new)
            assert proc.returncode == 0, proc.stderr
        assert wait_until(lambda: bool(gw.switches(old, new)), 10), gw.logs()
        record = gw.switches(old, new)[-1]
        replied = pinger.first_reply_after(max(record["unix_time"], started), 30)
    finally:
        pinger.stop()
    assert replied is not None, gw.logs()
    return replied - record["unix_time"], record


@pytest.mark.parametrize("act", ["kill", "switch"])
def test_the_new_backend_brings_the_client_back_at_once(
    hitless: tuple[Gateway, LabAgents], act: str
) -> None:
    gw, agents = hitless
    lab = gw.lab
    _client_known(gw)
    outage, record = _outage_after_switch(gw, act, agents)
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
    outage, _ = _outage_after_switch(gw, "kill", agents)
    assert outage < HITLESS_BOUND, (outage, gw.logs())


def test_the_old_backend_alive_cannot_take_the_client_back(
    hitless: tuple[Gateway, LabAgents],
) -> None:
    """After a planned switch a still holds a valid session with the client;
    what it sends the client is fenced at the gateway."""
    gw, agents = hitless
    lab = gw.lab
    _client_known(gw)
    outage, _ = _outage_after_switch(gw, "switch", agents)
    assert outage < HITLESS_BOUND, (outage, gw.logs())
    a = lab.backend("a")
    ping = lab.exec(a, ["ping", "-c", "2", "-i", "0.2", "-W", "1", CLIENT_TUNNEL_V4], check=False)
    assert ping.returncode != 0, ping.stdout
    assert lab.client_endpoint() == f"{lab.public_v4}:{lab.public_port}"
    before = lab.transfers()
    assert lab.client_ping(count=2, interval=0.1, timeout=3)
    assert lab.carrying_backends(before) == ["b"]
    assert gw.status()["active"] == "b"


def test_a_switch_back_to_a_backend_active_moments_ago(
    hitless: tuple[Gateway, LabAgents],
) -> None:
    """a still holds a keypair with the client: its agent must clear it, or a
    keepalive on the stale keys would go out instead of a handshake."""
    gw, agents = hitless
    _client_known(gw)
    outage, _ = _outage_after_switch(gw, "switch", agents)
    assert outage < HITLESS_BOUND, (outage, gw.logs())
    assert wait_until(lambda: _agent(gw, "b")["clients"] == 1, 10, 0.2), gw.status()
    outage, _ = _outage_after_switch(gw, "switch", agents, old="b", new="a")
    assert outage < HITLESS_BOUND, (outage, gw.logs())
    activation = _agent(gw, "a")["last_activation"]
    assert activation is not None and activation["initiated"] == 1, activation


def test_a_restarted_agent_is_obeyed_again(hitless_nft: tuple[Gateway, LabAgents]) -> None:
    """A new agent process remembers no gateway's timestamps; the gateway's
    next exchange is simply newer."""
    gw, agents = hitless_nft
    lab = gw.lab
    _client_known(gw)
    b = lab.backend("b")
    agents.stop(b)
    assert wait_until(lambda: not _agent(gw, "b")["reachable"], 15, 0.2), gw.status()
    agents.start(b)
    assert wait_until(lambda: _agent(gw, "b")["reachable"], 15, 0.2), gw.status()
    outage, _ = _outage_after_switch(gw, "kill", agents)
    assert outage < HITLESS_BOUND, (outage, gw.logs())


def test_an_agent_whose_clock_is_behind_is_warned_about(
    hitless_nft: tuple[Gateway, LabAgents],
) -> None:
    gw, agents = hitless_nft
    lab = gw.lab
    b = lab.backend("b")
    agents.stop(b)
    agents.start(b, prefix=["env", "FAKETIME_DONT_FAKE_MONOTONIC=1", "faketime", "-f", "-5s"])

    def warned() -> bool:
        return any("clocks of backends" in w for w in gw.status()["warnings"])

    assert wait_until(warned, 15, 0.2), gw.status()
    skew = _agent(gw, "b")["clock_skew_ms"]
    assert skew is not None and -6000 < skew < -4000, skew
    assert "the clocks of backends b and a differ by" in gw.logs(), gw.logs()
    assert "differ by" in gw.ctl("status").stdout


_FORGER = """
import base64, os, socket, sys, time
from natfail.core import agent_channel as ch
from natfail.core import agent_messages as msg
from natfail.core.tai64n import next_timestamp

listed, agent_at, server = sys.argv[1:4]
host, port = agent_at.rsplit(":", 1)
listed_key, server_key = base64.b64decode(listed), base64.b64decode(server)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.connect((host, int(port)))
sock.settimeout(1.0)
last = None

def stamp():
    global last
    last = next_timestamp(time.time_ns(), last)
    return last

def ask(key, datagram=None):
    payload = msg.encode(msg.Poll(0, 0))
    made, pending = ch.new_request(key, server_key, payload, stamp())
    sock.send(datagram if datagram is not None else made)
    try:
        reply = sock.recv(70000)
    except TimeoutError:
        return made, "none"
    return made, "reply" if isinstance(ch.open_reply(pending, reply), bytes) else "bad"

first, answer = ask(listed_key)
print("valid", answer)
sock.send(first)  # the same datagram again
try:
    sock.recv(70000)
    print("replay reply")
except TimeoutError:
    print("replay none")
print("unknown", ask(os.urandom(32))[1])
flipped = bytearray(ask(listed_key, b"")[0])
flipped[60] ^= 1
print("forged", ask(listed_key, bytes(flipped))[1])
print("garbage", ask(listed_key, os.urandom(300))[1])
print("after", ask(listed_key)[1])
"""


def test_forged_replayed_and_unknown_messages_get_no_answer(
    hitless_nft: tuple[Gateway, LabAgents],
) -> None:
    """At the real agent process, from the gateway's namespace."""
    gw, agents = hitless_nft
    lab = gw.lab
    a = lab.backend("a")
    proc = lab.exec(
        lab.gateway,
        [
            sys.executable,
            "-c",
            _FORGER,
            lab.probe_key.private_b64,
            agent_address(a),
            lab.server_key.public_b64,
        ],
        env=DAEMON_ENV,
        timeout=30,
    )
    assert proc.stdout.split("\n")[:6] == [
        "valid reply",
        "replay none",
        "unknown none",
        "forged none",
        "garbage none",
        "after reply",
    ], proc.stdout + proc.stderr
    assert "Traceback" not in agents.log(a)
    assert _agent(gw, "a")["reachable"]
