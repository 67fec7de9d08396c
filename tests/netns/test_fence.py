"""The fence in a lab, on both dataplanes: a packet that a standby backend starts
towards a client is dropped at the gateway, the active backend's leaves from the
public endpoint, replies in flows the gateway DNATed pass, and the gateway's own
traffic to a standby is untouched.

The backends' wireguard-go is stopped for this module: each backend's WireGuard
port is a plain UDP socket of the test (the gateway cannot tell the difference),
so the test decides exactly which packet a backend sends and when. Everything
runs through :class:`tests.netns.nsworker.NsWorker` children, one per namespace.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from natfail.config import Endpoint, Service
from natfail.core import ruleset
from natfail.core.ruleset import IptCommit, Ruleset
from natfail.io.conntrack import NetlinkConntrack
from natfail.io.iptables import IptablesDataplane, _IptFamily
from natfail.io.nftables import NftablesDataplane
from natfail.lab import (
    CLIENT_WAN_V4,
    CLIENT_WAN_V6,
    GATEWAY_LAN_V4,
    PUBLIC_PORT,
    PUBLIC_V4,
    PUBLIC_V6,
    Lab,
    LabBackend,
    wait_until,
)
from tests.builders import service
from tests.netns.nsworker import NsWorker

KINDS = ("nftables", "iptables")
# a drop is counted by the gateway a moment after the send: generous for a loaded machine
SETTLE = 10.0

# --- code that runs in a namespace (in a worker) ----------------------------------------

_STATE: dict[str, Any] = {}


def _dp(kind: str) -> Any:
    if kind not in _STATE:
        _STATE[kind] = NftablesDataplane() if kind == "nftables" else IptablesDataplane()
    return _STATE[kind]


def dp_call(kind: str, method: str, *args: Any) -> Any:
    return getattr(_dp(kind), method)(*args)


def clean(old: Endpoint, mark: int) -> int:
    """The daemon's conntrack cleanup of the old backend; what was left of it."""
    if "ct" not in _STATE:
        _STATE["ct"] = NetlinkConntrack()
    left: int = _STATE["ct"].remove_backend(mark, old).left
    return left


def switch(kind: str, desired: Ruleset, old: Endpoint, mark: int) -> int:
    """What the daemon does on a switch: apply, then clean the old backend's flows."""
    _dp(kind).apply(desired)
    return clean(old, mark)


def udp_open(key: str, host: str, port: int) -> int:
    """A UDP socket bound to host:port (port 0: any), kept under ``key``; its port."""
    old = _STATE.pop(key, None)
    if old is not None:
        old.close()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, port))
    _STATE[key] = sock
    bound: int = sock.getsockname()[1]
    return bound


def udp_send(key: str, host: str, port: int, payload: bytes) -> None:
    _STATE[key].sendto(payload, (host, port))


def udp_recv_until(key: str, last: bytes, timeout: float) -> list[tuple[str, int, bytes]]:
    """Every datagram (source address, port, payload) until ``last`` arrives; [] of what
    came when ``last`` never does within ``timeout``, with ``None`` appended."""
    sock: socket.socket = _STATE[key]
    sock.settimeout(timeout)
    got: list[tuple[str, int, bytes]] = []
    while True:
        try:
            data, addr = sock.recvfrom(2048)
        except TimeoutError:
            return [*got, ("timeout", 0, b"")]
        got.append((str(addr[0]), int(addr[1]), data))
        if data == last:
            return got


def udp_echo_one(key: str, timeout: float) -> tuple[str, int]:
    """Answers one datagram with its payload + b"-echo"; returns where it came from."""
    sock: socket.socket = _STATE[key]
    sock.settimeout(timeout)
    data, addr = sock.recvfrom(2048)
    sock.sendto(data + b"-echo", addr)
    return str(addr[0]), int(addr[1])


def udp_close_all() -> None:
    for key in [k for k, v in _STATE.items() if isinstance(v, socket.socket)]:
        _STATE.pop(key).close()


def recorded_iptables_apply(states: list[Ruleset], services: list[Service]) -> list[Any]:
    """Applies ``states`` in turn with one family's iptables code, IPv4, and after every
    commit reads both tables back from the kernel: (table, backends that were not their
    service's DNAT target yet not fenced at that moment) per commit, per state."""
    impl = _IptFamily(4)
    impl.remove_all()
    real = impl._commit
    log: list[tuple[str, list[str]]] = []

    def commit(family: int, step: IptCommit, want: Ruleset) -> None:
        real(family, step, want)
        installed, _ = impl._read_family(family)
        fenced = {f.backend for f in installed.fence}
        unfenced = [
            f"{d.service}/{b.name}"
            for d in installed.dnat
            for s in services
            if s.name == d.service
            for b in s.backends
            if b.name != d.backend_name and b.address not in fenced
        ]
        log.append((step.table, unfenced))

    impl._commit = commit  # type: ignore[method-assign]
    out: list[Any] = []
    try:
        for state in states:
            log.clear()
            impl.apply(state)
            out.append(list(log))
            assert impl._read_family(4) == (impl._of_family(state, 4), True)
    finally:
        impl.remove_all()
    return out


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab_options() -> dict[str, Any]:
    return {"backends": 2, "prefix": "fnc"}


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


class Nodes:
    """One worker in each namespace of the lab."""

    def __init__(self, lab: Lab) -> None:
        self.gw = NsWorker(lab.gateway.ns)
        self.client = NsWorker(lab.client.ns)
        self.backend = {b.name: NsWorker(b.ns) for b in lab.backends}

    def all(self) -> list[NsWorker]:
        return [self.gw, self.client, *self.backend.values()]

    def close(self) -> None:
        for w in self.all():
            w.close()


@pytest.fixture(scope="module")
def nodes(lab: Lab) -> Iterator[Nodes]:
    for b in lab.backends:
        b.stop()  # frees each backend's WireGuard port for the test's own socket
    n = Nodes(lab)
    try:
        yield n
    finally:
        n.close()


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest, lab: Lab, nodes: Nodes) -> Iterator[str]:
    k: str = request.param
    nodes.gw.call(dp_call, k, "remove_all")
    lab.flush_conntrack()
    yield k
    for w in nodes.all():
        w.call(udp_close_all)
    nodes.gw.call(dp_call, k, "remove_all")
    lab.flush_conntrack()


def _state(services: list[Service], v4: str | None, v6: str | None = None) -> Ruleset:
    return ruleset.build(services, {"wg0": v4, "wg6": v6})


def _gw(lab: Lab, *argv: str) -> str:
    return lab.exec(lab.gateway, list(argv)).stdout


def drops(lab: Lab, kind: str, family: int) -> int:
    """Packets the gateway's fence has dropped so far (one family)."""
    if kind == "nftables":
        listing = json.loads(_gw(lab, "nft", "-j", "list", "chain", "inet", "natfail", "fence"))
        for item in listing["nftables"]:
            rule = item.get("rule")
            if rule and rule.get("comment") == f"natfail fence{family}":
                for expr in rule["expr"]:
                    if "counter" in expr:
                        packets: int = expr["counter"]["packets"]
                        return packets
        raise AssertionError(f"no fence{family} counter in {listing}")
    tool = "iptables-legacy" if family == 4 else "ip6tables-legacy"
    text = _gw(lab, tool, "-t", "filter", "-L", "NATFAIL-FENCE", "-n", "-v", "-x")
    return sum(int(m.group(1)) for m in re.finditer(r"^\s*(\d+)\s+\d+\s+DROP", text, re.M))


def _conntrack(lab: Lab, family: int) -> str:
    return _gw(lab, "conntrack", "-L", "-f", "ipv4" if family == 4 else "ipv6")


def _v(b: LabBackend, family: int) -> str:
    if family == 4:
        return b.v4
    assert b.v6 is not None
    return b.v6


class Scene:
    """The client listening on one port, each backend holding its WireGuard port."""

    def __init__(self, lab: Lab, nodes: Nodes, kind: str, family: int, port: int) -> None:
        self.lab, self.nodes, self.kind, self.family = lab, nodes, kind, family
        self.client_ip = CLIENT_WAN_V4 if family == 4 else CLIENT_WAN_V6
        self.public_ip = PUBLIC_V4 if family == 4 else PUBLIC_V6
        self.port = port
        nodes.client.call(udp_open, "client", self.client_ip, port)
        for b in lab.backends:
            nodes.backend[b.name].call(udp_open, "wg", _v(b, family), b.port)

    def fenced(self, b: LabBackend, payload: bytes, *, new_flow: bool = True) -> None:
        """``b`` sends to the client: the gateway drops it, and (for a packet that
        starts a flow) leaves no conntrack entry of it."""
        before = drops(self.lab, self.kind, self.family)
        self.nodes.backend[b.name].call(udp_send, "wg", self.client_ip, self.port, payload)
        assert wait_until(
            lambda: drops(self.lab, self.kind, self.family) > before, timeout=SETTLE
        ), f"the gateway did not drop {payload!r} from {b.name}"
        if new_flow:
            flow = f"src={_v(b, self.family)} dst={self.client_ip} sport={b.port} dport={self.port}"
            assert flow not in _conntrack(self.lab, self.family)

    def arrives(self, b: LabBackend, payload: bytes) -> list[tuple[str, int, bytes]]:
        """``b`` sends to the client: it arrives from the public endpoint. Returns every
        datagram the client got up to it (so a caller sees any fenced one that came)."""
        drops_before = drops(self.lab, self.kind, self.family)
        self.nodes.backend[b.name].call(udp_send, "wg", self.client_ip, self.port, payload)
        got: list[tuple[str, int, bytes]] = self.nodes.client.call(
            udp_recv_until, "client", payload, SETTLE
        )
        assert got[-1] == (self.public_ip, PUBLIC_PORT, payload), got
        assert drops(self.lab, self.kind, self.family) == drops_before
        return got


# --- tests -----------------------------------------------------------------------------


def test_standby_is_fenced_and_the_active_leaves_from_the_public_endpoint(
    lab: Lab, nodes: Nodes, kind: str, services: list[Service]
) -> None:
    a, b = lab.backends
    nodes.gw.call(dp_call, kind, "apply", _state(services, a.name, a.name))
    scene = Scene(lab, nodes, kind, 4, 40001)
    scene.fenced(b, b"from-b-1")
    got = scene.arrives(a, b"from-a-1")
    assert [p for _, _, p in got] == [b"from-a-1"]

    # the switch (apply, then the cleanup of a's flows): now the reverse holds
    svc = services[0]
    old = svc.backend(a.name)
    assert old is not None
    left = nodes.gw.call(
        switch,
        kind,
        _state(services, b.name, b.name),
        old.address,
        ruleset.backend_mark("wg0", a.name),
    )
    assert left == 0
    scene.fenced(a, b"from-a-2")
    got = scene.arrives(b, b"from-b-2")
    assert [p for _, _, p in got] == [b"from-b-2"]
    assert nodes.gw.call(dp_call, kind, "read") == _state(services, b.name, b.name)


def test_old_active_is_fenced_at_once_in_its_own_flow(
    lab: Lab, nodes: Nodes, kind: str, services: list[Service]
) -> None:
    # a's flow to the client exists (a started it while active); the transaction that
    # takes a's DNAT away fences it before any cleanup has run
    a, b = lab.backends
    nodes.gw.call(dp_call, kind, "apply", _state(services, a.name, a.name))
    scene = Scene(lab, nodes, kind, 4, 40005)
    scene.arrives(a, b"established")
    nodes.gw.call(dp_call, kind, "apply", _state(services, b.name, b.name))
    scene.fenced(a, b"after-the-swap", new_flow=False)


def test_replies_in_a_flow_the_gateway_dnated_pass(
    lab: Lab, nodes: Nodes, kind: str, services: list[Service]
) -> None:
    a, b = lab.backends
    a_ep = Endpoint.parse(a.address)
    nodes.gw.call(dp_call, kind, "apply", _state(services, a.name, a.name))
    scene = Scene(lab, nodes, kind, 4, 40002)
    nodes.client.call(udp_send, "client", PUBLIC_V4, PUBLIC_PORT, b"q1")
    assert nodes.backend[a.name].call(udp_echo_one, "wg", SETTLE) == (CLIENT_WAN_V4, 40002)
    got = nodes.client.call(udp_recv_until, "client", b"q1-echo", SETTLE)
    assert got == [(PUBLIC_V4, PUBLIC_PORT, b"q1-echo")]
    # a loses the DNAT (no cleanup yet): it is fenced, but its answers in the
    # client's flow are replies and still reach the client
    nodes.gw.call(dp_call, kind, "apply", _state(services, b.name, b.name))
    before = drops(lab, kind, 4)
    nodes.client.call(udp_send, "client", PUBLIC_V4, PUBLIC_PORT, b"q2")
    assert nodes.backend[a.name].call(udp_echo_one, "wg", SETTLE) == (CLIENT_WAN_V4, 40002)
    got = nodes.client.call(udp_recv_until, "client", b"q2-echo", SETTLE)
    assert got == [(PUBLIC_V4, PUBLIC_PORT, b"q2-echo")]
    assert drops(lab, kind, 4) == before
    # once the cleanup removed the client's flow, the same packet from a starts a
    # flow of its own, and that is fenced
    assert nodes.gw.call(clean, a_ep, ruleset.backend_mark("wg0", a.name)) == 0
    scene.fenced(a, b"a-starts")


def test_the_gateways_own_traffic_with_a_standby_passes(
    lab: Lab, nodes: Nodes, kind: str, services: list[Service]
) -> None:
    a, b = lab.backends
    nodes.gw.call(dp_call, kind, "apply", _state(services, a.name, a.name))
    Scene(lab, nodes, kind, 4, 40003)
    before = drops(lab, kind, 4)
    # a probe: the gateway asks the standby's WireGuard port, which answers
    port = nodes.gw.call(udp_open, "probe", GATEWAY_LAN_V4, 0)
    nodes.gw.call(udp_send, "probe", b.v4, b.port, b"probe")
    assert nodes.backend[b.name].call(udp_echo_one, "wg", SETTLE) == (GATEWAY_LAN_V4, port)
    got = nodes.gw.call(udp_recv_until, "probe", b"probe-echo", SETTLE)
    assert got == [(b.v4, b.port, b"probe-echo")]
    # and the standby may start packets to the gateway itself (an agent's report)
    nodes.gw.call(udp_open, "listen", GATEWAY_LAN_V4, 40013)
    nodes.backend[b.name].call(udp_send, "wg", GATEWAY_LAN_V4, 40013, b"report")
    got = nodes.gw.call(udp_recv_until, "listen", b"report", SETTLE)
    assert got == [(b.v4, b.port, b"report")]
    assert drops(lab, kind, 4) == before


def test_ipv6_standby_is_fenced(lab: Lab, nodes: Nodes, kind: str, services: list[Service]) -> None:
    a, b = lab.backends
    nodes.gw.call(dp_call, kind, "apply", _state(services, None, b.name))
    scene = Scene(lab, nodes, kind, 6, 40004)
    scene.fenced(a, b"from-a-v6")
    got = scene.arrives(b, b"from-b-v6")
    assert [p for _, _, p in got] == [b"from-b-v6"]


def test_a_table_without_the_fence_is_upgraded(
    lab: Lab, nodes: Nodes, kind: str, services: list[Service]
) -> None:
    a, b = lab.backends
    state = _state(services, a.name, a.name)
    nodes.gw.call(dp_call, kind, "apply", state)
    # what an install of natfail before the fence looks like
    if kind == "nftables":
        script = "\n".join(
            [
                "delete chain inet natfail fence",
                "delete set inet natfail fence4",
                "delete set inet natfail fence6",
            ]
        )
        lab.exec(lab.gateway, ["nft", "-f", "-"], input=script + "\n")
    else:
        for tool in ("iptables-legacy", "ip6tables-legacy"):
            _gw(lab, tool, "-D", "FORWARD", "-j", "NATFAIL-FENCE")
            _gw(lab, tool, "-F", "NATFAIL-FENCE")
            _gw(lab, tool, "-X", "NATFAIL-FENCE")
    installed, intact = nodes.gw.call(dp_call, kind, "inspect")
    assert not intact
    assert installed == state.nat()
    assert ruleset.active_from(installed, services) == {"wg0": a.name, "wg6": a.name}
    nodes.gw.call(dp_call, kind, "apply", state)
    assert nodes.gw.call(dp_call, kind, "inspect") == (state, True)
    scene = Scene(lab, nodes, kind, 4, 40006)
    scene.fenced(b, b"after-the-upgrade")


def test_iptables_commits_keep_every_standby_fenced(lab: Lab) -> None:
    a, b = lab.backends
    two = [
        service("wg0", f"{PUBLIC_V4}:{PUBLIC_PORT}", [(x.name, x.address) for x in (a, b)]),
        service("x1", "203.0.113.11:51820", [(x.name, f"{x.v4}:51821") for x in (a, b)]),
    ]
    states = [
        ruleset.build(two, {"wg0": a.name}),
        ruleset.build(two, {"wg0": b.name}),  # a switch
        ruleset.build(two, {"wg0": b.name, "x1": a.name}),  # a service gets its first active
        ruleset.build(two, {"wg0": a.name, "x1": None}),  # a switch, and x1's DNAT goes
    ]
    with NsWorker(lab.gateway.ns) as w:  # its own process: it loads python-iptables itself
        runs = w.call(recorded_iptables_apply, states, two)
    # every commit left every non-DNAT-target backend fenced (read back from the kernel)
    assert all(unfenced == [] for run in runs for _, unfenced in run), runs
    assert [[table for table, _ in run] for run in runs] == [
        ["filter", "nat"],
        ["filter", "nat", "filter"],
        ["filter", "nat"],
        ["filter", "nat", "filter"],
    ]
