"""Faults injected into a running gateway, with real WireGuard traffic.

Every case ends the same way: the tunnel works, and the gateway's conntrack
table holds no client flow towards a backend other than the active one (a
stale entry is what keeps clients on a dead server). Every case runs with
nftables; the cases that touch the rules themselves run with iptables too."""

from __future__ import annotations

import base64
import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from natfail.core import tai64n
from natfail.io import timestamps
from natfail.lab import Lab, wait_until
from tests.netns.gateway import Gateway

STREAM = Path(__file__).with_name("stream.py")


BOTH = pytest.mark.parametrize("firewall", ["nftables", "iptables"])


@pytest.fixture
def firewall() -> str:
    return "nftables"


@pytest.fixture
def gw(fresh: Lab, firewall: str) -> Iterator[Gateway]:
    gateway = Gateway(fresh, firewall)
    gateway.remove_rules()
    (fresh.dir / "state" / "state.json").unlink(missing_ok=True)
    gateway.start()
    assert gateway.wait_active("a"), gateway.logs()
    yield gateway
    status = gateway.ctl("status", "--json").stdout + gateway.ctl("status").stdout
    gateway.stop()
    logs = gateway.logs()
    assert "Traceback" not in logs, logs
    # no key, in any spelling, in the daemon's log or its status, whatever the fault
    secrets = [fresh.probe_key.private_b64, fresh.server_key.private_b64]
    secrets += [base64.b64decode(k).hex() for k in secrets]
    for secret in secrets:
        assert secret not in logs and secret not in status
    gateway.remove_rules()


def stale_flows(gw: Gateway) -> list[str]:
    """Client flows (through the public address) towards a backend that is not the active
    one, in either direction."""
    active = gw.status()["active"]
    others = [b.v4 for b in gw.lab.backends if b.name != active]
    public = gw.lab.public_v4
    return [
        line
        for line in gw.conntrack().splitlines()
        if public in line and any(f"src={ip} " in line or f"dst={ip} " in line for ip in others)
    ]


def tunnel_ends_up_working(gw: Gateway) -> None:
    lab = gw.lab
    lab.client_rehandshake()
    assert wait_until(lambda: lab.client_ping(count=2, interval=0.1, timeout=2), 20, 0.1), gw.logs()
    active = gw.status()["active"]
    before = lab.transfers()
    assert lab.client_ping(count=2, interval=0.1, timeout=3)
    assert lab.carrying_backends(before) == [active]
    assert stale_flows(gw) == [], gw.conntrack()


def dnat_targets(gw: Gateway) -> list[str]:
    """The backends natfail's DNAT sends the public endpoint to (one element of the
    map, or one iptables rule, per target)."""
    by_ip = {b.v4: b.name for b in gw.lab.backends}
    if gw.firewall == "iptables":
        rules = gw.lab.exec(
            gw.lab.gateway, ["iptables-legacy", "-t", "nat", "-S", "NATFAIL-PRE"]
        ).stdout
        targets = re.findall(r"--to-destination (\S+):\d+", rules)
        return [by_ip.get(ip, ip) for ip in targets]
    out = gw.lab.exec(
        gw.lab.gateway, ["nft", "-j", "list", "map", "inet", "natfail", "dnat4"]
    ).stdout
    elements = next(item["map"] for item in json.loads(out)["nftables"] if "map" in item).get(
        "elem", []
    )
    return [by_ip.get(str(target), str(target)) for _key, target in elements]


def wait_state(gw: Gateway, name: str, state: str, timeout: float = 10) -> None:
    assert wait_until(lambda: gw.backend_state(name) == state, timeout), gw.status()


def test_standby_flaps_and_the_active_stays(gw: Gateway) -> None:
    b = gw.lab.backend("b")
    for _ in range(3):
        b.stop()
        wait_state(gw, "b", "down")
        b.start()
        wait_state(gw, "b", "up")
        assert gw.status()["active"] == "a"
    assert gw.status()["failovers"] == 0
    tunnel_ends_up_working(gw)


def test_active_flaps_with_sticky_failback_moves_at_most_once(gw: Gateway) -> None:
    a = gw.lab.backend("a")
    for _ in range(3):
        a.stop()
        time.sleep(0.8)  # longer than fall * interval: a is seen down at least once
        a.start()
        time.sleep(0.5)
    wait_state(gw, "a", "up")
    status = gw.status()
    assert status["failovers"] <= 1, status
    assert status["active"] == "b"
    tunnel_ends_up_working(gw)


@BOTH
def test_every_backend_down_keeps_the_last_rule(gw: Gateway) -> None:
    lab = gw.lab
    lab.backend("b").stop()
    wait_state(gw, "b", "down")
    lab.backend("a").stop()
    wait_state(gw, "a", "down")
    time.sleep(1.0)
    assert gw.status()["active"] == "a"
    assert dnat_targets(gw) == ["a"], "the last rule must stay"
    lab.backend("b").start()  # the first one back
    assert gw.wait_active("b", 10), gw.logs()
    assert dnat_targets(gw) == ["b"]
    tunnel_ends_up_working(gw)


def test_backend_with_the_wrong_key_is_down_and_says_why(gw: Gateway) -> None:
    lab = gw.lab
    b = lab.backend("b")
    wrong = lab.dir / "wrong.key"
    wrong.unlink(missing_ok=True)
    wrong.write_text(base64.b64encode(bytes(range(1, 33))).decode() + "\n")
    wrong.chmod(0o600)
    lab.exec(b, ["wg", "set", b.wg_if, "private-key", str(wrong)])
    try:
        wait_state(gw, "b", "down")
        reason = next(x for x in gw.status()["backends"] if x["name"] == "b")["reason"]
        assert reason and reason != "ok", reason
        assert gw.status()["active"] == "a"
        # the misconfigured backend is refused as a target, too
        assert gw.ctl("switch", "wg0", "b").returncode == 1
    finally:
        b.stop()
        b.start()
    wait_state(gw, "b", "up")
    tunnel_ends_up_working(gw)


@BOTH
def test_cut_path_to_the_active_fails_over(gw: Gateway) -> None:
    lab = gw.lab
    a = lab.backend("a")
    if not lab.client_ping(count=1, timeout=3):
        tunnel_ends_up_working(gw)
    lab.exec(
        a,
        ["nft", "-f", "-"],
        input=(
            "table ip cut {\n chain in {\n  type filter hook input priority -300; policy accept;\n"
            "  udp dport 51820 drop\n }\n}\n"
        ),
    )
    try:
        assert gw.wait_active("b", 10), gw.logs()
        assert a.running  # its process lives; only the path is gone
        tunnel_ends_up_working(gw)
    finally:
        lab.exec(a, ["nft", "delete", "table", "ip", "cut"], check=False)


@BOTH
def test_sigkill_in_the_middle_of_a_switch_converges(gw: Gateway) -> None:
    lab = gw.lab
    if not lab.client_ping(count=1, timeout=3):
        tunnel_ends_up_working(gw)
    sock = Path(gw.config.read_text().split('socket = "', 1)[1].split('"', 1)[0])
    for attempt, target in enumerate(["b", "a", "b", "a", "b"]):
        assert gw.proc is not None
        # the request goes out, then the daemon dies after a growing delay:
        # before, during or after the swap and the conntrack cleanup
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
            s.sendall(
                json.dumps({"command": "switch", "service": "wg0", "backend": target}).encode()
                + b"\n"
            )
            time.sleep(0.002 * attempt)
            gw.stop(signal.SIGKILL)
        gw.start()
        assert wait_until(lambda: gw.status()["active"] in ("a", "b"), 5), gw.logs()
        assert len(dnat_targets(gw)) == 1, dnat_targets(gw)
        assert dnat_targets(gw) == [gw.status()["active"]]
    tunnel_ends_up_working(gw)


def test_probe_clock_stepped_back_keeps_probes_accepted(gw: Gateway) -> None:
    """The backends have seen stamps from an hour ahead (the state file says
    so, as after a clock that ran fast and was then stepped back): the next
    daemon's wall clock is an hour behind what they accept, and its probes
    must still be accepted. Without the saved stamp they are not (the
    control at the end), which shows the case is real."""
    lab = gw.lab
    stamp_file = lab.dir / "state" / timestamps.STATE_FILE
    gw.stop()
    stamp_file.write_bytes(tai64n.tai64n(time.time_ns() + 3600 * 10**9))
    gw.start()
    for name in ("a", "b"):
        wait_state(gw, name, "up")
    gw.stop()  # the clock is now an hour behind every stamp the backends took
    gw.start()
    time.sleep(1.5)
    for name in ("a", "b"):
        wait_state(gw, name, "up", 3)
    tunnel_ends_up_working(gw)
    # control: forget the saved stamp and the backends refuse the probes
    gw.stop()
    stamp_file.unlink()
    gw.start()
    time.sleep(1.5)
    assert gw.backend_state("b") != "up", gw.status()
    gw.stop()
    for b in lab.backends:  # they remember the future stamp: start them afresh
        b.stop()
        b.start()
    gw.start()
    wait_state(gw, "b", "up")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_hundreds_of_switches_under_a_stream(gw: Gateway) -> None:
    lab = gw.lab
    sock = Path(gw.config.read_text().split('socket = "', 1)[1].split('"', 1)[0])

    def switch(target: str) -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(sock))
            s.sendall(
                json.dumps({"command": "switch", "service": "wg0", "backend": target}).encode()
                + b"\n"
            )
            reply = json.loads(s.makefile().readline())
            assert reply["ok"], reply

    for target in ["b", "a"] * 10:  # warm up before the memory baseline
        switch(target)
    assert gw.proc is not None
    rss_before = _rss_kib(gw.proc.pid)
    recorders = {
        b.name: lab.popen(b, [sys.executable, str(STREAM), "record"], stdout=subprocess.PIPE)
        for b in lab.backends
    }
    for proc in recorders.values():
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    switches = 200
    sender = lab.popen(
        lab.client,
        [
            sys.executable,
            str(STREAM),
            "send",
            lab.public_v4,
            str(lab.public_port),
            "40999",
            "0.002",
            "12",
        ],
        stdout=subprocess.PIPE,
    )
    time.sleep(0.5)
    windows: list[tuple[float, float, str]] = []  # (requested, done, new active)
    for i in range(switches):
        target = "b" if i % 2 == 0 else "a"
        started = time.monotonic()
        switch(target)
        windows.append((started, time.monotonic(), target))
        time.sleep(0.02)
    sent_out, _ = sender.communicate(timeout=30)
    received: dict[str, list[int]] = {}
    for name, proc in recorders.items():
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
        received[name] = [int(x) for x in out.split()]
    sent = {int(s): float(t) for s, t in (line.split() for line in sent_out.splitlines())}
    assert len(sent) > 3000

    slack = 0.02  # a datagram sent just before a request may meet the new rule

    def allowed(t: float) -> set[str]:
        ok = {"a"}  # before the first switch
        for requested, done, target in windows:
            if t < requested - slack:
                break
            previous = next(iter(ok)) if len(ok) == 1 else target
            ok = {target} if t > done else {previous, target} | ok
        return ok

    wrong = [
        (name, seq)
        for name, seqs in received.items()
        for seq in seqs
        if seq in sent and name not in allowed(sent[seq])
    ]
    assert not wrong, f"{len(wrong)} datagrams reached a non-active backend: {wrong[:10]}"
    delivered = sum(len(v) for v in received.values())
    assert delivered >= 0.95 * len(sent), (delivered, len(sent))
    assert all(received.values()), received.keys()
    rss_after = _rss_kib(gw.proc.pid)
    assert rss_after - rss_before < 4096, (rss_before, rss_after)
    assert gw.status()["failovers"] >= switches
    tunnel_ends_up_working(gw)
