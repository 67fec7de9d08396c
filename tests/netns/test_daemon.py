"""The daemon as an operator runs it: `natfail -c FILE` in the gateway's
namespace, driven with `natfailctl`, with real wireguard-go and real traffic.
Every test runs once per dataplane."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from natfail.lab import CLIENT_TUNNEL_V4, PUBLIC_V4, Lab, wait_until
from tests.netns.gateway import FALL, INTERVAL, KINDS, TIMEOUT, Gateway, running


@pytest.fixture(params=KINDS)
def gw(request: pytest.FixtureRequest, fresh: Lab) -> Iterator[Gateway]:
    with running(fresh, request.param) as gateway:
        yield gateway


def _tunnel(lab: Lab) -> bool:
    lab.client_rehandshake()
    return lab.client_ping(count=2, interval=0.1, timeout=3)


def test_failover_within_the_bound(gw: Gateway) -> None:
    lab = gw.lab
    assert _tunnel(lab)
    assert "10.0.0.2" in gw.conntrack()
    killed = time.time()
    lab.backend("a").stop()
    assert gw.wait_active("b", 10), gw.logs()
    # The daemon's own record of the switch (`natfailctl events`), not when
    # our polling of `natfailctl status` happened to see it. The record comes
    # after the conntrack cleanup, so status may show b first.
    assert wait_until(lambda: bool(gw.switches("a", "b")), 5), gw.logs()
    (record,) = gw.switches("a", "b")
    assert record["reason"] == "failover" and record["service"] == "wg0"
    took = record["unix_time"] - killed
    assert "switch service=wg0 from=a to=b reason=failover" in gw.logs()
    bound = FALL * INTERVAL + TIMEOUT + 0.3
    assert took <= bound, f"switched after {took:.2f} s, bound {bound:.2f} s"
    # no client flow (through the public address) is left on a; the gateway's own
    # probes of the dead backend are not client flows
    client_flows = [line for line in gw.conntrack().splitlines() if PUBLIC_V4 in line]
    assert not [line for line in client_flows if "10.0.0.2" in line], gw.conntrack()
    status = gw.status()
    assert status["failovers"] == 1
    assert gw.backend_state("a") == "down"
    # the client's own WireGuard finds the new backend: no help from the test
    assert wait_until(lambda: lab.client_ping(count=1, interval=0.2, timeout=1), 30, 0.1)
    assert lab.client_endpoint() == f"{lab.public_v4}:{lab.public_port}"


def test_manual_switch_pins_and_release(gw: Gateway) -> None:
    lab = gw.lab
    proc = gw.ctl("switch", "wg0", "b")
    assert proc.returncode == 0, proc.stderr
    status = gw.status()
    assert status["active"] == "b" and status["pinned"] is True
    before = lab.transfers()
    assert _tunnel(lab)
    assert lab.carrying_backends(before) == ["b"]
    assert gw.ctl("release", "wg0").returncode == 0
    status = gw.status()
    assert status["pinned"] is False and status["active"] == "b"  # sticky


def test_a_standby_that_holds_a_session_cannot_take_the_client_flow(gw: Gateway) -> None:
    """A standby still holding a session would, once the client's own entry has
    expired, send its next packet out as public:port and take the client's flow.
    The fence drops what a standby starts: the client stays with the active one."""
    lab = gw.lab
    b = lab.backend("b")
    assert gw.ctl("switch", "wg0", "b").returncode == 0
    assert _tunnel(lab)  # b now holds a session with the client
    assert gw.ctl("switch", "wg0", "a").returncode == 0
    lab.flush_conntrack()  # the client's flow expired
    ping = lab.exec(b, ["ping", "-c", "1", "-W", "2", CLIENT_TUNNEL_V4], check=False)
    assert ping.returncode != 0, ping.stdout
    assert lab.client_endpoint() == f"{lab.public_v4}:{lab.public_port}"
    assert gw.status()["active"] == "a"
    assert wait_until(lambda: lab.client_ping(count=1, interval=0.2, timeout=1), 30, 0.1), (
        gw.conntrack()
    )
    before = lab.transfers()
    assert lab.client_ping(count=2, interval=0.1, timeout=3)
    assert lab.carrying_backends(before) == ["a"]


def test_switch_to_a_dead_backend_is_refused_unless_forced(gw: Gateway) -> None:
    gw.lab.backend("b").stop()
    assert wait_until(lambda: gw.backend_state("b") == "down", 5), gw.logs()
    proc = gw.ctl("switch", "wg0", "b")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "natfailctl: wg0: backend b is down; use --force to switch anyway"
    ]
    assert gw.status()["active"] == "a"
    assert gw.ctl("switch", "wg0", "b", "--force").returncode == 0
    assert gw.status()["active"] == "b"
    assert gw.ctl("switch", "wg0", "nope").returncode == 1
    assert gw.ctl("switch", "nope", "a").returncode == 1


def test_drain_of_the_active_backend_moves_traffic(gw: Gateway) -> None:
    lab = gw.lab
    assert gw.ctl("drain", "wg0", "a").returncode == 0
    status = gw.status()
    assert status["active"] == "b"
    assert gw.backend_state("a") == "drained"
    before = lab.transfers()
    assert _tunnel(lab)
    assert lab.carrying_backends(before) == ["b"]
    assert gw.ctl("undrain", "wg0", "a").returncode == 0
    assert gw.status()["active"] == "b"  # sticky: no move back


def test_bad_reload_is_refused_and_the_old_config_stays(gw: Gateway) -> None:
    good = gw.config.read_text()
    gw.config.write_text(good.replace("priority = 100", "priority = 'high'"))
    proc = gw.ctl("reload")
    assert proc.returncode == 2
    assert "service[0].backend[0].priority" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert gw.status()["active"] == "a"
    # SIGHUP with the bad file: logged, nothing changes
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "reload refused" in gw.logs(), 5)
    assert gw.status()["active"] == "a"
    # a good reload that removes the active backend moves traffic
    gw.config.write_text(
        good.replace(
            'name = "a"\naddress = "10.0.0.2:51820"', 'name = "c"\naddress = "10.0.0.2:51820"'
        )
    )
    proc = gw.ctl("reload")
    assert proc.returncode == 0, proc.stderr
    assert gw.wait_active("b", 5) or gw.wait_active("c", 5), gw.logs()


def test_sigkill_and_restart_keep_traffic_and_conntrack(gw: Gateway) -> None:
    lab = gw.lab
    assert _tunnel(lab)
    flows_before = [line for line in gw.conntrack().splitlines() if "10.0.0.2" in line]
    assert flows_before
    pinger = lab.popen(
        lab.client,
        ["ping", "-n", "-q", "-i", "0.05", "-c", "60", "10.99.0.1"],
        stdout=subprocess.PIPE,
    )
    time.sleep(0.5)
    gw.stop(signal.SIGKILL)
    time.sleep(0.5)
    gw.start()
    assert gw.status()["active"] == "a"
    out, _ = pinger.communicate(timeout=30)
    assert " 0% packet loss" in out, out
    assert "adopted the installed rule to a" in gw.logs()
    flows_after = [line for line in gw.conntrack().splitlines() if "10.0.0.2" in line]
    assert flows_after, "the restart flushed conntrack"


def test_flush_ruleset_is_repaired(gw: Gateway) -> None:
    lab = gw.lab
    if gw.firewall == "nftables":
        lab.exec(lab.gateway, ["nft", "flush", "ruleset"])
    else:
        lab.exec(lab.gateway, ["iptables-legacy", "-t", "nat", "-F"])
    assert wait_until(lambda: "repaired natfail's firewall rules" in gw.logs(), 5), gw.logs()
    assert _tunnel(lab)


def test_junk_on_the_control_socket(gw: Gateway) -> None:
    path = gw.lab.dir / "natfail.sock"
    for junk in (b"\x00\xff garbage\n", b'{"command": [1]}\n', b"x" * 100_000, b"\n"):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            try:
                sock.sendall(junk)
                sock.shutdown(socket.SHUT_WR)
                reply = sock.recv(65536)
            except OSError:
                reply = b""
            if reply:
                assert json.loads(reply)["ok"] is False
    assert gw.proc is not None and gw.proc.poll() is None
    assert gw.status()["active"] == "a"
