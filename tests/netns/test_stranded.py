"""Clients stranded without DNAT, and NAT that is not natfail's, with real
traffic: a client flow tracked while natfail's DNAT was missing has no NAT,
and the client's own retries would keep it so for good. Whenever natfail
installs, restores or changes a DNAT it removes such flows; the table only
comes with the first DNAT; a reload never leaves a service without its rule.

Each test drives many UDP client flows (tests/netns/udp_clients.py, one
conntrack entry per source port, refreshed every 0.2 s as WireGuard's
retries would) and the lab's real WireGuard client."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from natfail.lab import PUBLIC_PORT, PUBLIC_V4, Lab, LabError, wait_until
from tests.netns.gateway import ENV, Gateway, running
from tests.netns.test_faults import dnat_targets

CLIENTS = Path(__file__).with_name("udp_clients.py")
FIRST_PORT, COUNT = 41000, 30
_ENTRY = re.compile(
    r"src=(\S+) dst=(\S+) sport=(\d+) dport=(\d+) .*?src=(\S+) dst=\S+ sport=\d+ dport=\d+"
)


@pytest.fixture
def clients(fresh: Lab) -> Iterator[subprocess.Popen[str]]:
    proc = fresh.popen(
        fresh.client,
        [
            sys.executable,
            str(CLIENTS),
            PUBLIC_V4,
            str(PUBLIC_PORT),
            str(FIRST_PORT),
            str(COUNT),
            "0.2",
        ],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    yield proc
    proc.terminate()
    proc.wait(5)


def reply_sources(lab: Lab) -> dict[int, str]:
    """{client source port: reply source address} of the test's client flows to the
    public endpoint, as the gateway's conntrack table holds them."""
    out = lab.exec(lab.gateway, ["conntrack", "-L", "-p", "udp"], check=False).stdout
    flows: dict[int, str] = {}
    for line in out.splitlines():
        m = _ENTRY.search(line)
        if m is None or m.group(2) != PUBLIC_V4 or int(m.group(4)) != PUBLIC_PORT:
            continue
        sport = int(m.group(3))
        if FIRST_PORT <= sport < FIRST_PORT + COUNT:
            flows[sport] = m.group(5)
    return flows


def all_natted_to(lab: Lab, backend: str) -> bool:
    address = lab.backend(backend).v4
    flows = reply_sources(lab)
    return len(flows) == COUNT and set(flows.values()) == {address}


def add_stateful_filter(lab: Lab) -> None:
    """What many gateways have: a filter rule that makes the kernel track every flow."""
    lab.exec(
        lab.gateway,
        ["nft", "-f", "-"],
        input=(
            "table inet hostfw {\n chain hostfwd {\n  type filter hook forward priority 0;\n"
            "  ct state established,related accept\n }\n}\n"
        ),
    )


def targets(gw: Gateway) -> list[str]:
    """natfail's DNAT targets; none while its chain or table is gone."""
    try:
        return dnat_targets(gw)
    except (LabError, ValueError, StopIteration):
        return []


def remove_table(lab: Lab, family: str, name: str) -> None:
    lab.exec(lab.gateway, ["nft", "delete", "table", family, name], check=False)


def started(lab: Lab, firewall: str) -> Gateway:
    gw = Gateway(lab, firewall)
    gw.remove_rules()
    (lab.dir / "state" / "state.json").unlink(missing_ok=True)
    return gw


def finish(gw: Gateway) -> None:
    gw.stop()
    logs = gw.logs()
    gw.remove_rules()
    assert "Traceback" not in logs, logs


@pytest.mark.parametrize(
    ("firewall", "stateful"),
    [
        ("nftables", True),
        ("iptables", True),
        ("nftables", False),
    ],
)
def test_clients_sending_before_the_daemon_starts_are_not_stranded(
    fresh: Lab, clients: subprocess.Popen[str], firewall: str, stateful: bool
) -> None:
    if stateful:
        add_stateful_filter(fresh)
    gw = started(fresh, firewall)
    try:
        fresh.client_ping(count=1, timeout=1)  # the WireGuard client sends its initiation
        if stateful:
            # tracked without NAT: exactly the entries that strand the clients
            assert wait_until(lambda: len(reply_sources(fresh)) == COUNT, 5)
            assert set(reply_sources(fresh).values()) == {PUBLIC_V4}
        gw.start()
        assert gw.wait_active("a"), gw.logs()
        assert wait_until(lambda: all_natted_to(fresh, "a"), 10), reply_sources(fresh)
        # the real client gets through on its own retry (every 5 s), no help given
        assert wait_until(lambda: fresh.client_ping(count=1, timeout=1), 20), gw.logs()
    finally:
        finish(gw)
        remove_table(fresh, "inet", "hostfw")


@pytest.mark.parametrize("repair", ["flush", "restore"])
def test_iptables_flush_or_restore_strands_no_flow(
    fresh: Lab, clients: subprocess.Popen[str], repair: str
) -> None:
    add_stateful_filter(fresh)  # the kernel tracks while natfail's chains are gone
    try:
        with running(fresh, "iptables") as gw:
            assert wait_until(lambda: all_natted_to(fresh, "a"), 10), reply_sources(fresh)
            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGSTOP)  # so the flows are tracked before the repair
            try:
                for tool in ("iptables-legacy", "ip6tables-legacy"):
                    if repair == "flush":
                        fresh.exec(fresh.gateway, [tool, "-t", "nat", "-F"])
                    else:
                        restore = f"{tool}-restore"
                        fresh.exec(fresh.gateway, [restore], input="*nat\nCOMMIT\n")
                fresh.exec(fresh.gateway, ["conntrack", "-F"], check=False)  # every flow new
                assert wait_until(
                    lambda: (
                        set(reply_sources(fresh).values()) == {PUBLIC_V4}
                        and len(reply_sources(fresh)) == COUNT
                    ),
                    10,
                ), reply_sources(fresh)
            finally:
                gw.proc.send_signal(signal.SIGCONT)
            # natfail repairs its rules, and the un-NATed entries go
            assert wait_until(lambda: targets(gw) == ["a"], 10), gw.logs()
            assert wait_until(lambda: all_natted_to(fresh, "a"), 10), reply_sources(fresh)
            assert "repaired natfail's firewall rules" in gw.logs()
    finally:
        remove_table(fresh, "inet", "hostfw")


def test_nft_delete_table_during_failovers_strands_no_flow(
    fresh: Lab, clients: subprocess.Popen[str]
) -> None:
    with running(fresh, "nftables") as gw:
        a = fresh.backend("a")
        for round_ in range(3):
            if round_ % 2 == 0:
                a.stop()
            else:
                a.start()
            for _ in range(3):
                remove_table(fresh, "inet", "natfail")
                time.sleep(0.15)
        a.start()
        assert wait_until(lambda: len(targets(gw)) == 1, 10), gw.logs()
        active = gw.status()["active"]
        assert wait_until(lambda: all_natted_to(fresh, active), 10), reply_sources(fresh)


def test_a_reload_renaming_the_active_backend_keeps_the_dnat(
    fresh: Lab, clients: subprocess.Popen[str]
) -> None:
    try:
        with running(fresh, "nftables") as gw:
            fresh.backend("b").stop()
            assert wait_until(lambda: gw.backend_state("b") == "down", 10), gw.status()
            assert wait_until(lambda: all_natted_to(fresh, "a"), 10), reply_sources(fresh)
            text = gw.config.read_text()
            gw.config.write_text(text.replace('name = "a"', 'name = "a-renamed"'))
            reload = subprocess.Popen(
                [sys.executable, "-m", "natfail.cli.ctl", "-c", str(gw.config), "reload"],
                env={**os.environ, **ENV},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            missing = 0
            while reload.poll() is None:
                if not targets(gw):
                    missing += 1
            assert reload.wait(30) == 0, reload.communicate()
            for _ in range(20):  # and for a while after
                if not targets(gw):
                    missing += 1
            assert missing == 0
            assert gw.status()["active"] == "a-renamed"
            assert wait_until(lambda: all_natted_to(fresh, "a"), 10), reply_sources(fresh)
    finally:
        fresh.backend("b").start()


def test_a_foreign_dnat_before_natfails_is_reported(
    fresh: Lab, clients: subprocess.Popen[str]
) -> None:
    try:
        with running(fresh, "nftables") as gw:
            assert gw.status()["warnings"] == []
            fresh.exec(
                fresh.gateway,
                ["nft", "-f", "-"],
                input=(
                    "table ip foreign {\n chain foreignpre {\n"
                    "  type nat hook prerouting priority -150;\n"
                    f"  ip daddr {PUBLIC_V4} udp dport {PUBLIC_PORT} dnat to 10.0.0.99\n }}\n}}\n"
                ),
            )
            fresh.exec(fresh.gateway, ["conntrack", "-F"], check=False)
            assert wait_until(lambda: bool(gw.status()["warnings"]), 40, 0.5), gw.logs()
            (warning,) = gw.status()["warnings"]
            assert "10.0.0.99" in warning
            assert f"warning: {warning}" in gw.ctl("status").stdout
            assert "not by natfail" in gw.logs()
    finally:
        remove_table(fresh, "ip", "foreign")


def test_the_same_heavy_loss_on_every_backend_does_not_move_traffic(fresh: Lab) -> None:
    try:
        with running(fresh, "nftables") as gw:
            # every probe reply from every backend, alike: half of them lost
            fresh.exec(
                fresh.gateway,
                ["nft", "-f", "-"],
                input=(
                    "table inet lossy {\n chain lossin {\n  type filter hook input priority 0;\n"
                    f"  udp sport {PUBLIC_PORT} numgen random mod 2 == 0 drop\n }}\n}}\n"
                ),
            )
            time.sleep(12)  # the loss windows fill
            before = gw.status()["failovers"]
            time.sleep(25)
            assert gw.status()["failovers"] - before <= 1, gw.logs()
    finally:
        remove_table(fresh, "inet", "lossy")
