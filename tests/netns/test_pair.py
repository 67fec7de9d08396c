"""Two natfail gateways with `[daemon] pair = true` under keepalived, real
wireguard-go and `natfail agent` on every backend: the gateway holding the
public address decides, the other follows what the agents recorded, and
losing a gateway costs the client only the VRRP takeover.

The bounds here are loose (a loaded 2-core machine): what they tell apart is
a takeover that keeps the client's session (about 0.7 s here, see
bench/bench_pair.py) from one that needs a new handshake (5 to 15 s)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest

from natfail.lab import DaemonRunner, Pinger, probe_table, wait_until
from natfail.lab.pair import PairAgents, PairGateway, PairLab

INTERVAL, TIMEOUT, RISE, FALL = 0.3, 0.2, 1, 2
OUTAGE_BOUND = 4.0
"""Seconds of silence of the client's pings across a takeover."""


@pytest.fixture(scope="module")
def pair() -> Iterator[PairLab]:
    with PairLab(backends=2, prefix="nfp") as lab:
        yield lab


def _v6(text: str, lab: PairLab) -> str:
    """The config's service on the IPv6 VIP and the backends' IPv6 addresses."""
    text = text.replace(f'public = "{lab.public_v4}:', f'public = "[{lab.public_v6}]:')
    for b in lab.backends:
        text = text.replace(f'address = "{b.address}"', f'address = "{b.address_v6}"')
    return text


class Pair:
    """Both gateways' daemons (pair mode) and the agents, for one test."""

    def __init__(self, lab: PairLab, agents: PairAgents, *, family: int = 4) -> None:
        self.lab = lab
        self.agents = agents
        self.runners: dict[str, DaemonRunner] = {}
        for g in lab.gateways:
            config = lab.write_config(
                gw=g,
                agents=True,
                pair=True,
                extra_service=probe_table(INTERVAL, TIMEOUT, RISE, FALL),
            )
            if family == 6:
                config.write_text(_v6(config.read_text(), lab))
            self.runners[g.name] = DaemonRunner(lab, config, ns=g)

    def runner(self, gw: PairGateway) -> DaemonRunner:
        return self.runners[gw.name]

    def start(self, gw: PairGateway, *, fresh: bool = False) -> None:
        """``fresh``: a rebooted machine, no rules and no state."""
        if fresh:
            self.lab.exec(gw, ["nft", "delete", "table", "inet", "natfail"], check=False)
            state = self.lab.gateway_dir(gw) / "state"
            for name in ("state.json", "clients.json"):
                (state / name).unlink(missing_ok=True)
        runner = self.runner(gw)
        runner.start()
        assert runner.wait_ready(15), runner.logs()

    def service(self, gw: PairGateway) -> dict[str, Any]:
        return self.runner(gw).service()

    def settled(self, timeout: float = 15.0) -> PairGateway:
        """Waits until the master decides, the backup follows and both carry the
        same backend; returns the master."""
        master = self.lab.wait_master(timeout)
        assert master is not None
        backup = self.lab.other(master)

        def agreed() -> bool:
            m, b = self.service(master), self.service(backup)
            return (
                m["role"] == "decide"
                and b["role"] == "follow"
                and m["active"] is not None
                and m["active"] == b["active"]
            )

        assert wait_until(agreed, timeout, 0.1), self.logs()
        return master

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{r.logs()[-4000:]}" for n, r in self.runners.items())

    def stop(self) -> None:
        for runner in self.runners.values():
            with contextlib.suppress(Exception):
                runner.stop()


@pytest.fixture
def gateways(pair: PairLab) -> Iterator[Pair]:
    """Both gateways up under keepalived with natfail in pair mode, fresh
    (no rules, no state), the agents running, the client's tunnel up."""
    yield from _gateways(pair, 4)


@pytest.fixture
def gateways_v6(pair: PairLab) -> Iterator[Pair]:
    """The same with the service on the IPv6 VIP, the client on IPv6."""
    yield from _gateways(pair, 6)


def _gateways(pair: PairLab, family: int) -> Iterator[Pair]:
    lab = pair
    for g in lab.gateways:
        if not lab.gateway_up(g):
            lab.revive_gateway(g)
        if not lab.keepalived_running(g):
            lab.start_keepalived(g)
    assert lab.wait_master(10.0) is not None
    lab.set_static_dnat(None, None)
    lab.flush_conntrack()
    lab.set_client_endpoint(family)
    for b in lab.backends:
        if not b.running:
            b.start()
    lab.reset_sessions()
    agents = lab.agents()
    agents.start_all()
    both = Pair(lab, agents, family=family)
    try:
        for g in lab.gateways:
            both.start(g, fresh=True)
        both.settled()
        lab.client_rehandshake()
        assert lab.client_ping(count=2, interval=0.1, timeout=5), both.logs()
        yield both
    finally:
        both.stop()
        agents.stop_all()
    for name, runner in both.runners.items():
        assert "Traceback" not in runner.logs(), f"{name}: {runner.logs()}"
    for g in lab.gateways:
        lab.exec(g, ["nft", "delete", "table", "inet", "natfail"], check=False)


def _takeover(both: Pair) -> tuple[PairGateway, float]:
    """Pings through the tunnel every 20 ms, crashes the master; returns the
    new master and the longest silence the client saw."""
    lab = both.lab
    master = lab.master()
    assert master is not None
    pinger = Pinger(lab, interval=0.02)
    try:
        assert pinger.first_reply_after(time.time(), 5.0) is not None
        killed = lab.kill_gateway(master)
        new = lab.wait_master(10.0, gw=lab.other(master))
        assert new is not None, lab.keepalived_log(lab.other(master))
        reply = pinger.first_reply_after(killed + 0.1, 30.0)
        last = pinger.last_reply_before(killed + 0.1)
    finally:
        pinger.stop()
    assert reply is not None and last is not None, both.logs()
    return new, reply - last


def test_the_master_decides_and_the_backup_follows(gateways: Pair) -> None:
    lab = gateways.lab
    master = gateways.settled()
    backup = lab.other(master)
    m, b = gateways.service(master), gateways.service(backup)
    assert m["active"] == b["active"] == "a"
    # the follower's own probes run: its status shows health
    assert wait_until(
        lambda: {x["state"] for x in gateways.service(backup)["backends"]} == {"up"}, 10, 0.1
    ), gateways.logs()
    # a follower refuses operator commands, naming where to run them
    proc = gateways.runner(backup).ctl("switch", "wg0", "b")
    assert proc.returncode == 1 and "follows" in proc.stderr, proc.stderr
    # the decider's switch is followed within a probe interval or so
    assert gateways.runner(master).ctl("switch", "wg0", "b").returncode == 0
    assert wait_until(lambda: gateways.service(backup)["active"] == "b", 5, 0.05)
    assert "role decide" in gateways.runner(master).ctl("status").stdout


def test_a_master_crash_costs_the_client_only_the_takeover(gateways: Pair) -> None:
    lab = gateways.lab
    a = lab.backend("a")
    handshake = lab.latest_handshake(a)
    started = time.time()
    new, outage = _takeover(gateways)
    assert outage < OUTAGE_BOUND, (outage, gateways.logs())
    # The client's traffic does not wait for natfail to see the address (its
    # rules already match); the role follows within a netlink event.
    assert wait_until(lambda: gateways.service(new)["role"] == "decide", 5, 0.05), gateways.logs()
    assert gateways.service(new)["active"] == "a"
    # a takeover changes no rule and no session
    assert gateways.runner(new).switches(after=started) == []
    assert lab.latest_handshake(a) == handshake
    assert lab.client_endpoint() == f"{lab.public_v4}:{lab.public_port}"
    assert "this gateway now decides; keeping backend a" in gateways.runner(new).logs()


def test_a_rebooted_backup_follows_the_master_onto_a_non_preferred_backend(
    gateways: Pair,
) -> None:
    """The 46 s story: after a move to b, the backup reboots with no rules and
    no state; a natfail deciding alone would pick a by priority, and when the
    master died the client would wait for a new handshake."""
    lab = gateways.lab
    master = gateways.settled()
    backup = lab.other(master)
    assert gateways.runner(master).ctl("switch", "wg0", "b").returncode == 0
    assert wait_until(lambda: gateways.service(backup)["active"] == "b", 5, 0.05)
    lab.client_rehandshake()
    assert lab.client_ping(count=2, interval=0.1, timeout=5)
    gateways.runner(backup).stop()
    gateways.start(backup, fresh=True)
    assert wait_until(lambda: gateways.service(backup)["active"] == "b", 10, 0.1), gateways.logs()
    b = lab.backend("b")
    handshake = lab.latest_handshake(b)
    new, outage = _takeover(gateways)
    assert new == backup
    assert outage < OUTAGE_BOUND, (outage, gateways.logs())
    assert gateways.service(new)["active"] == "b"
    assert lab.latest_handshake(b) == handshake


def test_a_backup_that_lost_its_path_to_the_active_backend_keeps_it(gateways: Pair) -> None:
    """Its own probes said a was down for a while; at the takeover that view is
    stale, and a gets a fresh verdict instead of a move."""
    lab = gateways.lab
    master = gateways.settled()
    backup = lab.other(master)
    a = lab.backend("a")
    cut = _path_cut(a.v4)
    lab.exec(backup, ["nft", "-f", "-"], input=cut)
    try:
        assert wait_until(lambda: _state(gateways, backup, "a") == "down", 10, 0.1)
        time.sleep(1.0)
        assert gateways.service(backup)["active"] == "a"  # a follower never moves
    finally:
        lab.exec(backup, ["nft", "delete", "table", "inet", "pathcut"])
    started = time.time()
    new, outage = _takeover(gateways)
    assert new == backup
    assert outage < OUTAGE_BOUND, (outage, gateways.logs())
    time.sleep(2 * INTERVAL * FALL + 0.5)
    assert gateways.service(new)["active"] == "a", gateways.logs()
    assert gateways.runner(new).switches(after=started) == []


def _path_cut(address: str) -> str:
    """An nft script that drops what a backend's WireGuard sends this gateway
    (dropping on the way out would fail the probe's send locally, which is
    never counted against a backend)."""
    return (
        "table inet pathcut {\n chain in {\n  type filter hook input priority 0;\n"
        f"  ip saddr {address} udp sport 51820 drop\n }}\n}}\n"
    )


def _state(both: Pair, gw: PairGateway, backend: str) -> str:
    return str(both.runner(gw).backend_state(backend))


def test_split_brain_ends_on_one_backend(gateways: Pair) -> None:
    """VRRP adverts dropped for a few seconds: both gateways hold the addresses
    and decide; one of them, cut from a, moves to b. When the adverts flow
    again one steps back and both carry the same backend."""
    lab = gateways.lab
    master = gateways.settled()
    backup = lab.other(master)
    a = lab.backend("a")
    block = (
        "table inet vrrpcut {\n chain in {\n  type filter hook input priority 0;\n"
        "  ip protocol vrrp drop\n  ip6 nexthdr vrrp drop\n }\n}\n"
    )
    cut = _path_cut(a.v4)
    lab.exec(backup, ["nft", "-f", "-"], input=block)
    try:
        assert wait_until(lambda: gateways.service(backup)["role"] == "decide", 10, 0.05)
        lab.exec(backup, ["nft", "-f", "-"], input=cut)
        assert wait_until(lambda: gateways.service(backup)["active"] == "b", 10, 0.1), (
            gateways.logs()
        )
        time.sleep(1.0)
    finally:
        lab.exec(backup, ["nft", "delete", "table", "inet", "pathcut"], check=False)
        lab.exec(backup, ["nft", "delete", "table", "inet", "vrrpcut"], check=False)
    assert lab.wait_master(10) is not None

    def one_backend() -> bool:
        m = lab.master()
        if m is None:
            return False
        ms, bs = gateways.service(m), gateways.service(lab.other(m))
        return bool(
            ms["role"] == "decide" and bs["role"] == "follow" and ms["active"] == bs["active"]
        )

    assert wait_until(one_backend, 15, 0.1), gateways.logs()
    lab.client_rehandshake()
    assert wait_until(lambda: lab.client_ping(count=1, interval=0.2, timeout=1), 20, 0.1)
    assert lab.client_endpoint() == f"{lab.public_v4}:{lab.public_port}"


def test_a_takeover_in_the_middle_of_a_switch(gateways: Pair) -> None:
    """The master dies right after it switched: the new master carries the
    backend the agents recorded last, and the client comes back."""
    lab = gateways.lab
    master = gateways.settled()
    backup = lab.other(master)
    assert gateways.runner(master).ctl("switch", "wg0", "b").returncode == 0
    lab.kill_gateway(master)
    assert lab.wait_master(10.0, gw=backup) is not None
    assert wait_until(lambda: gateways.service(backup)["role"] == "decide", 10, 0.05)
    time.sleep(1.0)
    active = gateways.service(backup)["active"]
    assert active in ("a", "b")
    recorded = {e["name"]: e["agent"]["reachable"] for e in gateways.service(backup)["backends"]}
    assert recorded == {"a": True, "b": True}
    lab.client_rehandshake()
    assert wait_until(lambda: lab.client_ping(count=1, interval=0.2, timeout=1), 15, 0.1)
    before = lab.transfers()
    assert lab.client_ping(count=2, interval=0.1, timeout=3)
    assert lab.carrying_backends(before) == [active]


@pytest.mark.parametrize("which", ["master", "backup"])
def test_a_reload_on_either_gateway_moves_nothing(gateways: Pair, which: str) -> None:
    lab = gateways.lab
    master = gateways.settled()
    gw = master if which == "master" else lab.other(master)
    before = {g.name: gateways.service(g)["active"] for g in lab.gateways}
    proc = gateways.runner(gw).ctl("reload")
    assert proc.returncode == 0, proc.stderr
    time.sleep(1.0)
    assert {g.name: gateways.service(g)["active"] for g in lab.gateways} == before
    assert gateways.service(gw)["role"] == ("decide" if gw == master else "follow")
    assert gateways.runner(gw).switches(after=time.time() - 1.0) == []
    assert lab.client_ping(count=2, interval=0.1, timeout=3)


def test_ipv6_vips_take_over_too(gateways_v6: Pair) -> None:
    gateways = gateways_v6
    lab = gateways.lab
    new, outage = _takeover(gateways)
    assert outage < OUTAGE_BOUND, (outage, gateways.logs())
    assert gateways.service(new)["active"] == "a"
    assert lab.client_endpoint() == f"[{lab.public_v6}]:{lab.public_port}"
