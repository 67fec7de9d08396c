"""The pair lab itself: two gateways under keepalived (VRRP), real wireguard-go behind a
static nftables DNAT in both gateways, and the master's death."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from natfail import exitcodes
from natfail.lab import (
    DAEMON_ENV,
    MARKER_DIR,
    PUBLIC_V4,
    PUBLIC_V6,
    WG_RUN_DIR,
    DaemonRunner,
    Pinger,
    cleanup_stale,
    probe_table,
)
from natfail.lab.pair import INSIDE_VIP_V4, INSIDE_VIP_V6, PairGateway, PairLab

ALL_VIPS = {PUBLIC_V4, PUBLIC_V6, INSIDE_VIP_V4, INSIDE_VIP_V6}
TAKEOVER_BOUND = 5.0
"""Seconds from the master's death to the VIPs on the other gateway (advert_int 0.2:
about 0.7 s; loose, for a loaded machine)."""
OUTAGE_BOUND = 6.0
"""Seconds from the master's death to the client's first ping reply through the tunnel."""
RECIPE = Path(__file__).resolve().parents[2] / "etc" / "keepalived.conf"


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def _processes(name: str, needle: str) -> list[int]:
    """Pids of processes called ``name`` whose argv mentions ``needle``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if argv and argv[0].endswith(name) and any(needle in a for a in argv[1:]):
                pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def pair() -> Iterator[PairLab]:
    """A pair lab for the whole module, torn down after it even when tests fail."""
    with PairLab(backends=2) as lab:
        yield lab


@pytest.fixture
def healthy(pair: PairLab) -> Iterator[PairLab]:
    """Both gateways up with keepalived and a master elected; no DNAT, empty conntrack,
    fresh WireGuard sessions, the client on the IPv4 endpoint. DNAT and conntrack are
    cleared after the test, too."""
    for g in pair.gateways:
        if not pair.gateway_up(g):
            pair.revive_gateway(g)
        if not pair.keepalived_running(g):
            pair.start_keepalived(g)
    assert pair.wait_master(10.0) is not None, pair.keepalived_log("gw1")
    pair.set_static_dnat(None, None)
    pair.flush_conntrack()
    pair.set_client_endpoint(4)
    pair.reset_sessions()
    yield pair
    if not pair.closed:
        pair.set_static_dnat(None, None)
        pair.flush_conntrack()


def _conntrack(lab: PairLab, gw: PairGateway, family: str = "ipv4") -> str:
    return lab.exec(gw, ["conntrack", "-L", "-f", family, "-p", "udp"], check=False).stdout


def _takeover(lab: PairLab, family: int) -> tuple[PairGateway, PairGateway, float, float]:
    """Pings through the tunnel every 20 ms and kills the master; returns the old and the
    new master, the seconds from the kill until the VIP moved, and the longest silence
    of the pings (the outage the client saw)."""
    master = lab.master()
    assert master is not None
    target = "fd99::1" if family == 6 else "10.99.0.1"
    pinger = Pinger(lab, interval=0.02, target=target)
    try:
        assert pinger.first_reply_after(time.time(), 5.0) is not None
        killed_at = lab.kill_gateway(master)
        new = lab.wait_master(TAKEOVER_BOUND + 5.0, gw=lab.other(master), interval=0.01)
        moved = time.time() - killed_at
        assert new == lab.other(master), lab.keepalived_log(lab.other(master))
        # a reply already in flight at the kill may still arrive: the outage ends with
        # the first reply through the new master
        after = killed_at + 0.1
        reply = pinger.first_reply_after(after, OUTAGE_BOUND + 5.0)
        last = pinger.last_reply_before(after)
        assert reply is not None, "no reply through the new master"
        assert last is not None
    finally:
        pinger.stop()
    outage = reply - last
    print(f"takeover: VIPs moved {moved:.3f} s after the kill; pings silent for {outage:.3f} s")
    # the kill did cut the client off: the backup needs 3 adverts to notice
    assert outage > 0.2
    return master, new, moved, outage


def test_keepalived_elects_one_master_holding_every_vip(healthy: PairLab) -> None:
    lab = healthy
    master = lab.master()
    assert master is not None
    backup = lab.other(master)
    assert lab.vips(master) == ALL_VIPS
    assert lab.vips(backup) == set()
    assert lab.holders(PUBLIC_V6) == [master]
    assert lab.holders(INSIDE_VIP_V4) == [master]
    # the client resolves the public VIP to the master's MAC, on the shared segment
    assert (
        lab.exec(lab.client, ["ping", "-c", "1", "-W", "2", PUBLIC_V4], check=False).returncode == 0
    )
    assert lab.client_neighbour(PUBLIC_V4) == lab.mac(master)
    ping6 = ["ping", "-6", "-c", "1", "-W", "2", PUBLIC_V6]
    assert lab.exec(lab.client, ping6, check=False).returncode == 0
    assert lab.client_neighbour(PUBLIC_V6) == lab.mac(master)
    # the backends' default route is the inside VIP, on the master
    b = lab.backends[0]
    assert lab.exec(b, ["ping", "-c", "1", "-W", "2", INSIDE_VIP_V4], check=False).returncode == 0
    neigh = json.loads(lab.exec(b, ["ip", "-j", "neigh", "show", "to", INSIDE_VIP_V4]).stdout)
    assert neigh and neigh[0]["lladdr"] == lab.mac(master, master.lan_if)


def test_every_backend_knows_both_probe_keys_and_the_configs_are_valid(pair: PairLab) -> None:
    lab = pair
    keys = [lab.probe_keys[g.name] for g in lab.gateways]
    assert keys[0].public_b64 != keys[1].public_b64
    assert lab.probe_key == keys[0]
    for b in lab.backends:
        peers = lab.backend_show(b).peers
        for key in keys:
            assert peers[key.public_b64].allowed_ips == ()
        assert set(peers[lab.client_key.public_b64].allowed_ips) == {
            "10.99.0.2/32",
            "fd99::2/128",
        }
    for g in lab.gateways:
        text = lab.keepalived_config_path(g).read_text()
        assert f"priority {g.priority}" in text
        assert text.count("state BACKUP") == 2 and text.count("nopreempt") == 2
        assert "advert_int 0.2" in text and "vrrp_version 3" in text
        check = ["keepalived", "-t", "-f", str(lab.keepalived_config_path(g))]
        cp = lab.exec(g, check, check=False)
        assert cp.returncode == 0, cp.stderr


def test_the_operators_recipe_is_valid_keepalived() -> None:
    """etc/keepalived.conf passes `keepalived -t` where its interfaces exist."""
    ns = f"nfkt{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(
            ["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
            check=True,
        )
        cp = subprocess.run(
            ["ip", "netns", "exec", ns, "keepalived", "-t", "-f", str(RECIPE)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert cp.returncode == 0, cp.stderr
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    text = RECIPE.read_text()
    for needle in ("vrrp_sync_group", "nopreempt", "vrrp_garp_master_refresh", "unicast_peer"):
        assert needle in text


def test_takeover_keeps_the_tunnel_without_a_rehandshake(healthy: PairLab) -> None:
    lab = healthy
    a = lab.backends[0]
    lab.set_static_dnat(a, None)  # the same backend behind both gateways
    assert lab.client_ping(count=3, interval=0.1)
    master = lab.master()
    assert master is not None
    assert f"src={a.v4} dst={lab.client.v4} sport=51820" in _conntrack(lab, master)
    assert "sport=51820" not in _conntrack(lab, lab.other(master))
    handshake = lab.latest_handshake(a)
    assert handshake > 0
    before = lab.transfers()

    old, new, moved, outage = _takeover(lab, 4)
    assert moved < TAKEOVER_BOUND
    assert outage < OUTAGE_BOUND
    # every VIP moved; the dead gateway is unreachable (links down)
    assert lab.vips(new) == ALL_VIPS
    assert lab.holders(PUBLIC_V6) == [new]
    assert not lab.gateway_up(old)
    # the client's neighbour entry follows the gratuitous ARP
    assert lab.client_neighbour(PUBLIC_V4) == lab.mac(new)
    # preserve mode: the next packet built the flow on the new master, to the same
    # backend, and the session went on (no new handshake, the endpoint unchanged)
    assert f"src={a.v4} dst={lab.client.v4} sport=51820" in _conntrack(lab, new)
    assert lab.latest_handshake(a) == handshake
    assert lab.client_endpoint() == f"{PUBLIC_V4}:51820"
    assert lab.carrying_backends(before) == ["a"]

    # the old master comes back: nopreempt, it stays a backup and claims nothing
    lab.revive_gateway(old)
    lab.start_keepalived(old)
    time.sleep(2.0)
    assert lab.master() == new
    assert lab.vips(old) == set()
    assert lab.client_ping(count=2, interval=0.1)


def test_ipv6_endpoint_survives_the_takeover(healthy: PairLab) -> None:
    lab = healthy
    b = lab.backends[1]
    lab.set_static_dnat(None, b)
    lab.set_client_endpoint(6)
    lab.client_rehandshake()
    assert lab.client_ping("fd99::1", count=3, interval=0.1)
    handshake = lab.latest_handshake(b)
    master = lab.master()
    assert master is not None
    assert lab.client_neighbour(PUBLIC_V6) == lab.mac(master)

    _, new, moved, outage = _takeover(lab, 6)
    assert moved < TAKEOVER_BOUND
    assert outage < OUTAGE_BOUND
    assert lab.holders(PUBLIC_V6) == [new]
    assert lab.client_neighbour(PUBLIC_V6) == lab.mac(new)
    assert f"src={b.v6} dst={lab.client.v6} sport=51820" in _conntrack(lab, new, "ipv6")
    assert lab.latest_handshake(b) == handshake
    assert lab.client_endpoint() == f"[{PUBLIC_V6}]:51820"


def test_a_clean_stop_hands_over_at_once(healthy: PairLab) -> None:
    lab = healthy
    master = lab.master()
    assert master is not None
    lab.stop_keepalived(master)
    assert not lab.keepalived_running(master)
    # priority 0 adverts: no master down interval to wait for
    assert lab.wait_master(2.0, gw=lab.other(master)) == lab.other(master)
    assert lab.vips(master) == set()
    lab.start_keepalived(master)
    time.sleep(1.0)
    assert lab.master() == lab.other(master)


def test_write_config_is_per_gateway(pair: PairLab) -> None:
    lab = pair
    with pytest.raises(ValueError, match="gw="):
        lab.write_config()
    texts = {}
    for g in lab.gateways:
        path = lab.write_config(gw=g, agents=True)
        assert path.parent == lab.gateway_dir(g)
        text = path.read_text()
        texts[g.name] = text
        assert str(lab.probe_keys[g.name].file) in text
        assert f'socket = "{lab.gateway_dir(g) / "natfail.sock"}"' in text
        assert 'agent = "10.0.0.2:51821"' in text and 'agent = "10.0.0.3:51821"' in text
        assert "pair" not in text
        ctl = [sys.executable, "-m", "natfail.cli.ctl", "check-config", str(path)]
        cp = subprocess.run(
            ctl, capture_output=True, text=True, check=False, env={**os.environ, **DAEMON_ENV}
        )
        assert cp.returncode == exitcodes.OK, cp.stdout + cp.stderr
    assert texts["gw1"] != texts["gw2"]
    paired = lab.write_config(lab.dir / "paired.toml", gw="gw2", pair=True)
    assert "[daemon]\n" in paired.read_text() and "\npair = true\n" in paired.read_text()


@contextlib.contextmanager
def _daemons(lab: PairLab) -> Iterator[dict[str, DaemonRunner]]:
    agents = lab.agents()
    agents.start_all()
    runners: dict[str, DaemonRunner] = {}
    try:
        for g in lab.gateways:
            config = lab.write_config(gw=g, agents=True, extra_service=probe_table(0.3, 0.2, 1, 2))
            runner = DaemonRunner(lab, config, ns=g)
            runners[g.name] = runner
            runner.start()
            assert runner.wait_ready(10.0), runner.logs()
        yield runners
    finally:
        for runner in runners.values():
            runner.stop()
        agents.stop_all()
        for g in lab.gateways:
            lab.exec(g, ["nft", "delete", "table", "inet", "natfail"], check=False)
    for runner in runners.values():
        assert "Traceback" not in runner.logs(), runner.logs()
    for b in lab.backends:
        assert "Traceback" not in agents.log(b), agents.log(b)


def test_natfail_runs_in_both_gateways_with_agents_obeying_both(healthy: PairLab) -> None:
    """Today's natfail (no pair mode) in each gateway, with its own probe key: both see
    every backend up through their own probes and pick the same one."""
    lab = healthy
    with _daemons(lab) as runners:
        for name, runner in runners.items():
            assert runner.wait_active("a", 15.0), f"{name}: {runner.logs()}"
            assert runner.backend_state("b") == "up"
            # a backend answers the probe of a key it has as a peer, and only then
            assert runner.backend_state("a") == "up"
        lab.client_rehandshake()
        assert lab.client_ping(count=3, interval=0.1, timeout=8.0)


_ORPHAN = textwrap.dedent(
    """
    import json, time
    from natfail.lab.pair import PairLab
    lab = PairLab(backends=1, prefix="nfzp", clean_stale=False)
    assert lab.wait_master(10) is not None
    print(json.dumps({"id": lab.id, "namespaces": lab.namespaces,
                      "ifnames": sorted(lab.ifnames), "dir": str(lab.dir)}), flush=True)
    time.sleep(60)
    """
)


def test_close_and_cleanup_stale_leave_nothing() -> None:
    lab = PairLab(backends=1, prefix="nfzq", clean_stale=False)
    namespaces, lab_dir = list(lab.namespaces), lab.dir
    assert lab.wait_master(10.0) is not None
    assert _processes("keepalived", str(lab_dir))
    lab.close()
    lab.close()  # idempotent
    assert not set(namespaces) & _netns()
    assert _processes("keepalived", str(lab_dir)) == []
    assert not lab_dir.exists() and not (MARKER_DIR / f"{lab.id}.json").exists()

    # an owner that died without cleaning up: keepalived and wireguard-go outlive it
    proc = subprocess.Popen(
        [sys.executable, "-c", _ORPHAN],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, **DAEMON_ENV},
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
    assert set(info["namespaces"]) <= _netns()
    assert len(_processes("keepalived", info["dir"])) >= 2
    assert cleanup_stale("nfzp") == [info["id"]]
    assert not set(info["namespaces"]) & _netns()
    assert _processes("keepalived", info["dir"]) == []
    assert [i for i in info["ifnames"] if (WG_RUN_DIR / f"{i}.sock").exists()] == []
    assert not Path(info["dir"]).exists()


def test_unicast_adverts_elect_and_take_over() -> None:
    with PairLab(backends=1, unicast=True, ipv6=False, keepalived=False) as lab:
        assert lab.master() is None
        for g in lab.gateways:
            text = lab.write_keepalived_config(g).read_text()
            assert f"unicast_src_ip {g.wan_v4}" in text
            assert lab.other(g).lan_v4 in text
            assert "virtual_ipaddress_excluded" not in text
        lab.start_keepalived(lab.gw1)
        lab.start_keepalived(lab.gw2)
        assert "unicast" in lab.keepalived_log(lab.gw1)
        master = lab.wait_master(10.0)
        assert master is not None
        assert lab.vips(master) == {PUBLIC_V4, INSIDE_VIP_V4}
        lab.set_static_dnat(lab.backends[0], None)
        assert lab.client_ping(count=2, interval=0.1)
        _, new, moved, _ = _takeover(lab, 4)
        assert moved < TAKEOVER_BOUND
        assert lab.vips(new) == {PUBLIC_V4, INSIDE_VIP_V4}
