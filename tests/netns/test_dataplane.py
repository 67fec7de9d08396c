"""The data path in a lab with real wireguard-go: both dataplanes, conntrack cleanup.

Every test runs once per dataplane (nftables, iptables). natfail's code runs inside the
gateway namespace through :class:`tests.netns.nsworker.NsWorker` (a forked child that
entered the namespace), exactly as the daemon will run there.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from natfail.config import Backend, Endpoint, Service
from natfail.core import ruleset
from natfail.core.ruleset import Ruleset
from natfail.io.conntrack import NetlinkConntrack
from natfail.io.iptables import IptablesDataplane
from natfail.io.nftables import NftablesDataplane
from natfail.lab import PUBLIC_PORT, PUBLIC_V4, PUBLIC_V6, SERVER_TUNNEL_V4, Lab
from tests.builders import service
from tests.netns.nsworker import NsWorker

KINDS = ("nftables", "iptables")

# --- code that runs in the gateway namespace (in the worker) ---------------------------

_STATE: dict[str, Any] = {}


def _dp(kind: str) -> Any:
    if kind not in _STATE:
        _STATE[kind] = NftablesDataplane() if kind == "nftables" else IptablesDataplane()
    return _STATE[kind]


def _ct() -> NetlinkConntrack:
    if "ct" not in _STATE:
        _STATE["ct"] = NetlinkConntrack()
    ct: NetlinkConntrack = _STATE["ct"]
    return ct


def dp_call(kind: str, method: str, *args: Any) -> Any:
    return getattr(_dp(kind), method)(*args)


def swap(kind: str, desired: Ruleset, old: Backend | None, service: str) -> Any:
    """What the daemon does on a switch: apply, then (only then) clean the old backend."""
    _dp(kind).apply(desired)
    if old is None:
        return None
    return _ct().remove_backend(ruleset.backend_mark(service, old.name), old.address)


def swap_loop(
    kind: str, states: list[Ruleset], olds: list[Backend], service: str, count: int, pause: float
) -> int:
    for i in range(count):
        swap(kind, states[i % 2], olds[i % 2], service)
        time.sleep(pause)
    return count


def ct_count(mark: int, address: Endpoint) -> int:
    return _ct().count_backend(mark, address)


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def services(lab: Lab) -> list[Service]:
    v4 = service("wg0", f"{PUBLIC_V4}:{PUBLIC_PORT}", [(b.name, b.address) for b in lab.backends])
    v6 = service(
        "wg6",
        f"[{PUBLIC_V6}]:{PUBLIC_PORT}",
        [(b.name, b.address_v6 or "") for b in lab.backends],
        iif=lab.gateway.wan_if,
    )
    return [v4, v6]


@pytest.fixture(scope="module")
def worker(lab: Lab) -> Iterator[NsWorker]:
    with NsWorker(lab.gateway.ns) as w:
        yield w


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest, worker: NsWorker) -> Iterator[str]:
    k: str = request.param
    worker.call(dp_call, k, "remove_all")
    yield k
    worker.call(dp_call, k, "remove_all")


def _state(services: list[Service], v4: str | None, v6: str | None = None) -> Ruleset:
    return ruleset.build(services, {"wg0": v4, "wg6": v6})


def _gw(lab: Lab, *argv: str) -> str:
    return lab.exec(lab.gateway, list(argv)).stdout


def _conntrack_list(lab: Lab) -> str:
    return _gw(lab, "conntrack", "-L", "-f", "ipv4") + _gw(lab, "conntrack", "-L", "-f", "ipv6")


# --- tests -----------------------------------------------------------------------------


def test_read_back_and_remove_all(
    lab: Lab, worker: NsWorker, kind: str, services: list[Service]
) -> None:
    assert worker.call(dp_call, kind, "read") == Ruleset()
    a = _state(services, "a", "a")
    worker.call(dp_call, kind, "apply", a)
    assert worker.call(dp_call, kind, "read") == a
    assert worker.call(dp_call, kind, "intact")
    b = _state(services, "b", None)
    worker.call(dp_call, kind, "apply", b)
    got = worker.call(dp_call, kind, "read")
    assert got == b
    assert ruleset.active_from(got, services) == {"wg0": "b"}
    worker.call(dp_call, kind, "apply", b)  # idempotent
    assert worker.call(dp_call, kind, "read") == b
    worker.call(dp_call, kind, "remove_all")
    assert worker.call(dp_call, kind, "read") == Ruleset()
    assert "natfail" not in _gw(lab, "nft", "list", "tables")
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        assert "NATFAIL" not in _gw(lab, tool, "-t", "nat", "-S")


def test_repairs_drift(lab: Lab, worker: NsWorker, kind: str, services: list[Service]) -> None:
    a = _state(services, "a", "a")
    worker.call(dp_call, kind, "apply", a)
    if kind == "nftables":
        _gw(lab, "nft", "delete", "chain", "inet", "natfail", "prerouting")
    else:
        _gw(lab, "iptables-legacy", "-t", "nat", "-D", "PREROUTING", "-j", "NATFAIL-PRE")
    assert not worker.call(dp_call, kind, "intact")
    worker.call(dp_call, kind, "apply", a)
    assert worker.call(dp_call, kind, "intact")
    assert worker.call(dp_call, kind, "read") == a


USER_NFT = """
table ip usertable {
  chain pre {
    type nat hook prerouting priority dstnat + 10; policy accept;
    tcp dport 9999 dnat to 10.0.0.9
  }
  chain forward_user {
    type filter hook forward priority 0; policy accept;
    udp dport 9 accept
  }
}
"""


def test_user_rules_untouched(
    lab: Lab, worker: NsWorker, kind: str, services: list[Service]
) -> None:
    lab.exec(lab.gateway, ["nft", "-f", "-"], input=USER_NFT)
    ipt = ["iptables-legacy", "-t", "nat"]
    lab.exec(lab.gateway, [*ipt, "-N", "USERCHAIN"])
    lab.exec(lab.gateway, [*ipt, "-A", "USERCHAIN", "-p", "tcp", "--dport", "9998", "-j", "RETURN"])
    lab.exec(lab.gateway, [*ipt, "-A", "PREROUTING", "-j", "USERCHAIN"])
    try:
        nft_before = _gw(lab, "nft", "list", "table", "ip", "usertable")
        ipt_before = _gw(lab, *ipt, "-S")
        worker.call(dp_call, kind, "apply", _state(services, "a", "a"))
        worker.call(dp_call, kind, "apply", _state(services, "b", "b"))
        assert _gw(lab, "nft", "list", "table", "ip", "usertable") == nft_before
        user_lines = [ln for ln in _gw(lab, *ipt, "-S").splitlines() if "NATFAIL" not in ln]
        assert user_lines == ipt_before.splitlines()
        worker.call(dp_call, kind, "remove_all")
        assert _gw(lab, "nft", "list", "table", "ip", "usertable") == nft_before
        assert _gw(lab, *ipt, "-S") == ipt_before
    finally:
        lab.exec(lab.gateway, ["nft", "delete", "table", "ip", "usertable"], check=False)
        lab.exec(lab.gateway, [*ipt, "-D", "PREROUTING", "-j", "USERCHAIN"], check=False)
        lab.exec(lab.gateway, [*ipt, "-F", "USERCHAIN"], check=False)
        lab.exec(lab.gateway, [*ipt, "-X", "USERCHAIN"], check=False)


SENDER = """
import socket, sys, time
count, rate, base = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
start = time.monotonic()
sent = 0
for i in range(count):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", base + i))   # a new flow per packet: each one meets the rules
    s.sendto(b"probe", (sys.argv[4], int(sys.argv[5])))
    s.close()
    sent += 1
    delay = start + sent / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
print(sent)
"""
COUNTER = """
table inet natfailtest {
  chain input {
    type filter hook input priority -300; policy accept;
    udp dport 51820 udp length 13 counter
  }
}
"""


def _counted(lab: Lab) -> dict[str, int]:
    out = {}
    for b in lab.backends:
        text = lab.exec(b, ["nft", "list", "table", "inet", "natfailtest"]).stdout
        m = re.search(r"packets (\d+)", text)
        out[b.name] = int(m.group(1)) if m else 0
    return out


def test_swaps_under_a_packet_stream_lose_nothing(
    fresh: Lab, worker: NsWorker, kind: str, services: list[Service]
) -> None:
    lab = fresh
    for b in lab.backends:
        lab.exec(
            b,
            ["nft", "-f", "-"],
            input=f"table inet natfailtest {{}}\ndelete table inet natfailtest\n{COUNTER}",
        )
    a, b = lab.backends[0], lab.backends[1]
    state_a = _state(services, a.name, a.name)
    state_b = _state(services, b.name, b.name)
    svc = services[0]
    olds = [svc.backend(a.name), svc.backend(b.name)]  # old backend when going to b, to a
    worker.call(dp_call, kind, "apply", state_a)
    packets, rate = 4000, 2000.0
    sender = lab.popen(
        lab.client,
        ["python3", "-c", SENDER, str(packets), str(rate), "20000", PUBLIC_V4, str(PUBLIC_PORT)],
        stdout=-1,
        stderr=-1,
    )
    swaps = 60 if kind == "nftables" else 30
    worker.call(swap_loop, kind, [state_b, state_a], olds, "wg0", swaps, 0.02)
    out, err = sender.communicate(timeout=30)
    assert sender.returncode == 0, err
    assert int(out) == packets
    time.sleep(0.3)
    counted = _counted(lab)
    assert all(n > 0 for n in counted.values()), counted
    assert sum(counted.values()) == packets, counted


def test_swap_then_cleanup_leaves_nothing_of_the_old_backend(
    fresh: Lab, worker: NsWorker, kind: str, services: list[Service]
) -> None:
    lab = fresh
    a, b = lab.backends[0], lab.backends[1]
    svc = services[0]
    worker.call(dp_call, kind, "apply", _state(services, a.name, a.name))
    before = lab.transfers()
    assert lab.client_ping(SERVER_TUNNEL_V4, count=2, interval=0.2)
    assert lab.carrying_backends(before) == [a.name]
    old = svc.backend(a.name)
    assert old is not None
    assert f"mark={ruleset.backend_mark('wg0', a.name)}" in _conntrack_list(lab)
    result = worker.call(swap, kind, _state(services, b.name, b.name), old, "wg0")
    assert result.left == 0
    assert a.v4 not in _conntrack_list(lab)
    lab.client_rehandshake()
    before = lab.transfers()
    assert lab.client_ping(SERVER_TUNNEL_V4, count=2, interval=0.2)
    assert lab.carrying_backends(before) == [b.name]
    assert a.v4 not in _conntrack_list(lab)
    assert lab.client_endpoint() == f"{PUBLIC_V4}:{PUBLIC_PORT}"


def test_backend_started_traffic_leaves_from_the_public_endpoint(
    fresh: Lab, worker: NsWorker, kind: str, services: list[Service]
) -> None:
    lab = fresh
    a = lab.backends[0]
    worker.call(dp_call, kind, "apply", _state(services, a.name, a.name))
    assert lab.client_ping(SERVER_TUNNEL_V4, count=2, interval=0.2)
    lab.flush_conntrack()  # every entry "expired": the next packet comes from the backend
    cp = lab.exec(
        a,
        ["ping", "-n", "-q", "-c", "2", "-i", "0.2", "-w", "5", "10.99.0.2"],
        check=False,
        timeout=10,
    )
    assert " 0% packet loss" in cp.stdout, cp.stdout
    assert lab.client_endpoint() == f"{PUBLIC_V4}:{PUBLIC_PORT}"
    listing = _conntrack_list(lab)
    assert f"src={a.v4} dst=198.51.100.2 sport=51820" in listing, listing
    assert f"mark={ruleset.backend_mark('wg0', a.name)}" in listing


def test_ipv6(fresh: Lab, worker: NsWorker, kind: str, services: list[Service]) -> None:
    lab = fresh
    a, b = lab.backends[0], lab.backends[1]
    svc6 = services[1]
    lab.set_client_endpoint(6)
    try:
        worker.call(dp_call, kind, "apply", _state(services, a.name, a.name))
        before = lab.transfers()
        assert lab.client_ping(SERVER_TUNNEL_V4, count=2, interval=0.2)
        assert lab.carrying_backends(before) == [a.name]
        assert a.v6 is not None and a.v6 in _gw(lab, "conntrack", "-L", "-f", "ipv6")
        old = svc6.backend(a.name)
        result = worker.call(swap, kind, _state(services, b.name, b.name), old, "wg6")
        assert result.left == 0
        assert a.v6 not in _gw(lab, "conntrack", "-L", "-f", "ipv6")
        lab.client_rehandshake()
        before = lab.transfers()
        assert lab.client_ping(SERVER_TUNNEL_V4, count=2, interval=0.2)
        assert lab.carrying_backends(before) == [b.name]
        assert lab.client_endpoint() == f"[{PUBLIC_V6}]:{PUBLIC_PORT}"
    finally:
        lab.set_client_endpoint(4)


def test_conntrack_guard(worker: NsWorker) -> None:
    from natfail.io.conntrack import ConntrackMisuse

    for bad in (None, 0, 0x12345678):
        with pytest.raises(ConntrackMisuse):
            worker.call(_flush_mark, bad)


def _flush_mark(mark: Any) -> None:
    _ct().flush_mark(mark)
