"""Client flows to a public endpoint in a real conntrack table: un-NATed ones go.

A client packet that reaches the gateway while no DNAT for its public endpoint exists
makes an entry without NAT, and the client's retries keep it: after the DNAT appears,
that client still reaches the gateway itself, never a backend. Here the flows are real
packets from the lab's client namespace, in this order:

(a) UDP flows to public:PORT while the gateway has only an empty nat chain (one of them
    marked, as natfail's rules may leave a flow marked without its DNAT);
(c) unrelated entries: UDP to public:PORT+1, TCP to public:PORT, an ICMP echo;
    then a DNAT public:PORT -> backend a appears, and
(b) new UDP flows to public:PORT, DNATed to backend a (and one of the (a) flows retries,
    which keeps it un-NATed: the fault itself).

:meth:`NetlinkConntrack.remove_unnated` must remove exactly (a), in one family at a time;
:meth:`NetlinkConntrack.public_flows` must count them by reply source. Entries are read
back with the conntrack tool, not with the code under test.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from natfail.config import Endpoint
from natfail.core import ruleset
from natfail.io.conntrack import NetlinkConntrack, PublicFlows
from natfail.io.conntrack_worker import ConntrackWorker
from natfail.lab import PUBLIC_V4, PUBLIC_V6, Lab
from tests.netns.nsworker import NsWorker

PORT = 52001  # not the lab's 51820: its WireGuard client must not add flows here
OTHER_PORT = PORT + 1
TABLE = "nfctpub"
MARKED_SPORT = 41010
UNNATED_SPORTS = (41001, 41002, 41003)
NATED_SPORTS = (41101, 41102)
OTHER_SPORT = 41020
PUBLIC4 = Endpoint(ipaddress.ip_address(PUBLIC_V4), PORT)
PUBLIC6 = Endpoint(ipaddress.ip_address(PUBLIC_V6), PORT)

# --- code that runs in the gateway namespace (in the worker) ---------------------------

_STATE: dict[str, Any] = {}


def _ct() -> NetlinkConntrack:
    if "ct" not in _STATE:
        _STATE["ct"] = NetlinkConntrack()
    ct: NetlinkConntrack = _STATE["ct"]
    return ct


def remove_unnated(public: Endpoint) -> int:
    return _ct().remove_unnated(public)


def public_flows(public: Endpoint) -> PublicFlows:
    return _ct().public_flows([public])[public]


def public_flows_of(publics: list[Endpoint]) -> dict[Endpoint, PublicFlows]:
    return _ct().public_flows(publics)


def requests() -> int:
    return _ct().requests


def async_calls(public: Endpoint) -> tuple[PublicFlows, int, PublicFlows]:
    """The daemon's path: the wrappers of ConntrackWorker, from an event loop."""

    async def run() -> tuple[PublicFlows, int, PublicFlows]:
        worker = ConntrackWorker(NetlinkConntrack)
        try:
            before = (await worker.public_flows([public]))[public]
            sent = await worker.remove_unnated(public)
            return before, sent, (await worker.public_flows([public]))[public]
        finally:
            worker.close()

    return asyncio.run(run())


def listen_tcp(family: int, ip: str, port: int) -> None:
    """A TCP listener that never accepts: the kernel completes the handshake anyway."""
    s = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, port))
    s.listen(16)
    _STATE.setdefault("listeners", []).append(s)


def close_listeners() -> None:
    for s in _STATE.pop("listeners", []):
        s.close()


# --- traffic from the client ------------------------------------------------------------

UDP_SENDER = """
import socket, sys
family, dst, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for sport in map(int, sys.argv[4:]):
    s = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0" if family == 4 else "::", sport))
    s.sendto(b"initiation", (dst, port))
    s.close()
"""
TCP_CONNECT = """
import socket, sys
family, dst, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_STREAM)
s.settimeout(5)
s.connect((dst, port))
s.close()
"""


def send_udp(lab: Lab, family: int, port: int, *sports: int) -> None:
    dst = PUBLIC_V4 if family == 4 else PUBLIC_V6
    lab.exec(
        lab.client, ["python3", "-c", UDP_SENDER, str(family), dst, str(port), *map(str, sports)]
    )


# --- reading the table with the conntrack tool ------------------------------------------


@dataclass(frozen=True)
class Entry:
    proto: str
    orig: dict[str, str]
    reply: dict[str, str]
    mark: int


def entries(lab: Lab, family: int) -> list[Entry]:
    out = lab.exec(lab.gateway, ["conntrack", "-L", "-f", "ipv4" if family == 4 else "ipv6"])
    found = []
    for line in out.stdout.splitlines():
        words = line.split()
        if not words:
            continue
        orig: dict[str, str] = {}
        reply: dict[str, str] = {}
        mark = 0
        for word in words[1:]:
            key, eq, value = word.partition("=")
            if not eq:
                continue
            if key == "mark":
                mark = int(value)
            elif key in ("src", "dst", "sport", "dport", "type", "id"):
                (reply if key in orig else orig).setdefault(key, value)
        found.append(Entry(words[0], orig, reply, mark))
    return found


def udp_to(lab: Lab, family: int, port: int) -> dict[int, Entry]:
    """The client's UDP entries to public:``port``, by client source port."""
    public = PUBLIC_V4 if family == 4 else PUBLIC_V6
    return {
        int(e.orig["sport"]): e
        for e in entries(lab, family)
        if e.proto == "udp" and e.orig.get("dst") == public and e.orig.get("dport") == str(port)
    }


def reply_sources(lab: Lab, family: int) -> dict[int, str]:
    return {sport: e.reply["src"] for sport, e in udp_to(lab, family, PORT).items()}


def others(lab: Lab, family: int) -> list[str]:
    """The entries that are not UDP to public:PORT (they must all survive), sorted."""
    public = PUBLIC_V4 if family == 4 else PUBLIC_V6
    return sorted(
        repr(e)
        for e in entries(lab, family)
        if not (
            e.proto == "udp" and e.orig.get("dst") == public and e.orig.get("dport") == str(PORT)
        )
    )


# --- fixtures ----------------------------------------------------------------------------


def _nat_tables(lab: Lab) -> str:
    mark = ruleset.backend_mark("wg0", "a")
    chain = "type nat hook prerouting priority dstnat; policy accept;"
    script = []
    for fam in ("ip", "ip6"):
        script += [
            f"table {fam} {TABLE} {{}}",
            f"delete table {fam} {TABLE}",
            f"table {fam} {TABLE} {{\n chain pre {{\n  {chain}\n"
            f"  udp sport {MARKED_SPORT} ct mark set {mark:#x}\n }}\n}}",
        ]
    return "\n".join(script) + "\n"


def _add_dnat(lab: Lab) -> None:
    a = lab.backends[0]
    assert a.v6 is not None
    script = (
        f"add rule ip {TABLE} pre ip daddr {PUBLIC_V4} udp dport {PORT} "
        f"dnat to {a.v4}:{PORT}\n"
        f"add rule ip6 {TABLE} pre ip6 daddr {PUBLIC_V6} udp dport {PORT} "
        f"dnat to [{a.v6}]:{PORT}\n"
    )
    lab.exec(lab.gateway, ["nft", "-f", "-"], input=script)


@pytest.fixture(scope="module")
def worker(lab: Lab) -> Iterator[NsWorker]:
    # every entry of a test must outlive it, however slow the machine
    lab.exec(
        lab.gateway,
        [
            "sysctl",
            "-q",
            "-w",
            "net.netfilter.nf_conntrack_udp_timeout=600",
            "net.netfilter.nf_conntrack_icmp_timeout=600",
            "net.netfilter.nf_conntrack_icmpv6_timeout=600",
            "net.netfilter.nf_conntrack_tcp_timeout_close_wait=600",
            "net.netfilter.nf_conntrack_tcp_timeout_time_wait=600",
        ],
    )
    with NsWorker(lab.gateway.ns) as w:
        yield w


@pytest.fixture
def flows(lab: Lab, worker: NsWorker) -> Iterator[Lab]:
    """The gateway's table holding (a), (b) and (c) in both families (see the module)."""
    lab.exec(lab.gateway, ["nft", "-f", "-"], input=_nat_tables(lab))
    lab.flush_conntrack()
    try:
        for family, public in ((4, PUBLIC_V4), (6, PUBLIC_V6)):
            send_udp(lab, family, PORT, *UNNATED_SPORTS)  # (a)
            send_udp(lab, family, OTHER_PORT, OTHER_SPORT)  # (c)
            worker.call(listen_tcp, family, public, PORT)
            lab.exec(lab.client, ["python3", "-c", TCP_CONNECT, str(family), public, str(PORT)])
            lab.exec(lab.client, ["ping", "-n", "-q", "-c", "1", "-w", "5", public])
        send_udp(lab, 4, PORT, MARKED_SPORT)  # (a), marked
        _add_dnat(lab)
        for family in (4, 6):
            send_udp(lab, family, PORT, *NATED_SPORTS)  # (b)
            send_udp(lab, family, PORT, UNNATED_SPORTS[0])  # a retry of (a)
        yield lab
    finally:
        worker.call(close_listeners)
        for fam in ("ip", "ip6"):
            lab.exec(lab.gateway, ["nft", "delete", "table", fam, TABLE], check=False)
        lab.flush_conntrack()


# --- tests -------------------------------------------------------------------------------


def test_remove_unnated_removes_exactly_the_flows_no_dnat_rewrote(
    flows: Lab, worker: NsWorker
) -> None:
    lab = flows
    a = lab.backends[0]
    assert a.v6 is not None
    unnated4 = {*UNNATED_SPORTS, MARKED_SPORT}
    # the scene: the retry kept its entry un-NATed although the DNAT is in place
    assert reply_sources(lab, 4) == {
        **{p: PUBLIC_V4 for p in unnated4},
        **{p: a.v4 for p in NATED_SPORTS},
    }
    assert reply_sources(lab, 6) == {
        **{p: PUBLIC_V6 for p in UNNATED_SPORTS},
        **{p: a.v6 for p in NATED_SPORTS},
    }
    assert udp_to(lab, 4, PORT)[MARKED_SPORT].mark == ruleset.backend_mark("wg0", "a")
    others4, others6 = others(lab, 4), others(lab, 6)
    for got, icmp in ((others4, "icmp"), (others6, "icmpv6")):
        assert sorted(e.split("'")[1] for e in got) == sorted([icmp, "tcp", "udp"]), got

    before = worker.call(requests)
    assert worker.call(remove_unnated, PUBLIC4) == 1
    assert worker.call(requests) - before == 1
    assert reply_sources(lab, 4) == {p: a.v4 for p in NATED_SPORTS}
    assert others(lab, 4) == others4
    assert reply_sources(lab, 6) == {
        **{p: PUBLIC_V6 for p in UNNATED_SPORTS},
        **{p: a.v6 for p in NATED_SPORTS},
    }  # the other family

    # IPv6: one dump and one exact delete per entry (see natfail.io.conntrack)
    assert worker.call(remove_unnated, PUBLIC6) == 1 + len(UNNATED_SPORTS)
    assert reply_sources(lab, 6) == {p: a.v6 for p in NATED_SPORTS}
    assert others(lab, 6) == others6
    assert others(lab, 4) == others4

    # what it is for: the client's next retry meets the DNAT
    send_udp(lab, 4, PORT, UNNATED_SPORTS[0])
    send_udp(lab, 6, PORT, UNNATED_SPORTS[0])
    assert reply_sources(lab, 4)[UNNATED_SPORTS[0]] == a.v4
    assert reply_sources(lab, 6)[UNNATED_SPORTS[0]] == a.v6

    assert worker.call(remove_unnated, PUBLIC4) == 1  # nothing left to remove: harmless
    assert len(reply_sources(lab, 4)) == len(NATED_SPORTS) + 1


def test_public_flows_counts_by_reply_source(flows: Lab, worker: NsWorker) -> None:
    lab = flows
    a = lab.backends[0]
    assert a.v6 is not None
    backend4 = Endpoint(ipaddress.ip_address(a.v4), PORT)
    backend6 = Endpoint(ipaddress.ip_address(a.v6), PORT)
    before = worker.call(requests)
    assert worker.call(public_flows, PUBLIC4) == PublicFlows(6, 4, {PUBLIC4: 4, backend4: 2})
    assert worker.call(requests) - before == 1  # one filtered dump
    assert worker.call(public_flows, PUBLIC6) == PublicFlows(5, 3, {PUBLIC6: 3, backend6: 2})
    other = Endpoint(ipaddress.ip_address(PUBLIC_V4), OTHER_PORT)
    assert worker.call(public_flows, other) == PublicFlows(1, 1, {other: 1})
    nobody = Endpoint(ipaddress.ip_address(PUBLIC_V4), PORT + 7)
    assert worker.call(public_flows, nobody) == PublicFlows(0, 0, {})
    # every endpoint of one address in one dump, each counted as alone
    before = worker.call(requests)
    assert worker.call(public_flows_of, [PUBLIC4, other, nobody]) == {
        PUBLIC4: PublicFlows(6, 4, {PUBLIC4: 4, backend4: 2}),
        other: PublicFlows(1, 1, {other: 1}),
        nobody: PublicFlows(0, 0, {}),
    }
    assert worker.call(requests) - before == 1
    other6 = Endpoint(ipaddress.ip_address(PUBLIC_V6), OTHER_PORT)
    both = worker.call(public_flows_of, [PUBLIC6, other6])
    assert both[PUBLIC6] == PublicFlows(5, 3, {PUBLIC6: 3, backend6: 2})


def test_foreign_dnat_shows_in_public_flows(flows: Lab, worker: NsWorker) -> None:
    """A DNAT that is not natfail's, at a higher priority, sends new flows to another
    address: the reply sources say so."""
    lab = flows
    b = lab.backends[1]
    lab.exec(
        lab.gateway,
        ["nft", "-f", "-"],
        input=(
            f"table ip {TABLE}foreign {{\n chain pre {{\n"
            f"  type nat hook prerouting priority dstnat - 10; policy accept;\n"
            f"  ip daddr {PUBLIC_V4} udp dport {PORT} dnat to {b.v4}:{PORT + 100}\n }}\n}}\n"
        ),
    )
    try:
        send_udp(lab, 4, PORT, 41201, 41202, 41203)
        got = worker.call(public_flows, PUBLIC4)
        foreign = Endpoint(ipaddress.ip_address(b.v4), PORT + 100)
        assert got.by_reply_source[foreign] == 3, got
        assert got.total == 9 and got.unnated == 4, got
        # a foreign DNAT's flows are NATed: remove_unnated leaves them alone
        worker.call(remove_unnated, PUBLIC4)
        assert worker.call(public_flows, PUBLIC4).by_reply_source == {
            foreign: 3,
            Endpoint(ipaddress.ip_address(lab.backends[0].v4), PORT): 2,
        }
    finally:
        lab.exec(lab.gateway, ["nft", "delete", "table", "ip", f"{TABLE}foreign"], check=False)


def test_async_wrappers(flows: Lab, worker: NsWorker) -> None:
    """ConntrackWorker's thread, as the daemon uses it, in the gateway's namespace."""
    before, sent, after = worker.call(async_calls, PUBLIC6)
    assert (before.total, before.unnated, sent) == (5, 3, 1 + len(UNNATED_SPORTS))
    assert (after.total, after.unnated) == (2, 0)
    assert len(reply_sources(flows, 6)) == len(NATED_SPORTS)


def remove_backend(mark: int, address: Endpoint) -> Any:
    return _ct().remove_backend(mark, address)


def count_backend(mark: int, address: Endpoint) -> int:
    return _ct().count_backend(mark, address)


@pytest.mark.parametrize("family", [4, 6])
def test_backend_cleanup_takes_that_backends_flows_only(
    flows: Lab, worker: NsWorker, family: int
) -> None:
    """Linux matches an IPv6 address in a conntrack filter the wrong way round (every
    OTHER address); a cleanup by it removed everybody's flows but the backend's own."""
    lab = flows
    a, b = lab.backends[0], lab.backends[1]
    ip_a, ip_b = (a.v4, b.v4) if family == 4 else (a.v6, b.v6)
    public = PUBLIC_V4 if family == 4 else PUBLIC_V6
    assert ip_a is not None and ip_b is not None
    addr_a = Endpoint(ipaddress.ip_address(ip_a), PORT)
    addr_b = Endpoint(ipaddress.ip_address(ip_b), PORT)
    scene = reply_sources(lab, family)
    rest = others(lab, family)
    other_family = reply_sources(lab, 10 - family), others(lab, 10 - family)
    other_family[0].pop(MARKED_SPORT, None)  # a's mark goes in both families
    mark_b = ruleset.backend_mark("wg0", b.name)
    assert worker.call(count_backend, mark_b, addr_b) == 0
    result = worker.call(remove_backend, mark_b, addr_b)
    assert (result.passes, result.left) == (1, 0)
    assert reply_sources(lab, family) == scene  # nothing of b's: nothing goes
    assert others(lab, family) == rest

    # a's flows: the DNATed ones (unmarked: made by a rule that is not natfail's) and
    # the one with a's mark but no DNAT
    mark_a = ruleset.backend_mark("wg0", a.name)
    assert worker.call(count_backend, mark_a, addr_a) >= len(NATED_SPORTS)
    result = worker.call(remove_backend, mark_a, addr_a)
    assert result.left == 0
    assert reply_sources(lab, family) == {
        p: public for p in scene if scene[p] == public and p != MARKED_SPORT
    }
    assert others(lab, family) == rest
    assert (reply_sources(lab, 10 - family), others(lab, 10 - family)) == other_family
